"""The figures of a sweep's report: accuracy curves, per-class accuracy and ablation plots.

Written under ``results/<sweep>/plots/`` by :func:`write_plots` (see :mod:`fedlt_app.report` for the list).
Matplotlib is imported inside the functions, so reading results and writing tables need it not.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedlt_app.results import LAST_ROUNDS
from fedlt_app.run_plots import _figure, legend_outside, line_style
from fedlt_app.sweep_results import SweepResults, class_counts_of, last_class_means, last_mean, mean_std


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
        per_run = [means for means in (last_class_means(run.rounds) for run in runs) if means is not None]
        if per_run:
            out[row] = [sum(v) / len(v) for v in zip(*per_run, strict=False)]
    return out


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
