"""Tables and plots of a sweep's results, in the paper's layout.

A sweep folder (``results/<sweep>/``, written by ``fedlt-sweep``) holds
``sweep.json`` (the grid: every cell's name, grid values, seed and run config)
and ``runs/<cell-name>[-retry<k>]/`` (each run's ``config.json``,
``metrics.jsonl`` and ``summary.json``, as the app writes them). This module
reads them and writes, next to them:

- ``table.md``: one section per metric (balanced, tail, many-, medium- and
  few-shot accuracy); rows are the sweep's row key (methods), columns its
  settings (every other grid key); each entry is the last-10-round mean of a
  run, in percent, as mean ± std over the seeds (sample std, ddof = 1);
- ``table.csv`` (balanced accuracy), ``table-tail.csv``, ``table-many.csv``,
  ``table-medium.csv``, ``table-few.csv``: the same tables; ``runs.csv``: one
  line per cell with the numbers behind them;
- ``plots/accuracy-<setting>.png``: accuracy per round of every row (method),
  mean over seeds (the paper's Figure 2), with a zoom on the last half of the rounds for runs of 20 or more;
  ``plots/per-class-<setting>.png``: per-class last-10-round accuracy, bars per row (a rows × classes map
  beyond six rows); for a sweep with an
  ``ablation`` key, ``plots/ablation-<key>-<setting>.png`` (curves grouped by
  the ablated key, Figures 3-5) and, for numeric values,
  ``plots/ablation-<key>-final-<setting>.png`` (last-10 accuracy against it).

Only runs whose ``summary.json`` says ``completed`` enter the tables and
plots; an entry with fewer seeds than planned says so, e.g. ``(2/3 seeds)``.
Matplotlib is needed for the plots only (``pip install -e '.[dev]'``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlt_app.results import LAST_ROUNDS
from fedlt_app.run_folder import completed, run_status
from fedlt_app.run_plots import VALUE_NAMES, _figure, legend_outside, line_style, read_rounds

DDOF = 1  # std over seeds: the sample standard deviation (n - 1); one seed shows no ±


@dataclass(frozen=True)
class Metric:
    key: str  # the metrics.jsonl field
    title: str
    stem: str  # file name of its csv table


METRICS = (
    Metric("accuracy", "Balanced accuracy", "table"),
    Metric("tail_accuracy", "Tail accuracy (the 30% of classes with the fewest training samples)", "table-tail"),
    Metric("many_shot_accuracy", "Many-shot accuracy (classes with > 100 training samples)", "table-many"),
    Metric("medium_shot_accuracy", "Medium-shot accuracy (20-100 training samples)", "table-medium"),
    Metric("few_shot_accuracy", "Few-shot accuracy (< 20 training samples)", "table-few"),
)
PAIRED_METRICS = METRICS[:2]  # balanced and tail accuracy
AXIS_NAMES = {
    "imbalance-ratio": "IR",
    "dirichlet-alpha": "α",
    "rebalance-lambda": "λ",
    "balance-threshold": "T",
    "num-clients": "clients",
    "clients-per-round": "per round",
    "server-opt": "server",
    "imbalance-profile": "profile",
}
SAFE = re.compile(r"[^A-Za-z0-9._-]+")


class ReportError(ValueError):
    """A folder that holds no sweep results."""


def value_text(value: Any) -> str:
    """How a grid value reads in names and labels: 10.0 -> '10', True -> 'true'."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
    return str(value)


# ------------------------------------------------------------ runs on disk


def retry_index(dirname: str, name: str) -> int:
    """0 for ``name`` itself, k for ``name-retry<k>``, -1 for anything else."""
    if dirname == name:
        return 0
    match = re.fullmatch(re.escape(name) + r"-retry(\d+)", dirname)
    return int(match.group(1)) if match else -1


def attempts(runs_dir: Path, name: str) -> list[Path]:
    """The run directories of one cell, oldest attempt first."""
    if not runs_dir.is_dir():
        return []
    found = [p for p in runs_dir.iterdir() if p.is_dir() and retry_index(p.name, name) >= 0]
    return sorted(found, key=lambda p: retry_index(p.name, name))


def completed_attempt(runs_dir: Path, name: str) -> Path | None:
    done = [p for p in attempts(runs_dir, name) if completed(p)]
    return done[-1] if done else None


