"""Accuracy against labeled ratio per active-learning method, as mean ± std over seeds.

    python -m fedlt_app.active.plot RUN_DIR [RUN_DIR ...] -o results/fairfal/curves.png

Each RUN_DIR is a result folder of an ``al-method`` run (its config.json names
the method and the seed, its metrics.jsonl has one line per cycle). Runs of the
same method with different seeds are pooled: one curve (with a ±1 std band) and
one table column pair per method. Only completed runs count, so a comparison
that stopped midway reports what it finished. Needs matplotlib for the PNG (the
``dev`` extra).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlt_app.report import machines_lines
from fedlt_app.run_folder import completed
from fedlt_app.sweep_results import plateau_round

REFERENCE = "fairfal"  # the method the paired differences are taken against
METRICS = (("accuracy", "acc."), ("tail_accuracy", "tail"))  # metrics.jsonl key, column label

# ratio -> seed -> value (in percent): the shape every aggregate below is computed from
Curve = dict[float, dict[int, float]]


@dataclass(frozen=True)
class Run:
    """One run folder as read: method and seed identify it within a comparison."""

    path: Path
    method: str
    seed: int
    rows: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)  # config.json: where it computed, among the rest


def read_cycles(run_dir: Path) -> tuple[str, list[dict[str, Any]]]:
    """(al-method, per-cycle rows) of one run."""
    config = json.loads((run_dir / "config.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return str(config["run_config"]["al-method"]), rows


def read_run(run_dir: Path) -> Run:
    """One run with its seed, which pairs it with the other methods' runs of the same seed."""
    run_dir = Path(run_dir)
    method, rows = read_cycles(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    return Run(run_dir, method, int(config["run_config"]["seed"]), rows, config)


def completed_runs(run_dirs: Sequence[Path]) -> list[Run]:
    """The completed runs, in the given order; a method/seed given twice raises rather than count twice."""
    runs: list[Run] = []
    seen: dict[tuple[str, int], Path] = {}
    for run_dir in run_dirs:
        if not completed(Path(run_dir)):
            continue
        run = read_run(Path(run_dir))
        if (run.method, run.seed) in seen:
            raise ValueError(f"{run.method} seed {run.seed} twice: {seen[run.method, run.seed]} and {run.path}")
        seen[run.method, run.seed] = run.path
        runs.append(run)
    return runs


def by_method(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """Runs grouped by method, methods in order of first appearance (the column order)."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.method, []).append(run)
    return groups


def curve(runs: Sequence[Run], key: str) -> Curve:
    """Percent values of ``key`` per target ratio and seed.

    Keyed by the target ratio rounded to 2 decimals: the realised labeled ratio
    differs slightly between seeds, so it would not line the seeds' cycles up.
    """
    values: Curve = {}
    for run in runs:
        for row in run.rows:
            values.setdefault(round(float(row["target_ratio"]), 2), {})[run.seed] = 100 * float(row[key])
    return dict(sorted(values.items()))


def seed_means(runs: Sequence[Run], key: str) -> dict[int, float]:
    """Per seed, the mean over its cycles (percent): one number per seed, so seeds can be compared or paired."""
    return {run.seed: statistics.fmean(100 * float(row[key]) for row in run.rows) for run in runs if run.rows}


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample std (ddof=1); no std from a single value, where there is no spread to estimate."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def format_spread(values: Sequence[float], seeds_expected: int = 0, signed: bool = False) -> str:
    """``mean ± std`` with 2 decimals (just the mean for one value), ``(n=k)`` when fewer seeds than expected."""
    if not values:
        return ""
    mean, std = mean_std(values)
    text = f"{mean:+.2f}" if signed else f"{mean:.2f}"
    if std is not None:
        text += f" ± {std:.2f}"
    if len(values) < seeds_expected:
        text += f" (n={len(values)})"
    return text


def _seeds_line(groups: dict[str, list[Run]]) -> str:
    """Which seeds each column pools, so a reader knows what the ± stands on."""
    parts = [f"{method} {len(runs)} ({', '.join(str(r.seed) for r in sorted(runs, key=lambda r: r.seed))})"
             for method, runs in groups.items()]
    return "Seeds per method: " + "; ".join(parts) + "."


def _table(groups: dict[str, list[Run]]) -> list[str]:
    """The Markdown table: one row per target ratio, then the mean over ratios (per seed first, then over seeds)."""
    curves = {(m, key): curve(runs, key) for m, runs in groups.items() for key, _ in METRICS}
    ratios = sorted({ratio for c in curves.values() for ratio in c})
    header = "| labeled ratio | " + " | ".join(f"{m} {label}" for m in groups for _, label in METRICS) + " |"
    lines = [header, "|---" * (1 + len(METRICS) * len(groups)) + "|"]
    for ratio in ratios:
        cells = [format_spread(list(curves[m, key].get(ratio, {}).values()), len(groups[m]))
                 for m in groups for key, _ in METRICS]
        lines.append(f"| {ratio:.2f} | " + " | ".join(cells) + " |")
    means = [format_spread(list(seed_means(groups[m], key).values()), len(groups[m]))
             for m in groups for key, _ in METRICS]
    lines.append("| mean over ratios | " + " | ".join(means) + " |")
    return lines


def paired_line(reference: Sequence[Run], other: Sequence[Run], method: str, key: str, label: str) -> str:
    """FairFAL minus ``method`` on the mean over ratios, paired by seed.

    Pairing removes what a seed shares between methods (data split, initial
    pool), so the spread of the differences is the spread that matters for the
    comparison; the sign count shows whether the gap is consistent or driven by one seed.
    """
    ref, oth = seed_means(reference, key), seed_means(other, key)
    seeds = sorted(set(ref) & set(oth))
    if not seeds:
        return f"- {REFERENCE} - {method}, {label}: no seed in common."
    diffs = [ref[s] - oth[s] for s in seeds]
    higher = sum(d > 0 for d in diffs)
    return (f"- {REFERENCE} - {method}, {label}: {format_spread(diffs, signed=True)} points "
            f"(seeds {', '.join(map(str, seeds))}); {REFERENCE} higher in {higher} of {len(seeds)} seeds.")


def monotonic_line(method: str, runs: Sequence[Run]) -> str:
    """Whether the mean accuracy curve never falls as labels are added; if it does, its largest step down.

    More labels should not hurt; a drop points at training noise (or a query
    that hurt), and its size says how much a single ratio's number can be trusted.
    """
    points = [(ratio, statistics.fmean(by_seed.values())) for ratio, by_seed in curve(runs, "accuracy").items()]
    steps = [(before[1] - after[1], before[0], after[0]) for before, after in itertools.pairwise(points)]
    drops = [step for step in steps if step[0] > 1e-9]
    if not drops:
        return f"- {method}: mean accuracy is non-decreasing in the labeled ratio."
    size, start, end = max(drops)
    return (f"- {method}: mean accuracy falls {len(drops)} time(s); largest drop {size:.2f} points, "
            f"from ratio {start:.2f} to {end:.2f}.")


def cycle_plateau_lines(runs: Sequence[Run], window: int = 10, tolerance: float = 0.01) -> list[str]:
    """Per run recorded with ``al-cycle-curve``: each cycle's plateau round (balanced, tail), and the largest.

    The measurement that chooses ``fl-rounds-per-cycle``: a cycle's model has
    converged at N when its mean accuracy over rounds N−9…N and N+1…N+10 differ
    by less than ``tolerance`` for every later N (``report.plateau_round``, the
    converged protocol's rule); a cycle that never settles says "not reached".
    """
    lines = []
    for run in runs:
        if not all(row.get("cycle_accuracy") for row in run.rows):
            continue
        parts = []
        for key, label in (("cycle_accuracy", "balanced"), ("cycle_tail_accuracy", "tail")):
            plateaus = [plateau_round([{key: v} for v in row[key]], key, tolerance, window) for row in run.rows]
            shown = ", ".join("not reached" if n is None else str(n) for n in plateaus)
            worst = "not reached" if None in plateaus else str(max(plateaus))
            parts.append(f"{label} {shown} (largest: {worst})")
        rounds = len(run.rows[0]["cycle_accuracy"])
        lines.append(f"- {run.method} seed {run.seed} ({rounds} rounds per cycle): plateau round per cycle, "
                     + "; ".join(parts) + ".")
    return lines


def comparison_table(run_dirs: Sequence[Path]) -> str:
    """Markdown: seeds per method, the mean ± std table, paired differences against FairFAL, monotonicity."""
    groups = by_method(completed_runs(run_dirs))
    if not groups:
        return "No completed runs."
    lines = [_seeds_line(groups), "", *_table(groups)]
    if REFERENCE in groups and len(groups) > 1:
        intro = (f"Paired difference of the mean over ratios ({REFERENCE} minus the method, per seed; "
                 "mean ± std over the seeds both have):")
        lines += ["", intro, ""]
        for method, runs in groups.items():
            if method != REFERENCE:
                lines += [paired_line(groups[REFERENCE], runs, method, key, name)
                          for key, name in (("accuracy", "accuracy"), ("tail_accuracy", "tail accuracy"))]
    lines += ["", "Monotonicity of the mean accuracy curve (step by step in the labeled ratio):", ""]
    lines += [monotonic_line(method, runs) for method, runs in groups.items()]
    plateaus = cycle_plateau_lines([run for runs in groups.values() for run in runs])
    if plateaus:
        heading = "Convergence within each cycle (`al-cycle-curve`; last-10 mean moves < 1 point for 10 more rounds):"
        lines += ["", heading, "", *plateaus]
    lines += ["", *machines_lines({run.path.name: run.config for runs in groups.values() for run in runs})]
    return "\n".join(lines)


def plot_curves(run_dirs: Sequence[Path], output: Path, title: str = "") -> Path:
    """Accuracy and tail accuracy (%) against the target labeled ratio, mean over seeds ±1 std; writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (overall, tail) = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for method, runs in by_method(completed_runs(run_dirs)).items():
        for axes, key in ((overall, "accuracy"), (tail, "tail_accuracy")):
            points = curve(runs, key)
            ratios = list(points)
            spreads = [mean_std(list(by_seed.values())) for by_seed in points.values()]
            means = [mean for mean, _ in spreads]
            line, = axes.plot(ratios, means, marker="o", label=f"{method} (n={len(runs)})")
            if len(runs) >= 2:
                stds = [std or 0.0 for _, std in spreads]
                axes.fill_between(ratios, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                                  color=line.get_color(), alpha=0.2, linewidth=0)
    overall.set_title("test accuracy")
    tail.set_title("tail-class accuracy (30% rarest classes)")
    for axes in (overall, tail):
        axes.set_xlabel("labeled ratio (target)")
        axes.set_ylabel("accuracy (%), mean ± std over seeds")
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend()
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=120)
    plt.close(figure)
    return output


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedlt_app.active.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="result folders of al-method runs (any seeds)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    print(plot_curves(args.runs, args.output, args.title))
    print(comparison_table(args.runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
