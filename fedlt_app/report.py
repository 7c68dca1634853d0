"""Tables and plots of a sweep's results, in the paper's layout.

A sweep folder (``results/<sweep>/``, written by ``fedlt-sweep``) holds
``sweep.json`` (the grid: every cell's name, grid values, seed and run config)
and ``runs/<cell-name>[-retry<k>]/`` (each run's ``config.json``,
``metrics.jsonl`` and ``summary.json``, as the app writes them). This module
writes, next to them, from their reading in :mod:`fedlt_app.sweep_results`
(the figures are :mod:`fedlt_app.report_plots`'):

- ``table.md``: a summary first (also ``table-summary.csv``: per method its
  finished seeds, balanced and tail accuracy and the paired differences to the
  sweep's reference, over the sweep's seeds, best balanced accuracy first; rows
  with ``more-seeds`` runs again over all of them in
  ``table-summary-more-seeds.csv``), then one section per metric
  (balanced, tail, many-, medium- and few-shot accuracy); rows are the sweep's
  row key (methods), columns its settings (every other grid key); each entry
  is the last-10-round mean of a run, in percent, as mean ± std over the seeds
  (sample std, ddof = 1);
- ``table.csv`` (balanced accuracy), ``table-tail.csv``, ``table-many.csv``,
  ``table-medium.csv``, ``table-few.csv``: the same tables; with a ``paired``
  reference, the paired differences to it (``table-paired*.csv``), per seed
  (``table-paired-per-seed.csv``, balanced accuracy) and per class
  (``table-per-class-paired.csv``), each also a table.md section; ``runs.csv``:
  one line per cell with the numbers behind them;
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
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlt_app.report_plots import write_plots
from fedlt_app.results import LAST_ROUNDS
from fedlt_app.sweep_results import (
    DDOF,
    SAFE,
    ReportError,
    Stat,
    SweepResults,
    class_counts_of,
    entry_cells,
    last10_drift,
    last_mean,
    load,
    paired_class_stats,
    paired_references,
    paired_stat,
    plateau_round,
    stat,
    value_text,
)


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


def format_spread(s: Stat) -> str:
    """'95.73 ± 0.46' in percent ('—' without a mean), without format_stat's seed counts (the summary has a
    column for them)."""
    if s.mean is None:
        return "—"
    return f"{100 * s.mean:.2f}" + (f" ± {100 * s.std:.2f}" if s.std is not None else "")


def format_stat(s: Stat, sweep_seeds: int = 0) -> str:
    """Percent with 2 decimals: '95.73 ± 0.46'; '—' before any run finished; 'n/a' for an empty class group;
    '(5 seeds)' after an entry that ``more-seeds`` gave more than the sweep's ``sweep_seeds``."""
    if s.planned == 0:
        return ""
    if s.n == 0:
        return "—"
    if s.mean is None:
        return "n/a"
    text = format_spread(s)
    if s.n != s.planned:
        return f"{text} ({s.n}/{s.planned} seeds)"
    return f"{text} ({s.n} seeds)" if s.n > sweep_seeds > 0 else text


def _row_heading(res: SweepResults, by_setting: bool = False) -> list[str]:
    """A table's leading header cells: the row axes' names (method / …), after a ``setting`` column when the
    table has one block per column (setting)."""
    return (["setting"] if by_setting else []) + [" / ".join(res.axis_label(k) for k in res.row_keys)]


def _row_lead(res: SweepResults, row: Sequence[str], column: Sequence[str], by_setting: bool) -> list[str]:
    """A line's leading cells, matching :func:`_row_heading`: the setting's label when by setting, the row's."""
    return ([res.column_label(column)] if by_setting else []) + [res.row_label(row)]


def _seeds_done(s: Stat) -> str:
    """'3', or '2/3' while seeds are missing: how many of an entry's planned seeds it is over."""
    return str(s.n) if s.n >= s.planned else f"{s.n}/{s.planned}"


def table(res: SweepResults, metric: str = "accuracy") -> list[list[str]]:
    """The paper's layout: a header line, then one line per row (method); each entry a formatted :class:`Stat`."""
    lines = [_row_heading(res) + [res.column_label(c) for c in res.columns]]
    for row in res.rows:
        stats = [stat(res, row, column, metric) for column in res.columns]
        if all(s.planned == 0 for s in stats):
            continue
        lines.append([res.row_label(row)] + [format_stat(s, len(res.meta.get("seeds", []))) for s in stats])
    return lines


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