@dataclass
class Run:
    cell: dict[str, Any]  # the cell's entry in sweep.json
    dir: Path
    rounds: list[dict[str, Any]]
    config: dict[str, Any]

    @property
    def coords(self) -> dict[str, str]:
        return {k: value_text(v) for k, v in self.cell["coords"].items()}


@dataclass
class SweepResults:
    root: Path
    meta: dict[str, Any]
    runs: dict[str, Run]  # cell name -> its completed run
    status: dict[str, str]  # cell name -> completed / partial / failed / not run

    @property
    def name(self) -> str:
        return str(self.meta["name"])

    @property
    def cells(self) -> list[dict[str, Any]]:
        return list(self.meta["cells"])

    @property
    def row_keys(self) -> list[str]:
        return list(self.meta["rows"])

    @property
    def column_keys(self) -> list[str]:
        return list(self.meta["columns"])

    @property
    def ablation(self) -> str | None:
        return self.meta.get("ablation")

    def coords(self, cell: dict[str, Any], keys: Sequence[str]) -> tuple[str, ...]:
        return tuple(value_text(cell["coords"][k]) for k in keys)

    def values(self, keys: Sequence[str]) -> list[tuple[str, ...]]:
        """The distinct combinations of ``keys`` among the cells, in grid order."""
        return list(dict.fromkeys(self.coords(c, keys) for c in self.cells))

    @property
    def rows(self) -> list[tuple[str, ...]]:
        return self.values(self.row_keys)

    @property
    def columns(self) -> list[tuple[str, ...]]:
        return self.values(self.column_keys)

    def is_bundle(self, key: str) -> bool:
        return any(a["key"] == key and a.get("bundle") for a in self.meta.get("axes", []))

    def axis_label(self, key: str) -> str:
        return self.meta.get("axis_labels", {}).get(key) or AXIS_NAMES.get(key, key)

    def coord_label(self, key: str, text: str) -> str:
        named = self.meta.get("value_labels", {}).get(key, {}).get(text) or VALUE_NAMES.get(key, {}).get(text)
        if named:
            return named
        return text if self.is_bundle(key) else f"{self.axis_label(key)}={text}"

    def label(self, keys: Sequence[str], values: Sequence[str], sep: str = ", ") -> str:
        return sep.join(self.coord_label(k, v) for k, v in zip(keys, values, strict=True)) or self.name

    def row_label(self, row: Sequence[str]) -> str:
        return self.label(self.row_keys, row, " / ")

    def column_label(self, column: Sequence[str]) -> str:
        return self.label(self.column_keys, column)

    def cells_at(self, *match: tuple[Sequence[str], Sequence[str]]) -> list[dict[str, Any]]:
        """Cells whose values of each given (keys, values) pair are those values."""
        return [c for c in self.cells if all(self.coords(c, ks) == tuple(vs) for ks, vs in match)]

    def runs_at(self, keys: Sequence[str], values: Sequence[str]) -> list[Run]:
        return [self.runs[c["name"]] for c in self.cells_at((keys, values)) if c["name"] in self.runs]

    def slug(self, keys: Sequence[str], values: Sequence[str]) -> str:
        """A file-name part for a setting, spelled like cell names: ``imbalance-ratio-10``, a bundle's label."""
        parts = [v if self.is_bundle(k) else f"{k}-{v}" for k, v in zip(keys, values, strict=True)]
        return SAFE.sub("_", "__".join(parts)) or "all"


def load(path: str | Path) -> SweepResults:
    """Read ``results/<sweep>/``: sweep.json and every cell's completed run."""
    root = Path(path).expanduser()
    try:
        meta = json.loads((root / "sweep.json").read_text())
    except OSError as err:
        raise ReportError(f"{root} holds no sweep results (no readable sweep.json; run fedlt-sweep first)") from err
    runs_dir = root / "runs"
    runs: dict[str, Run] = {}
    status: dict[str, str] = {}
    for cell in meta["cells"]:
        name = cell["name"]
        done = completed_attempt(runs_dir, name)
        if done is not None:
            config = _read_json(done / "config.json")
            runs[name] = Run(cell, done, read_rounds(done), config)
            status[name] = "completed"
        else:
            tried = attempts(runs_dir, name)
            status[name] = "not run" if not tried else (run_status(tried[-1]) or "partial")
    return SweepResults(root, meta, runs, status)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# ------------------------------------------------------------------ tables


