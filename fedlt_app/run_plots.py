"""The pictures of one run, and ``fedlt-report``: redraw them, overlay several runs.

Every run leaves, next to its ``config.json`` and ``metrics.jsonl``
(:class:`fedlt_app.results.RunRecorder` draws them when the run ends):

- ``curves.png``: balanced and tail accuracy per round (per cycle for active
  learning, whose ``round`` field is the cycle);
- ``per_class.png``: the last round's accuracy of each class against its
  number of training samples (log axis), tail classes marked;
- ``partition.png``: training samples per client and class, from
  ``config.json``'s ``client_class_counts`` (stacked bars; a heat map for
  more than :data:`MAX_BARS` clients). Runs recorded before that entry existed
  get no ``partition.png``.

``fedlt-report RUN_DIR [RUN_DIR ...] [--output overlay.png]`` redraws them
and, given two or more runs, overlays their curves in one figure. Matplotlib
is imported only when drawing, and without pyplot (its Agg canvas: headless,
no global backend switch), so a run without matplotlib still finishes and
only misses its pictures. No Flower import: this reads results, it runs none.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CURVES, PER_CLASS, PARTITION = "curves.png", "per_class.png", "partition.png"
NEEDS = {  # what each picture is drawn from, for the line that says why one is missing
    CURVES: "rounds with accuracy in metrics.jsonl",
    PER_CLASS: "class_counts in config.json and per_class_accuracy in metrics.jsonl",
    PARTITION: "client_class_counts in config.json (runs recorded before it have none)",
}
MAX_BARS = 100  # clients drawn as stacked bars; beyond, bars are too thin to read and slow to draw
MAX_CLASS_LABELS = 40  # per_class.png names each point's class up to this many classes
DPI = 110  # as report.py's sweep plots
MISSING_MATPLOTLIB = ("[fedlt] pictures skipped: matplotlib is not installed "
                      "(pip install matplotlib, or reinstall the app: pip install -e '.[dev]')")

VALUE_NAMES = {  # how run-config values read in titles and legends (also the sweep report's)
    "method": {
        "fedavg": "FedAvg+CE",
        "fedprox": "FedProx",
        "focal": "Fed-Focal Loss",
        "fedlc": "FedLC",
        "ratio-loss": "Ratio Loss",
        "climb": "CLIMB",
        "creff": "CReFF",
        "redgrape": "RedGrape",
        "grape-la": "GRAPE-LA (fedlt)",
        "fedetf": "FedETF",
        "fednh": "FedNH",
        "fedgrab": "Fed-GraB",
    },
    "server-opt": {"fedavg": "FedAvg", "fedavgm": "FedAvgM", "fedadam": "FedAdam"},
}


class RunDirError(ValueError):
    """A folder that holds no run results."""


@dataclass(frozen=True)
class RunData:
    dir: Path
    config: dict[str, Any]  # config.json: run_config plus the federation's facts
    rounds: list[dict[str, Any]]  # metrics.jsonl

    @property
    def run_config(self) -> dict[str, Any]:
        return dict(self.config.get("run_config", {}))

    @property
    def title(self) -> str:
        """'RedGrape · fmnist · seed 0' (FairFAL runs: 'fairfal + FedAvg+CE · ...')."""
        rc = self.run_config
        method = VALUE_NAMES["method"].get(str(rc.get("method")), str(rc.get("method", "?")))
        if rc.get("al-method", "none") != "none":
            method = f"{rc['al-method']} + {method}"
        return f"{method} · {rc.get('dataset', '?')} · seed {rc.get('seed', '?')}"

    @property
    def x_label(self) -> str:
        return "active-learning cycle" if any("cycle" in r for r in self.rounds) else "communication round"


def read_rounds(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's rows; a torn last line (a killed run) is dropped."""
    rows = []
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def load_run(path: str | Path) -> RunData:
    """Read a run folder's config.json and metrics.jsonl; :class:`RunDirError` names a folder without them."""
    run_dir = Path(path).expanduser()
    if not (run_dir / "metrics.jsonl").is_file():
        raise RunDirError(f"{run_dir} holds no run results (no metrics.jsonl)")
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise RunDirError(f"{run_dir} holds no run results (no readable config.json: {err})") from err
    return RunData(run_dir, config, read_rounds(run_dir))


def has_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


# ------------------------------------------------------------------ figures


def _figure(width: float = 8.0, height: float = 5.0):  # type: ignore[no-untyped-def]
    from matplotlib.figure import Figure  # no pyplot: works headless and inside notebooks

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.add_subplot()