def paired_table(res: SweepResults, metric: str = "accuracy", reference: str | None = None) -> list[list[str]]:
    """The table's layout without the reference's entries; each entry a paired difference to ``reference``
    (default: the sweep's main one)."""
    columns = [c for c in res.columns if any(paired_stat(res, r, c, metric, reference) for r in res.rows)]
    lines = [_row_heading(res) + [res.column_label(c) for c in columns]]
    for row in res.rows:
        stats = [paired_stat(res, row, column, metric, reference) for column in columns]
        if all(s is None for s in stats):
            continue
        lines.append([res.row_label(row)] + ["" if s is None else format_difference(s) for s in stats])
    return lines


def format_class_difference(s: Stat) -> str:
    """'+31.8 ± 4.1': a class's paired difference in points, one decimal (ten of them share a line); ‡ as in
    :func:`format_difference`."""
    if s.mean is None:
        return "—"
    text = f"{100 * s.mean:+.1f}" + (f" ± {100 * s.std:.1f}" if s.std is not None else "")
    return text + (f" {NEEDS_SEEDS}" if s.std is not None and abs(s.mean) < s.std else "")


def per_seed_paired_table(res: SweepResults, metric: str = "accuracy") -> list[list[str]]:
    """Per row (method), per seed of the sweep: the paired difference to the sweep's main reference on that
    seed, in points; blank where the pair is not finished.

    The paired tables give mean ± std; this shows what the std is made of. On a long-tailed split a seed's
    partition can be hard for the reference and easy to repair, so a gain that comes mostly from one seed reads
    here as that seed's column, not as noise. With several columns (settings) each gets its own block."""
    if paired_references(res) is None:
        return [[]]
    seeds = sorted({c["seed"] for c in res.cells})  # more-seeds' too
    several = len(res.columns) > 1
    lines = [_row_heading(res, several) + [f"seed {s}" for s in seeds]]
    for column in res.columns:
        for row in res.rows:
            per_seed = [paired_stat(res, row, column, metric, seeds=[s]) for s in seeds]
            if all(d is None or d.n == 0 for d in per_seed):
                continue
            lines.append(_row_lead(res, row, column, several) + [
                "" if d is None or d.mean is None else f"{100 * d.mean:+.2f}" for d in per_seed])
    return lines


def per_class_paired_table(res: SweepResults) -> list[list[str]]:
    """Per row (method), per class: the paired difference of that class's last-10 accuracy to the sweep's main
    reference, over the sweep's seeds.

    Where a method's gain comes from: on a long-tailed split a method may gain most of its balanced accuracy
    on one or two confusable classes (each moves balanced accuracy by a tenth of its entry with ten classes),
    which the balanced and many/medium/few-shot tables cannot show. Classes are headed by their training
    count; with several columns (settings) each gets its own block, headed by a ``setting`` column."""
    if paired_references(res) is None:
        return [[]]
    seeds = res.meta.get("seeds")
    several = len(res.columns) > 1
    blocks = []
    for column in res.columns:
        rows = [(row, paired_class_stats(res, row, column, seeds=seeds)) for row in res.rows]
        rows = [(row, stats) for row, stats in rows if stats]
        if rows:
            blocks.append((column, rows))
    num_classes = max((len(stats) for _, rows in blocks for _, stats in rows), default=0)
    counts = class_counts_of(res, blocks[0][0]) if blocks and not several else None
    classes = [f"{c} ({counts[c]:,})" if counts and c < len(counts) else str(c) for c in range(num_classes)]
    lines = [_row_heading(res, several) + ["seeds", *classes]]
    for column, rows in blocks:
        for row, stats in rows:
            lines.append(_row_lead(res, row, column, several) + [
                _seeds_done(stats[0]), *(format_class_difference(s) for s in stats)])
    return lines


def more_seeds_of(res: SweepResults, row: Sequence[str], column: Sequence[str]) -> bool:
    """Whether an entry has cells beyond the sweep's seeds (the sweep file's ``more-seeds``)."""
    sweep_seeds = res.meta.get("seeds")
    return sweep_seeds is not None and any(c["seed"] not in sweep_seeds for c in entry_cells(res, row, column))