def last_mean(rounds: Sequence[dict[str, Any]], metric: str, last: int = LAST_ROUNDS) -> float | None:
    """Mean of ``metric`` over the run's last ``last`` rounds (skipping nulls); None if it has none."""
    values = [r[metric] for r in rounds[-last:] if r.get(metric) is not None]
    return sum(values) / len(values) if values else None


@dataclass(frozen=True)
class Stat:
    mean: float | None  # fractions, not percent
    std: float | None
    n: int  # seeds with a finished run
    planned: int  # seeds in the sweep
    values: tuple[float, ...] = ()


def mean_std(values: Sequence[float], ddof: int = DDOF) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) <= ddof:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - ddof))


def stat(res: SweepResults, row: Sequence[str], column: Sequence[str], metric: str) -> Stat:
    cells = res.cells_at((res.row_keys, row), (res.column_keys, column))
    runs = [res.runs[c["name"]] for c in cells if c["name"] in res.runs]
    values = [v for v in (last_mean(r.rounds, metric) for r in runs) if v is not None]
    mean, std = mean_std(values)
    return Stat(mean, std, len(runs), len(cells), tuple(values))


def format_stat(s: Stat) -> str:
    """Percent with 2 decimals: '95.73 ± 0.46'; '—' before any run finished; 'n/a' for an empty class group."""
    if s.planned == 0:
        return ""
    if s.n == 0:
        return "—"
    if s.mean is None:
        return "n/a"
    text = f"{100 * s.mean:.2f}" + (f" ± {100 * s.std:.2f}" if s.std is not None else "")
    return text if s.n == s.planned else f"{text} ({s.n}/{s.planned} seeds)"


def table(res: SweepResults, metric: str = "accuracy") -> list[list[str]]:
    """The paper's layout: a header line, then one line per row (method); each entry a formatted :class:`Stat`."""
    header = [" / ".join(res.axis_label(k) for k in res.row_keys)] + [res.column_label(c) for c in res.columns]
    lines = [header]
    for row in res.rows:
        stats = [stat(res, row, column, metric) for column in res.columns]
        if all(s.planned == 0 for s in stats):
            continue
        lines.append([res.row_label(row)] + [format_stat(s) for s in stats])
    return lines


def last10_drift(rounds: Sequence[dict[str, Any]], metric: str, window: int = LAST_ROUNDS) -> float | None:
    """How far the last-10 mean moved over the run's final 10 rounds: mean(last 10) − mean(the 10 before).

    The convergence test of a protocol: a run has converged when adding ten
    more rounds moves this by less than a point. None for runs shorter than 2 windows.
    """
    values = [r.get(metric) for r in rounds]
    if len(values) < 2 * window or any(v is None for v in values[-2 * window :]):
        return None
    return (sum(values[-window:]) - sum(values[-2 * window : -window])) / window


def plateau_round(rounds: Sequence[dict[str, Any]], metric: str, tolerance: float = 0.01,
                  window: int = LAST_ROUNDS) -> int | None:
    """The smallest N from which the last-10 mean at N and at N+10 stay within ``tolerance`` for every later N.

    None if even the run's last comparable N moves by more (the run has not converged).
    """
    values = [r.get(metric) for r in rounds]
    if any(v is None for v in values):
        return None
    means = {n: sum(values[n - window : n]) / window for n in range(window, len(values) + 1)}
    candidates = [n for n in means if n + window in means]
    plateau = None
    for n in reversed(candidates):
        if abs(means[n + window] - means[n]) >= tolerance:
            break
        plateau = n
    return plateau


def convergence_table(res: SweepResults) -> list[list[str]]:
    """Per run: rounds, last-10 drift over the final 10 rounds, and the plateau round, balanced and tail."""
    lines = [["run", "rounds", "last-10 drift, balanced (points)", "last-10 drift, tail (points)",
              "plateau N, balanced", "plateau N, tail"]]
    for name, run in res.runs.items():
        cells = [name, str(len(run.rounds))]
        for metric in ("accuracy", "tail_accuracy"):
            drift = last10_drift(run.rounds, metric)
            cells.append("—" if drift is None else f"{100 * drift:+.2f}")
        for metric in ("accuracy", "tail_accuracy"):
            n = plateau_round(run.rounds, metric)
            cells.append("not reached" if n is None else str(n))
        lines.append(cells)
    return lines