LINE_STYLES = ("-", "--", ":", "-.")


def line_style(index: int) -> dict[str, Any]:
    """Colour and dash of the ``index``-th curve of a figure: matplotlib's ten default colours, then the same
    colours dashed, dotted, ...; so a figure of up to 40 curves never draws two alike (a sweep's table has
    more than ten methods, and the default cycle repeats its colours after ten)."""
    return {"color": f"C{index % 10}", "linestyle": LINE_STYLES[(index // 10) % len(LINE_STYLES)]}


def legend_outside(fig: Any, ax: Any) -> None:
    """One legend for the figure, to the right of its axes, where it cannot hide a curve or a bar."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right upper", fontsize="small")


def _series(run: RunData, metric: str) -> tuple[list[int], list[float]]:
    """(rounds, percent) of ``metric``, skipping rounds where it is null."""
    rows = [r for r in run.rounds if r.get(metric) is not None]
    return [int(r["round"]) for r in rows], [100 * float(r[metric]) for r in rows]


def _round_axis(ax: Any, run: RunData) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(run.x_label)
    ax.grid(alpha=0.3)


def plot_curves(run: RunData) -> Any | None:
    """Balanced and tail accuracy per round of one run."""
    if not _series(run, "accuracy")[0]:
        return None
    fig, ax = _figure()
    for metric, label, style in (("accuracy", "balanced accuracy", "-"), ("tail_accuracy", "tail accuracy", "--")):
        ax.plot(*_series(run, metric), style, marker="o" if len(run.rounds) <= 30 else None, label=label)
    _round_axis(ax, run)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(run.title)
    ax.legend()
    return fig


def plot_per_class(run: RunData) -> Any | None:
    """Last-round accuracy of each class against its training count: how accuracy follows the long tail."""
    counts = run.config.get("class_counts") or []
    last = next((r for r in reversed(run.rounds) if r.get("per_class_accuracy")), None)
    if last is None or len(counts) != len(last["per_class_accuracy"]):
        return None
    accuracy = [100 * float(a) if a is not None else float("nan") for a in last["per_class_accuracy"]]
    tail = set(run.config.get("tail_classes", []))
    fig, ax = _figure()
    for is_tail, label, color in ((False, "head classes", "tab:blue"), (True, "tail classes", "tab:red")):
        classes = [c for c in range(len(counts)) if (c in tail) == is_tail]
        if classes:
            ax.scatter([counts[c] for c in classes], [accuracy[c] for c in classes], color=color, label=label)
    if len(counts) <= MAX_CLASS_LABELS:
        for c, (x, y) in enumerate(zip(counts, accuracy, strict=True)):
            ax.annotate(str(c), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if last.get("accuracy") is not None:
        ax.axhline(100 * last["accuracy"], color="gray", linestyle=":", label="balanced accuracy")
    ax.set_xscale("log")
    ax.set_xlabel("training samples of the class (log scale)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{run.title}: per-class accuracy, {run.x_label} {last['round']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def _class_colors(num_classes: int) -> list[Any]:
    from matplotlib import colormaps

    name = "tab10" if num_classes <= 10 else "tab20" if num_classes <= 20 else "turbo"
    cmap = colormaps[name]
    return [cmap(c if num_classes <= 20 else c / max(1, num_classes - 1)) for c in range(num_classes)]


def _split_text(rc: dict[str, Any]) -> str:
    partition = str(rc.get("partition", "?"))
    return partition if partition in ("iid", "writers") else f"{partition}, α = {rc.get('dirichlet-alpha', '?')}"


def plot_partition(run: RunData) -> Any | None:
    """Samples per client and class: stacked bars (x = client), a heat map beyond :data:`MAX_BARS` clients."""
    matrix = run.config.get("client_class_counts")
    if not matrix:
        return None
    num_clients, num_classes = len(matrix), len(matrix[0])
    title = f"{run.title}: training samples per client and class ({_split_text(run.run_config)})"
    if num_clients > MAX_BARS:
        return _partition_heat_map(matrix, title)
    fig, ax = _figure(width=min(24.0, max(8.0, 0.25 * num_clients + 3)))
    bottom = [0] * num_clients
    for c, color in enumerate(_class_colors(num_classes)):
        column = [row[c] for row in matrix]
        ax.bar(range(num_clients), column, bottom=bottom, color=color, width=0.8, label=str(c))
        bottom = [b + v for b, v in zip(bottom, column, strict=True)]
    if num_clients <= 40:
        ax.set_xticks(range(num_clients))
    ax.set_xlabel("client (partition id)")
    ax.set_ylabel("training samples")
    ax.set_title(title)
    ax.legend(title="class", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small",
              ncols=max(1, -(-num_classes // 25)))
    return fig


def _partition_heat_map(matrix: Sequence[Sequence[int]], title: str) -> Any:
    import numpy as np
    from matplotlib.colors import LogNorm

    fig, ax = _figure(width=12.0)
    counts = np.ma.masked_equal(np.asarray(matrix).T, 0)  # zeros stay blank: most of a skewed split
    image = ax.imshow(counts, aspect="auto", interpolation="nearest", norm=LogNorm(), cmap="viridis")
    fig.colorbar(image, ax=ax, label="training samples (log scale)")
    if counts.shape[0] <= MAX_CLASS_LABELS:
        ax.set_yticks(range(counts.shape[0]))
    ax.set_xlabel("client (partition id)")
    ax.set_ylabel("class")
    ax.set_title(title)
    return fig


PLOTS: dict[str, Callable[[RunData], Any | None]] = {CURVES: plot_curves, PER_CLASS: plot_per_class,
                                                     PARTITION: plot_partition}


def write_pictures(run: RunData, log: Callable[[str], None] = print) -> list[Path]:
    """Draw the run's pictures into its folder; a picture whose data is missing is skipped with a line."""
    written = []
    for name, plot in PLOTS.items():
        fig = plot(run)
        if fig is None:
            log(f"[fedlt] {run.dir}: no {name} (it needs {NEEDS[name]})")
            continue
        fig.savefig(run.dir / name, dpi=DPI)
        written.append(run.dir / name)
    return written


def draw_run(run_dir: str | Path, log: Callable[[str], None] = print) -> list[Path]:
    """Write curves.png, per_class.png and partition.png into ``run_dir``; [] (and one line) without matplotlib."""
    if not has_matplotlib():
        log(MISSING_MATPLOTLIB)
        return []
    return write_pictures(load_run(run_dir), log)


def plot_overlay(runs: Sequence[RunData], from_round: int = 1) -> Any:
    """Balanced (left) and tail (right) accuracy per round of several runs, labelled by run folder.

    ``from_round`` > 1 draws only the rounds from there on, so the accuracy axis spans the converged part, where
    converged methods differ by a point or two, not the warm-up's 0-90 %."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13.0 + (2.5 if len(runs) > 4 else 0.0), 5.0), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, metric, title in zip(axes, ("accuracy", "tail_accuracy"), ("balanced accuracy", "tail accuracy"),
                                 strict=True):
        for i, run in enumerate(runs):
            rounds, values = _series(run, metric)
            kept = [(r, v) for r, v in zip(rounds, values, strict=True) if r >= from_round]
            ax.plot([r for r, _ in kept], [v for _, v in kept], label=run.dir.name, **line_style(i))
        _round_axis(ax, runs[0])
        ax.set_title(title)
    axes[0].set_ylabel("accuracy (%)")
    if len(runs) > 4:
        legend_outside(fig, axes[0])
    else:
        axes[0].legend(fontsize="small")
    return fig


def overlay(run_dirs: Sequence[str | Path], out_path: str | Path, from_round: int = 1) -> Path:
    """Write the overlay of several runs' curves (from round ``from_round`` on) to ``out_path``."""
    out = Path(out_path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_overlay([load_run(d) for d in run_dirs], from_round).savefig(out, dpi=DPI)
    return out


# --------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedlt-report",
        description="Redraw each run's curves.png, per_class.png and partition.png; "
        "with two or more runs, also overlay their accuracy and tail accuracy curves.",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a run's results folder (<output-dir>/<run>)")
    parser.add_argument("--output", "-o", default="overlay.png", help="the overlay figure (default: ./overlay.png)")
    parser.add_argument("--from-round", type=int, default=1, metavar="N",
                        help="overlay only rounds N and later, e.g. the converged part (default: 1, every round)")
    args = parser.parse_args(argv)
    if args.from_round < 1:
        parser.error(f"--from-round must be a round number >= 1, got {args.from_round}")
    try:
        runs = [load_run(d) for d in args.run_dirs]
    except RunDirError as err:
        print(f"fedlt-report: {err}", file=sys.stderr)
        return 2
    if not has_matplotlib():
        print(MISSING_MATPLOTLIB, file=sys.stderr)
        return 1
    for run in runs:
        for path in write_pictures(run, log=lambda line: print(line, file=sys.stderr)):
            print(path)
    if len(runs) >= 2:
        print(overlay([run.dir for run in runs], args.output, args.from_round))
    return 0


if __name__ == "__main__":
    sys.exit(main())