def summary_table(res: SweepResults, more_seeds: bool = False) -> list[list[str]]:
    """The whole comparison in one table: per row (method) its finished seeds, balanced and tail accuracy, and
    the paired differences to the sweep's main reference.

    A reader asking which method works reads one line per method instead of four tables. Every entry is over
    the sweep's own seeds, so that rows are ranked on the same seeds (a mean over five seeds is not one over
    three); ``more_seeds``: only the rows with ``more-seeds`` runs, over every seed. Rows whose every seed
    finished come first, best balanced mean first, then those still missing seeds (a one-seed mean is not
    ranked among three-seed ones), then those with none, in the sweep's order. The order is of the means: the ±
    and the paired columns say whether a step in it is more than noise. With several columns (settings) each
    gets its own block, headed by a ``setting`` column."""
    seeds = None if more_seeds else res.meta.get("seeds")
    key, references = paired_references(res) or ("", [])
    several = len(res.columns) > 1
    header = _row_heading(res, several) + ["seeds", "balanced", "tail"]
    if references:
        reference = res.coord_label(key, references[0])
        header += [f"Δ balanced vs {reference} (paired)", f"Δ tail vs {reference} (paired)"]
    lines = [header]
    for column in res.columns:
        entries = []
        for row in res.rows:
            if more_seeds and not more_seeds_of(res, row, column):
                continue
            balanced, tail = (stat(res, row, column, m.key, seeds) for m in PAIRED_METRICS)
            if balanced.planned == 0:
                continue
            line = _row_lead(res, row, column, several) + [
                _seeds_done(balanced), format_spread(balanced), format_spread(tail)]
            if references:
                paired = [paired_stat(res, row, column, m.key, seeds=seeds) for m in PAIRED_METRICS]
                line += ["reference" if d is None else format_difference(d) for d in paired]
            entries.append((balanced.mean, balanced.n < balanced.planned, line))
        ranked = sorted((e for e in entries if e[0] is not None), key=lambda e: (e[1], -e[0]))
        lines += [line for *_, line in ranked] + [line for mean, _, line in entries if mean is None]
    return lines


def has_more_seeds(res: SweepResults) -> bool:
    """Whether any cell runs a seed beyond the sweep's (the sweep file's ``more-seeds``)."""
    sweep_seeds = res.meta.get("seeds")
    return sweep_seeds is not None and any(c["seed"] not in sweep_seeds for c in res.cells)


@dataclass(frozen=True)
class Tables:
    """Every table of a sweep's report, built once: table.md renders them and the csv files hold them."""

    summary: list[list[str]]
    summary_more_seeds: list[list[str]] | None  # only with ``more-seeds`` runs
    metrics: dict[str, list[list[str]]]  # per :class:`Metric` key
    paired: dict[tuple[str, str], list[list[str]]]  # per (reference, paired metric key)
    per_seed: list[list[str]]  # [[]] without a reference
    per_class: list[list[str]]


def summary_tables(res: SweepResults) -> tuple[list[list[str]], list[list[str]] | None]:
    """The summary over the sweep's seeds and, with ``more-seeds`` runs, theirs over all seeds (else None)."""
    return summary_table(res), summary_table(res, more_seeds=True) if has_more_seeds(res) else None


def build_tables(res: SweepResults) -> Tables:
    """Each of the report's tables, built once, so that table.md and the csv files are the same lines."""
    _, references = paired_references(res) or ("", [])
    summary, more_seeds = summary_tables(res)
    return Tables(
        summary=summary,
        summary_more_seeds=more_seeds,
        metrics={m.key: table(res, m.key) for m in METRICS},
        paired={(r, m.key): paired_table(res, m.key, r) for r in references for m in PAIRED_METRICS},
        per_seed=per_seed_paired_table(res),
        per_class=per_class_paired_table(res),
    )


def summary_markdown(res: SweepResults, tables: Tables | None = None) -> str:
    """The summary table over the sweep's seeds, then, if some rows have ``more-seeds`` runs, theirs over all."""
    summary, more = (tables.summary, tables.summary_more_seeds) if tables else summary_tables(res)
    text = markdown_table(summary)
    if more is not None:
        text += ("\n\nThe settings with more seeds (the sweep file's more-seeds), over all of them, ranked among "
                 "themselves:\n\n" + markdown_table(more))
    return text


def paired_stem(stem: str, references: Sequence[str], reference: str) -> str:
    """The csv file of a paired table: ``table-paired`` for the main reference, ``table-paired-<value>`` else."""
    suffix = "" if reference == references[0] else "-" + SAFE.sub("_", reference)
    return f"{stem}-paired{suffix}"


def markdown_table(lines: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(lines[0]) + " |", "|" + "---|" * len(lines[0])]
    out += ["| " + " | ".join(line) + " |" for line in lines[1:]]
    return "\n".join(out)


SUMMARY_HEADING = "## Summary"
SUMMARY_NOTE = (
    "One line per setting, over the sweep's seeds: those with every seed finished first, best balanced accuracy "
    "first, then those still missing seeds ('2/3': two of three finished), ranked among themselves. The order is "
    "of the means; read the ± and the paired columns before calling one method ahead of another."
)