def paired_reference(res: SweepResults) -> tuple[str, str] | None:
    """The sweep's ``paired`` (grid key, reference value), if it names one."""
    paired = res.meta.get("paired")
    return (str(paired["key"]), str(paired["reference"])) if paired else None


def partner(res: SweepResults, cell: dict[str, Any], key: str, reference: str) -> dict[str, Any] | None:
    """The cell with the same grid values and seed as ``cell``, but ``key`` at the reference value."""
    want = {k: value_text(v) for k, v in cell["coords"].items()} | {key: reference}
    for other in res.cells:
        if other["seed"] == cell["seed"] and {k: value_text(v) for k, v in other["coords"].items()} == want:
            return other
    return None


def paired_stat(res: SweepResults, row: Sequence[str], column: Sequence[str], metric: str) -> Stat | None:
    """Per seed, this entry's last-10 mean minus its partner's at the reference; None for the reference itself.

    Only seeds where both runs completed count; ``values`` holds the per-seed differences.
    """
    key, reference = paired_reference(res) or ("", "")
    cells = res.cells_at((res.row_keys, row), (res.column_keys, column))
    if not cells or any(value_text(c["coords"][key]) == reference for c in cells):
        return None
    diffs = []
    for cell in cells:
        other = partner(res, cell, key, reference)
        if other is None or cell["name"] not in res.runs or other["name"] not in res.runs:
            continue
        mine = last_mean(res.runs[cell["name"]].rounds, metric)
        theirs = last_mean(res.runs[other["name"]].rounds, metric)
        if mine is not None and theirs is not None:
            diffs.append(mine - theirs)
    mean, std = mean_std(diffs)
    return Stat(mean, std, len(diffs), len(cells), tuple(diffs))


NEEDS_SEEDS = "‡"  # the paired difference is smaller than its spread over seeds: run more seeds


def format_difference(s: Stat) -> str:
    """'+0.52 ± 0.31 (3/3 > 0)': points, sample std over seeds, how many seeds agree in sign with the mean."""
    if s.n == 0 or s.mean is None:
        return "—"
    text = f"{100 * s.mean:+.2f}" + (f" ± {100 * s.std:.2f}" if s.std is not None else "")
    agree = sum(d > 0 for d in s.values) if s.mean >= 0 else sum(d < 0 for d in s.values)
    sign = ">" if s.mean >= 0 else "<"
    text += f" ({agree}/{s.n} {sign} 0)"
    if s.std is not None and abs(s.mean) < s.std:
        text += f" {NEEDS_SEEDS}"
    return text if s.n == s.planned else f"{text} ({s.n}/{s.planned} seeds paired)"


def paired_table(res: SweepResults, metric: str = "accuracy") -> list[list[str]]:
    """The table's layout without the reference entries; each entry a paired difference to the reference."""
    header = [" / ".join(res.axis_label(k) for k in res.row_keys)]
    columns = [c for c in res.columns if any(paired_stat(res, r, c, metric) for r in res.rows)]
    header += [res.column_label(c) for c in columns]
    lines = [header]
    for row in res.rows:
        stats = [paired_stat(res, row, column, metric) for column in columns]
        if all(s is None for s in stats):
            continue
        lines.append([res.row_label(row)] + ["" if s is None else format_difference(s) for s in stats])
    return lines


def markdown_table(lines: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(lines[0]) + " |", "|" + "---|" * len(lines[0])]
    out += ["| " + " | ".join(line) + " |" for line in lines[1:]]
    return "\n".join(out)


