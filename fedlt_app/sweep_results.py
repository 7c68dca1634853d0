"""A sweep's results folder as data, and the statistics the report draws from it.

``results/<sweep>/`` holds ``sweep.json`` (the grid: every cell's name, grid
values, seed and run config) and ``runs/<cell-name>[-retry<k>]/`` (each run's
``config.json``, ``metrics.jsonl`` and ``summary.json``). :func:`load` reads
them into :class:`SweepResults`; the rest computes over its runs: last-10-round
means, mean ± sample std over seeds, paired differences to a reference setting,
and the convergence measures (last-10 drift, plateau round). The tables
(:mod:`fedlt_app.report`), the figures (:mod:`fedlt_app.report_plots`) and the
sweep runner (:mod:`fedlt_app.sweep`) share this one reading.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fedlt_app.results import LAST_ROUNDS
from fedlt_app.run_folder import completed, run_status
from fedlt_app.run_plots import VALUE_NAMES, read_rounds

Value = TypeVar("Value")  # what paired_values compares: a last-10 mean, a per-class list

DDOF = 1  # std over seeds: the sample standard deviation (n - 1); one seed shows no ±


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


def class_counts_of(res: SweepResults, column: Sequence[str]) -> list[int] | None:
    """The training count of each class (``config.json``'s ``class_counts``) of the column's runs, if recorded."""
    for c in res.cells_at((res.column_keys, column)):
        run = res.runs.get(c["name"])
        if run is not None and run.config.get("class_counts"):
            return [int(n) for n in run.config["class_counts"]]
    return None


def last_mean(rounds: Sequence[dict[str, Any]], metric: str, last: int = LAST_ROUNDS) -> float | None:
    """Mean of ``metric`` over the run's last ``last`` rounds (skipping nulls); None if it has none."""
    values = [r[metric] for r in rounds[-last:] if r.get(metric) is not None]
    return sum(values) / len(values) if values else None


def last_class_means(rounds: Sequence[dict[str, Any]], last: int = LAST_ROUNDS) -> list[float] | None:
    """Each class's accuracy averaged over the run's last ``last`` rounds (those that recorded
    ``per_class_accuracy``): the per-class twin of :func:`last_mean`; None if none did."""
    rows = [r["per_class_accuracy"] for r in rounds[-last:] if r.get("per_class_accuracy")]
    return [sum(v) / len(v) for v in zip(*rows, strict=True)] if rows else None


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


def entry_cells(res: SweepResults, row: Sequence[str], column: Sequence[str],
                seeds: Collection[int] | None = None) -> list[dict[str, Any]]:
    """The cells of one table entry (row, column): every seed's, or only those of ``seeds``."""
    return [c for c in res.cells_at((res.row_keys, row), (res.column_keys, column))
            if seeds is None or c["seed"] in seeds]


def stat(res: SweepResults, row: Sequence[str], column: Sequence[str], metric: str,
         seeds: Collection[int] | None = None) -> Stat:
    """One entry over its seeds (only ``seeds`` if given: the sweep's own, to compare rows on the same ones)."""
    cells = entry_cells(res, row, column, seeds)
    runs = [res.runs[c["name"]] for c in cells if c["name"] in res.runs]
    values = [v for v in (last_mean(r.rounds, metric) for r in runs) if v is not None]
    mean, std = mean_std(values)
    return Stat(mean, std, len(runs), len(cells), tuple(values))


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


def paired_references(res: SweepResults) -> tuple[str, list[str]] | None:
    """The sweep's ``paired``: (grid key, its reference values, the main one first), if it names one.

    Manifests written before several references were allowed name one, as ``reference``."""
    paired = res.meta.get("paired")
    if not paired:
        return None
    references = paired["references"] if "references" in paired else [paired["reference"]]
    return str(paired["key"]), [str(r) for r in references]


def partner(res: SweepResults, cell: dict[str, Any], key: str, reference: str) -> dict[str, Any] | None:
    """The cell with the same grid values and seed as ``cell``, but ``key`` at the reference value."""
    want = {k: value_text(v) for k, v in cell["coords"].items()} | {key: reference}
    for other in res.cells:
        if other["seed"] == cell["seed"] and {k: value_text(v) for k, v in other["coords"].items()} == want:
            return other
    return None


def paired_values(res: SweepResults, row: Sequence[str], column: Sequence[str],
                  value: Callable[[Run], Value | None], reference: str | None = None,
                  seeds: Collection[int] | None = None) -> tuple[list[tuple[Value, Value]], int] | None:
    """Per seed, ``value`` of the entry's run and of its partner's at ``reference`` (default: the sweep's main
    one), and how many cells the entry has; None for the reference itself.

    Only seeds where both runs completed and both values exist pair (of ``seeds``, if given)."""
    key, references = paired_references(res) or ("", [""])
    reference = references[0] if reference is None else reference
    cells = entry_cells(res, row, column, seeds)
    if not cells or any(value_text(c["coords"][key]) == reference for c in cells):
        return None
    pairs = []
    for cell in cells:
        other = partner(res, cell, key, reference)
        if other is None or cell["name"] not in res.runs or other["name"] not in res.runs:
            continue
        mine, theirs = value(res.runs[cell["name"]]), value(res.runs[other["name"]])
        if mine is not None and theirs is not None:
            pairs.append((mine, theirs))
    return pairs, len(cells)


def paired_stat(res: SweepResults, row: Sequence[str], column: Sequence[str], metric: str,
                reference: str | None = None, seeds: Collection[int] | None = None) -> Stat | None:
    """Per seed, this entry's last-10 mean minus its partner's at ``reference`` (default: the sweep's main one);
    None for the reference itself.

    Only seeds where both runs completed count (of ``seeds``, if given); ``values`` holds the per-seed differences.
    """
    paired = paired_values(res, row, column, lambda run: last_mean(run.rounds, metric), reference, seeds)
    if paired is None:
        return None
    pairs, planned = paired
    diffs = [mine - theirs for mine, theirs in pairs]
    mean, std = mean_std(diffs)
    return Stat(mean, std, len(diffs), planned, tuple(diffs))


def paired_class_stats(res: SweepResults, row: Sequence[str], column: Sequence[str], reference: str | None = None,
                       seeds: Collection[int] | None = None) -> list[Stat] | None:
    """Per class, :func:`paired_stat` of that class's accuracy: where an entry's gain over the reference comes
    from. With C classes a class's difference moves balanced accuracy by 1/C of it. None for the reference
    itself or when no pair recorded per-class accuracy."""
    paired = paired_values(res, row, column, lambda run: last_class_means(run.rounds), reference, seeds)
    if paired is None or not paired[0]:
        return None
    pairs, planned = paired
    per_class = zip(*([a - b for a, b in zip(mine, theirs, strict=True)] for mine, theirs in pairs), strict=True)
    return [Stat(*mean_std(diffs), len(diffs), planned, diffs) for diffs in per_class]