def markdown(res: SweepResults, tables: Tables | None = None) -> str:
    """table.md: every metric's table, how the numbers were made, and which cells are finished."""
    tables = tables or build_tables(res)
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
        + (" '(n seeds)': more seeds than the sweep's, where a paired difference was smaller than its spread "
           "(the sweep file's more-seeds)." if has_more_seeds(res) else "")
    )
    parts.append(f"{SUMMARY_HEADING}\n\n{SUMMARY_NOTE}\n\n{summary_markdown(res, tables)}")
    for metric in METRICS:
        parts.append(f"## {metric.title}\n\n{markdown_table(tables.metrics[metric.key])}")
    key, references = paired_references(res) or ("", [])
    for reference in references:
        parts.append(
            f"## Paired differences to {res.coord_label(key, reference)}\n\n"
            f"Per seed, a run's last-{LAST_ROUNDS} mean minus that of the run with the same seed and grid values but "
            f"{res.axis_label(key)} = {reference} (same data, initialisation, cohorts and batches); in points, "
            f"mean ± sample std over the paired seeds, and how many seeds share the mean's sign; "
            f"{NEEDS_SEEDS}: the mean difference is smaller than its spread, so this comparison needs more seeds."
        )
        for metric in PAIRED_METRICS:
            parts.append(f"### {metric.title}\n\n{markdown_table(tables.paired[reference, metric.key])}")
    if len(tables.per_seed) > 1:
        parts.append(
            f"## Paired differences to {res.coord_label(key, references[0])} per seed\n\n"
            f"{METRICS[0].title}: each seed's paired difference (points), which the mean ± std above summarise; "
            f"blank: the pair is not finished.\n\n" + markdown_table(tables.per_seed)
        )
    if len(tables.per_class) > 1:
        parts.append(
            f"## Per-class paired differences to {res.coord_label(key, references[0])}\n\n"
            f"Per class (headed by its training images), a run's last-{LAST_ROUNDS} mean accuracy on that class "
            f"minus that of its paired run, in points, mean ± sample std over the sweep's seeds ('seeds': how many "
            f"paired): where a method's gain comes from. A class moves balanced accuracy by its entry divided by "
            f"the number of classes.\n\n" + markdown_table(tables.per_class)
        )
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
    tables = build_tables(res)
    texts = {"table.md": markdown(res, tables), "table-summary.csv": _csv_text(tables.summary)}
    if tables.summary_more_seeds is not None:
        texts["table-summary-more-seeds.csv"] = _csv_text(tables.summary_more_seeds)
    texts.update({f"{m.stem}.csv": _csv_text(tables.metrics[m.key]) for m in METRICS})
    _, references = paired_references(res) or ("", [])
    texts.update({f"{paired_stem(m.stem, references, r)}.csv": _csv_text(tables.paired[r, m.key])
                  for r in references for m in PAIRED_METRICS})
    if len(tables.per_seed) > 1:
        texts["table-paired-per-seed.csv"] = _csv_text(tables.per_seed)
    if len(tables.per_class) > 1:
        texts["table-per-class-paired.csv"] = _csv_text(tables.per_class)
    texts["runs.csv"] = _csv_text(runs_table(res))
    written = []
    for name, text in texts.items():
        path = res.root / name
        path.write_text(text)
        written.append(path)
    return written


SUMMARY_BLOCK = re.compile(
    r"(?P<start><!-- fedlt-summary: (?P<sweep>\S+) -->\n)(?:.*?\n)?(?P<end><!-- /fedlt-summary -->)", re.S)


def embed_summaries(text: str, resolve: Callable[[str], Path]) -> str:
    """Replace each block between ``<!-- fedlt-summary: results/<sweep> -->`` and ``<!-- /fedlt-summary -->``
    in ``text`` (a README) with that sweep's summary table as its runs give it now (``resolve`` maps the
    marker's path to the sweep folder), so a document quoting the table cannot drift from the runs."""
    if not SUMMARY_BLOCK.search(text):
        raise ReportError("no '<!-- fedlt-summary: results/<sweep> -->' ... '<!-- /fedlt-summary -->' block to fill")
    return SUMMARY_BLOCK.sub(
        lambda m: m["start"] + summary_markdown(load(resolve(m["sweep"]))) + "\n" + m["end"], text)


def write_report(path: str | Path, log: Callable[[str], None] = print) -> list[Path]:
    """Write table.md, the csv tables and the plots of ``results/<sweep>/``; return their paths."""
    res = load(path)
    return write_tables(res) + write_plots(res, log)


USAGE = ("usage: python -m fedlt_app.report results/<sweep>\n"
         "       python -m fedlt_app.report --embed-summaries README.md  (refill its fedlt-summary blocks)")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 2 and args[0] == "--embed-summaries":
        document = Path(args[1])
        try:
            text = embed_summaries(document.read_text(), lambda sweep: document.parent / sweep)
        except (OSError, ReportError) as err:
            print(f"report: {err}", file=sys.stderr)
            return 2
        document.write_text(text)
        print(document)
        return 0
    if len(args) != 1 or args[0].startswith("-"):
        print(USAGE, file=sys.stderr)
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