def markdown(res: SweepResults) -> str:
    """table.md: every metric's table, how the numbers were made, and which cells are finished."""
    seeds = res.meta.get("seeds", [])
    done = sum(s == "completed" for s in res.status.values())
    parts = [f"# {res.name}"]
    if res.meta.get("description"):
        parts.append(res.meta["description"])
    parts.append(
        f"Each entry: the mean over the last {LAST_ROUNDS} rounds of a run (fewer if it ran fewer), in percent, "
        f"as mean ± std over {len(seeds)} seed(s) {seeds} (sample std, ddof = {DDOF}; one seed shows no ±). "
        f"Only completed runs count: {done}/{len(res.status)} cells. "
        "'—': no completed run yet; '(k/n seeds)': only k of n seeds completed; "
        "'n/a': the class group is empty in this setting."
    )
    for metric in METRICS:
        parts.append(f"## {metric.title}\n\n{markdown_table(table(res, metric.key))}")
    paired = paired_reference(res)
    if paired:
        key, reference = paired
        parts.append(
            f"## Paired differences to {res.coord_label(key, reference)}\n\n"
            f"Per seed, a run's last-{LAST_ROUNDS} mean minus that of the run with the same seed and grid values but "
            f"{res.axis_label(key)} = {reference} (same data, initialisation, cohorts and batches); in points, "
            f"mean ± sample std over the paired seeds, and how many seeds share the mean's sign; "
            f"{NEEDS_SEEDS}: the mean difference is smaller than its spread, so this comparison needs more seeds."
        )
        for metric in PAIRED_METRICS:
            parts.append(f"### {metric.title}\n\n{markdown_table(paired_table(res, metric.key))}")
    if any(len(run.rounds) >= 2 * LAST_ROUNDS for run in res.runs.values()):
        parts.append(
            "## Convergence\n\n"
            f"Last-{LAST_ROUNDS} drift: a run's mean over its final {LAST_ROUNDS} rounds minus the mean over the "
            f"{LAST_ROUNDS} before (in points): what ten more rounds moved the table's entry. Plateau N: the smallest "
            f"N from which the last-{LAST_ROUNDS} mean at N and at N+{LAST_ROUNDS} stay within one point for every "
            f"later N of the run.\n\n" + markdown_table(convergence_table(res))
        )
    if res.runs:
        parts.append(machines_section(res))
    unfinished = {n: s for n, s in res.status.items() if s != "completed"}
    if unfinished:
        parts.append("## Unfinished cells\n\n" + "\n".join(f"- `{n}`: {s}" for n, s in unfinished.items()))
    return "\n\n".join(parts) + "\n"


NOT_RECORDED = "not recorded (runs made before fedlt kept the server's machine)"


def machine_label(config: dict[str, Any]) -> str:
    """Where a run computed, as far as float rounding goes: the CPU and the kernels torch picked, or the GPU;
    a run resumed on other machines names each with the round it took over from (``machine_history``)."""
    history = config.get("machine_history") or []
    labels = [(h["from_round"], _one_machine(h["server_machine"], config)) for h in history]
    if len({label for _, label in labels}) > 1:
        return "; ".join(f"{label} from round {start}" for start, label in labels)
    return _one_machine(config.get("server_machine"), config)


def _one_machine(machine: dict[str, Any] | None, config: dict[str, Any]) -> str:
    if not machine:
        return NOT_RECORDED
    label = f"{machine.get('cpu') or '?'} ({machine.get('cpu_capability') or '?'}), torch {machine.get('torch')}"
    if str(config.get("server_device", "cpu")).startswith("cuda"):
        label += f", GPU {machine.get('cuda_device') or '?'}"
    return label


def machines_of(configs: Mapping[str, dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """(machine, the runs computed there) from run name -> config.json, the machine with most runs first."""
    where: dict[str, list[str]] = {}
    for name, config in configs.items():
        where.setdefault(machine_label(config), []).append(name)
    return sorted(where.items(), key=lambda item: (-len(item[1]), item[0]))


def machines(res: SweepResults) -> list[tuple[str, list[str]]]:
    """(machine, the completed runs computed there), the machine with most runs first."""
    return machines_of({name: run.config for name, run in res.runs.items()})


def machines_lines(configs: Mapping[str, dict[str, Any]], heading: str = "## Machines") -> list[str]:
    """A results table's account of where its runs computed: runs of one seed on other kernels differ in
    rounding, so a table that mixes machines says so."""
    found = machines_of(configs)
    lines = [heading, "",
             "Where each completed run computed (the server process; a simulation's clients run there too)."]
    if len(found) > 1:
        lines.append("Runs paired across machines still share data, initialisation, cohorts and batches, but not "
                     "float rounding (other kernels), so their paired differences include it.")
    lines.append("")
    for label, names in found:
        shown = ", ".join(f"`{n}`" for n in names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
        lines.append(f"- {label}: {len(names)} run(s): {shown}")
    return lines


def machines_section(res: SweepResults) -> str:
    """table.md's Machines section."""
    return "\n".join(machines_lines({name: run.config for name, run in res.runs.items()}))


def _csv_text(lines: Iterable[Sequence[Any]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(lines)
    return buf.getvalue()


def runs_table(res: SweepResults) -> list[list[Any]]:
    """runs.csv: one line per cell, raw grid values and the run's numbers (fractions)."""
    axes = [a["key"] for a in res.meta.get("axes", [])]
    header = ["cell", "status", "run_dir", *axes, "seed", "rounds",
              *[f"last{LAST_ROUNDS}_{m.key}" for m in METRICS], "final_accuracy", "total_seconds"]
    lines: list[list[Any]] = [header]
    for cell in res.cells:
        run = res.runs.get(cell["name"])
        values: list[Any] = [cell["name"], res.status[cell["name"]], run.dir.name if run else ""]
        values += [value_text(cell["coords"][k]) for k in axes] + [cell["seed"]]
        if run:
            values += [len(run.rounds)] + [last_mean(run.rounds, m.key) for m in METRICS]
            values += [run.rounds[-1]["accuracy"] if run.rounds else None,
                       sum(r.get("round_seconds", 0.0) for r in run.rounds)]
        else:
            values += [""] * (len(METRICS) + 3)
        lines.append(["" if v is None else v for v in values])
    return lines


def write_tables(res: SweepResults) -> list[Path]:
    written = [res.root / "table.md"]
    written[0].write_text(markdown(res))
    for metric in METRICS:
        path = res.root / f"{metric.stem}.csv"
        path.write_text(_csv_text(table(res, metric.key)))
        written.append(path)
    if paired_reference(res):
        for metric in PAIRED_METRICS:
            path = res.root / f"{metric.stem}-paired.csv"
            path.write_text(_csv_text(paired_table(res, metric.key)))
            written.append(path)
    path = res.root / "runs.csv"
    path.write_text(_csv_text(runs_table(res)))
    return [*written, path]


# ------------------------------------------------------------------- plots




def curves(
    res: SweepResults, setting_keys: Sequence[str], setting: Sequence[str], curve_keys: Sequence[str],
    metric: str = "accuracy",
) -> dict[tuple[str, ...], tuple[list[int], list[float]]]:
    """Per curve (values of ``curve_keys``): rounds and the mean of ``metric`` over the seeds' runs."""
    out = {}
    for curve in res.values(curve_keys):
        runs = [res.runs[c["name"]] for c in res.cells_at((setting_keys, setting), (curve_keys, curve))
                if c["name"] in res.runs]
        by_round: dict[int, list[float]] = {}
        for run in runs:
            for r in run.rounds:
                if r.get(metric) is not None:
                    by_round.setdefault(int(r["round"]), []).append(float(r[metric]))
        if by_round:
            xs = sorted(by_round)
            out[curve] = (xs, [sum(by_round[x]) / len(by_round[x]) for x in xs])
    return out


ZOOM_FROM_ROUNDS = 20  # curves this long get a second panel with their last half, where methods settle
MANY_LINES = 6  # above this many curves or bar groups the legend goes outside the axes (and bars become a map)


def plot_curves(
    res: SweepResults, column: Sequence[str], metric: str = "accuracy",
    setting_keys: Sequence[str] | None = None, curve_keys: Sequence[str] | None = None, title: str = "",
):  # type: ignore[no-untyped-def]
    """Accuracy per round, one curve per row (method), mean over seeds (the paper's Figure 2).

    Runs of 20 rounds or more get a right-hand panel with their last half, its y-axis fitted to what the
    curves do there: the whole-run axis spans the first rounds' 10-30 %, which flattens the plateau where
    methods are told apart into a few pixels.
    """
    setting_keys = res.column_keys if setting_keys is None else list(setting_keys)
    curve_keys = res.row_keys if curve_keys is None else list(curve_keys)
    drawn = curves(res, setting_keys, column, curve_keys, metric)
    last_round = max((xs[-1] for xs, _ in drawn.values()), default=0)
    zoom = last_round >= ZOOM_FROM_ROUNDS
    many = len(drawn) > MANY_LINES
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8.0 + (5.5 if zoom else 0.0) + (3.0 if many else 0.0), 5.0), layout="constrained")
    axes = fig.subplots(1, 2) if zoom else [fig.add_subplot()]
    start = last_round // 2 + 1
    for i, (curve, (xs, ys)) in enumerate(drawn.items()):
        label = res.label(curve_keys, curve, " / ")
        axes[0].plot(xs, [100 * y for y in ys], label=label, **line_style(i))
        if zoom:
            late = [(x, 100 * y) for x, y in zip(xs, ys, strict=True) if x >= start]
            if late:
                axes[1].plot(*zip(*late, strict=True), **line_style(i))
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("communication round")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{metric.replace('_', ' ')} (%)")
    if zoom:
        axes[1].set_title(f"rounds {start}-{last_round}", fontsize="medium")
    fig.suptitle(title or f"{res.name}: {res.label(setting_keys, column)} (mean over seeds)")
    if many:
        legend_outside(fig, axes[0])
    elif axes[0].lines:
        axes[0].legend()
    return fig


def per_class_means(res: SweepResults, column: Sequence[str]) -> dict[tuple[str, ...], list[float]]:
    """Per row (method): each class's last-10-round mean accuracy (the tables' statistic), mean over seeds."""
    out: dict[tuple[str, ...], list[float]] = {}
    for row in res.rows:
        runs = [res.runs[c["name"]] for c in res.cells_at((res.row_keys, row), (res.column_keys, column))
                if c["name"] in res.runs and res.runs[c["name"]].rounds]
        per_run = []
        for run in runs:
            last = [r["per_class_accuracy"] for r in run.rounds[-LAST_ROUNDS:] if r.get("per_class_accuracy")]
            if last:
                per_run.append([sum(v) / len(v) for v in zip(*last, strict=True)])
        if per_run:
            out[row] = [sum(v) / len(v) for v in zip(*per_run, strict=False)]
    return out


def class_counts_of(res: SweepResults, column: Sequence[str]) -> list[int] | None:
    """The training count of each class (``config.json``'s ``class_counts``) of the column's runs, if recorded."""
    for c in res.cells_at((res.column_keys, column)):
        run = res.runs.get(c["name"])
        if run is not None and run.config.get("class_counts"):
            return [int(n) for n in run.config["class_counts"]]
    return None


def plot_per_class(res: SweepResults, column: Sequence[str]):  # type: ignore[no-untyped-def]
    """Per-class accuracy (last-10-round mean, mean over seeds) of every row (method).

    Up to six rows: grouped bars per class. More: a rows × classes map with each value written in its cell,
    since seventeen bars per class are too thin to tell apart and a map reads row by row like the tables.
    """
    values = per_class_means(res, column)
    num_classes = max((len(v) for v in values.values()), default=0)
    counts = class_counts_of(res, column)
    class_labels = [f"{c}\n({counts[c]:,})" if counts and c < len(counts) else str(c) for c in range(num_classes)]
    title = (f"{res.name}: per-class accuracy, last-{LAST_ROUNDS}-round mean, {res.column_label(column)}"
             " (mean over seeds)")
    if len(values) > MANY_LINES and num_classes <= 30:
        return _per_class_map(res, values, class_labels, title)
    fig, ax = _figure(width=min(30.0, max(8.0, 0.35 * num_classes * max(1, len(values)) / 3)))
    width = 0.8 / max(1, len(values))
    for i, (row, row_values) in enumerate(values.items()):
        xs = [c + (i - (len(values) - 1) / 2) * width for c in range(len(row_values))]
        ax.bar(xs, [100 * v for v in row_values], width=width, label=res.row_label(row), color=f"C{i % 10}")
    ax.set_xlabel("class (training images; 0 = head, the long-tail profile shrinks later classes)")
    ax.set_ylabel(f"last-{LAST_ROUNDS}-round accuracy (%)")
    if num_classes <= 30:
        ax.set_xticks(range(num_classes), labels=class_labels)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    if values:
        ax.legend(fontsize="small")
    return fig


def _per_class_map(res: SweepResults, values: Mapping[tuple[str, ...], list[float]], class_labels: list[str],
                   title: str):  # type: ignore[no-untyped-def]
    rows = list(values)
    grid = [[100 * v for v in values[row]] + [math.nan] * (len(class_labels) - len(values[row])) for row in rows]
    fig, ax = _figure(width=max(8.0, 3.5 + 0.8 * len(class_labels)), height=max(4.0, 1.2 + 0.38 * len(rows)))
    image = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=100.0, aspect="auto")
    for r, line in enumerate(grid):
        for c, v in enumerate(line):
            if not math.isnan(v):
                ax.text(c, r, f"{v:.0f}", ha="center", va="center", fontsize="small",
                        color="black" if v >= 60 else "white")
    ax.set_xticks(range(len(class_labels)), labels=class_labels)
    ax.set_yticks(range(len(rows)), labels=[res.row_label(row) for row in rows])
    ax.set_xlabel("class (training images; 0 = head, the long-tail profile shrinks later classes)")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    return fig


def ablation_keys(res: SweepResults) -> tuple[list[str], list[str]]:
    """(setting keys, curve keys) of the ablation plots: curves grouped by the ablated key."""
    key = res.ablation
    assert key is not None
    setting_keys = [k for k in res.column_keys if k != key]
    curve_keys = list(res.row_keys) + ([key] if key not in res.row_keys else [])
    return setting_keys, curve_keys


def plot_ablation(res: SweepResults, setting: Sequence[str]):  # type: ignore[no-untyped-def]
    """Accuracy per round grouped by the ablated key (the paper's Figures 3-5)."""
    setting_keys, curve_keys = ablation_keys(res)
    where = f", {res.label(setting_keys, setting)}" if setting_keys else ""
    title = f"{res.name}: ablation of {res.axis_label(str(res.ablation))}{where} (mean over seeds)"
    return plot_curves(res, setting, "accuracy", setting_keys, curve_keys, title)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def plot_ablation_final(res: SweepResults, setting: Sequence[str]):  # type: ignore[no-untyped-def]
    """Last-10 accuracy (mean ± std over seeds) against a numeric ablated value (Figure 5); None if not numeric."""
    key = str(res.ablation)
    setting_keys, curve_keys = ablation_keys(res)
    values = [v[0] for v in res.values([key])]
    if any(_number(v) is None for v in values):
        return None
    line_keys = [k for k in curve_keys if k != key]
    fig, ax = _figure()
    for line in res.values(line_keys):
        xs, ys, es = [], [], []
        for v in values:
            cells = res.cells_at((setting_keys, setting), (line_keys, line), ([key], [v]))
            runs = [res.runs[c["name"]] for c in cells if c["name"] in res.runs]
            mean, std = mean_std([m for m in (last_mean(r.rounds, "accuracy") for r in runs) if m is not None])
            if mean is not None:
                xs.append(_number(v))
                ys.append(100 * mean)
                es.append(100 * (std or 0.0))
        if xs:
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=res.label(line_keys, line, " / "))
    numbers = [_number(v) for v in values]
    if all(x and x > 0 for x in numbers) and max(numbers) / min(numbers) >= 10:  # type: ignore[type-var, operator]
        ax.set_xscale("log")
        ax.minorticks_off()
    ax.set_xticks(numbers, labels=values)
    ax.set_xlabel(res.axis_label(key))
    ax.set_ylabel(f"last-{LAST_ROUNDS}-round accuracy (%)")
    where = f": {res.label(setting_keys, setting)}" if setting_keys else ""
    ax.set_title(f"{res.name}{where} (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    return fig


def figures(res: SweepResults) -> dict[str, Any]:
    """Every plot of the report, by file name under ``plots/``."""
    out: dict[str, Any] = {}
    for column in res.columns:
        out[f"accuracy-{res.slug(res.column_keys, column)}.png"] = plot_curves(res, column)
        out[f"per-class-{res.slug(res.column_keys, column)}.png"] = plot_per_class(res, column)
    if res.ablation:
        setting_keys, _ = ablation_keys(res)
        for setting in res.values(setting_keys):
            out[f"ablation-{res.ablation}-{res.slug(setting_keys, setting)}.png"] = plot_ablation(res, setting)
            final = plot_ablation_final(res, setting)
            if final is not None:
                out[f"ablation-{res.ablation}-final-{res.slug(setting_keys, setting)}.png"] = final
    return out


def png_bytes(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def write_plots(res: SweepResults, log: Callable[[str], None] = print) -> list[Path]:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log("[report] matplotlib is not installed: no plots (pip install matplotlib, or -e '.[dev]')")
        return []
    plots = res.root / "plots"
    plots.mkdir(exist_ok=True)
    written = []
    for name, fig in figures(res).items():
        fig.savefig(plots / name, dpi=110)
        written.append(plots / name)
    return written


def write_report(path: str | Path, log: Callable[[str], None] = print) -> list[Path]:
    """Write table.md, the csv tables and the plots of ``results/<sweep>/``; return their paths."""
    res = load(path)
    return write_tables(res) + write_plots(res, log)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m fedlt_app.report results/<sweep>", file=sys.stderr)
        return 2
    try:
        for written in write_report(args[0]):
            print(written)
    except ReportError as err:
        print(f"report: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
