"""``fedlt-sweep``: run a grid of fedlt runs and tabulate it like the paper.

A sweep file (``conf/sweeps/<name>.yaml``) names a base run config, a grid of
run-config keys (plus the launcher's ``num-clients``), a list of seeds, which
grid key(s) make the table's rows, and optional per-row overrides. Every cell
(one point of the grid and one seed) is validated with
:func:`fedlt_app.config.resolve` before anything runs; then the cells run one
after another through the real app (:func:`fedlt_app.launch.run`), each into
``<output>/<sweep>/runs/<cell-name>/``. A cell is finished when its
``summary.json`` says ``completed``: a second invocation skips it, so a killed
sweep resumes where it stopped. An interrupted cell whose folder holds a
checkpoint (``checkpoint-every``) is continued from it with ``resume-from``,
in its own folder, when its method keeps no state on its clients (then the
continued run is the uninterrupted one, to the digit); any other cell that
left partial results is re-run into ``<cell-name>-retry<k>`` (the app never
overwrites a run directory).
At the end (and with ``--report-only``) the tables and plots of
:mod:`fedlt_app.report` are written next to the runs.

The sweep-file format is described in the README ("Reproducing the paper's tables").
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fedlt_app import report
from fedlt_app.config import OPTIONS, ConfigError, defaults, load_preset, recorded_value, resolve
from fedlt_app.report import value_text

APP_DIR = Path(__file__).resolve().parent.parent

# Launcher options: not run-config keys, but a cell may set them like one.
# num-clients changes the experiment (it is part of a cell's identity);
# cpus/gpus per client only change how fast it runs.
LAUNCHER_DEFAULTS: dict[str, Any] = {"num-clients": 10, "cpus-per-client": 1, "gpus-per-client": 0.0}
SPEC_KEYS = (
    "name", "description", "base", "rows", "grid", "seeds", "row-overrides", "overrides", "exclude",
    "ablation", "paired", "axis-labels", "value-labels", "timeout", *LAUNCHER_DEFAULTS,
)
# Run-config keys that do not change a run's results: a finished run still
# counts when only these differ from the sweep file (e.g. data moved).
NOT_IDENTITY = frozenset({"preset", "run-name", "output-dir", "data-dir", "device", "wandb-mode", "wandb-project",
                          "resume-from", "pictures", "persist-client-state"})
DEFAULT_TIMEOUT = 72 * 3600.0
CELL_LOG = "cells.jsonl"  # one line per cell run: name, run name, exit code, status, wall seconds
SAFE = re.compile(r"[^A-Za-z0-9._-]+")


class SweepError(ValueError):
    """A sweep file, or a sweep's state on disk, that cannot be used."""


# ------------------------------------------------------------------ the spec


@dataclass(frozen=True)
class Axis:
    """One grid key: plain values of a run-config / launcher key, or named bundles of keys."""

    key: str
    values: tuple[Any, ...]
    bundles: Mapping[str, Mapping[str, Any]] | None = None  # label -> keys, for a bundle axis

    @property
    def is_bundle(self) -> bool:
        return self.bundles is not None


@dataclass(frozen=True)
class Override:
    when: Mapping[str, Any]
    set: Mapping[str, Any]


@dataclass(frozen=True)
class SweepSpec:
    name: str
    description: str
    base: Mapping[str, Any]
    rows: tuple[str, ...]
    axes: tuple[Axis, ...]
    seeds: tuple[int, ...]
    overrides: tuple[Override, ...]
    exclude: tuple[Mapping[str, Any], ...]
    ablation: str | None
    paired: tuple[str, str] | None  # (grid key, reference value): tables of per-seed differences to it
    axis_labels: Mapping[str, str]
    value_labels: Mapping[str, Mapping[str, str]]
    launcher: Mapping[str, Any]
    timeout: float
    source: str = ""
    raw: Mapping[str, Any] = field(default_factory=dict)

    @property
    def columns(self) -> tuple[str, ...]:
        """Every grid key that is not a row key: together they name a table column (a setting)."""
        return tuple(a.key for a in self.axes if a.key not in self.rows)

    def axis(self, key: str) -> Axis:
        return next(a for a in self.axes if a.key == key)


def _same(a: Any, b: Any) -> bool:
    """YAML/JSON values compare as the user means them: 10 == 10.0, but True != 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return float(a) == float(b)
    return a == b


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SweepError(f"{where}: expected a mapping of keys to values, got {value!r}")
    return {str(k): v for k, v in value.items()}


def _check_setting_keys(keys: Mapping[str, Any] | Sequence[str], where: str) -> None:
    for key in keys:
        if key == "seed":
            raise SweepError(f"{where}: set seeds with the top-level 'seeds' list, not with 'seed'")
        if key in ("run-name", "output-dir"):
            raise SweepError(f"{where}: {key!r} is set by the sweep for every cell")
        if key not in OPTIONS and key not in LAUNCHER_DEFAULTS:
            raise SweepError(
                f"{where}: unknown key {key!r}; a cell takes run-config keys ({', '.join(OPTIONS)}) "
                f"and launcher keys ({', '.join(LAUNCHER_DEFAULTS)})"
            )


def parse_spec(data: Mapping[str, Any], default_name: str = "", source: str = "") -> SweepSpec:
    """Check a loaded sweep file's structure (cells are validated by :func:`expand`)."""
    if not isinstance(data, Mapping):
        raise SweepError(f"{source or 'sweep file'}: must hold a mapping")
    unknown = sorted(set(data) - set(SPEC_KEYS))
    if unknown:
        raise SweepError(f"unknown sweep key(s) {', '.join(unknown)}; known: {', '.join(SPEC_KEYS)}")
    name = str(data.get("name") or default_name)
    if not name or SAFE.search(name):
        raise SweepError(f"name: {name!r} must be non-empty and use only letters, digits, '.', '_' and '-'")

    base = _mapping(data.get("base"), "base")
    _check_setting_keys(base, "base")

    grid = data.get("grid")
    if not isinstance(grid, Mapping) or not grid:
        raise SweepError("grid: needs at least one key with a list of values")
    axes: list[Axis] = []
    for key, values in grid.items():
        key = str(key)
        if isinstance(values, Mapping):  # a bundle axis: label -> several keys
            if key in OPTIONS or key in LAUNCHER_DEFAULTS or key == "seed":
                raise SweepError(
                    f"grid.{key}: a bundle axis (label -> keys) needs a name that is not a run-config or launcher "
                    f"key, e.g. 'setting'"
                )
            if not values:
                raise SweepError(f"grid.{key}: needs at least one bundle")
            bundles = {}
            for label, keys in values.items():
                label = str(label)
                bundle = _mapping(keys, f"grid.{key}.{label}")
                _check_setting_keys(bundle, f"grid.{key}.{label}")
                bundles[label] = bundle
            axes.append(Axis(key, tuple(bundles), bundles))
        else:
            _check_setting_keys([key], "grid")
            if not isinstance(values, list) or not values:
                raise SweepError(f"grid.{key}: expected a non-empty list of values, got {values!r}")
            texts = [value_text(v) for v in values]
            if len(set(texts)) != len(texts):
                raise SweepError(f"grid.{key}: repeated value in {values!r}")
            axes.append(Axis(key, tuple(values)))
    keys = [a.key for a in axes]

    rows_value = data.get("rows", keys[0])
    rows = (rows_value,) if isinstance(rows_value, str) else tuple(rows_value or ())
    if not rows or any(r not in keys for r in rows):
        raise SweepError(f"rows: {rows_value!r} must name grid key(s); grid keys: {', '.join(keys)}")

    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or any(not isinstance(s, int) or isinstance(s, bool) for s in seeds):
        raise SweepError(f"seeds: expected a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise SweepError(f"seeds: repeated seed in {seeds!r}")

    overrides: list[Override] = []
    row_overrides = _mapping(data.get("row-overrides"), "row-overrides")
    if row_overrides and len(rows) != 1:
        raise SweepError("row-overrides: needs a single row key; with several, use 'overrides' with 'when'")
    for value, keys_set in row_overrides.items():
        row_axis = next(a for a in axes if a.key == rows[0])
        if not any(value_text(v) == value for v in row_axis.values):
            raise SweepError(f"row-overrides: {value!r} is not a value of the row key {rows[0]!r}")
        setting = _mapping(keys_set, f"row-overrides.{value}")
        _check_setting_keys(setting, f"row-overrides.{value}")
        overrides.append(Override({rows[0]: value}, setting))
    for i, item in enumerate(data.get("overrides") or []):
        item = _mapping(item, f"overrides[{i}]")
        if set(item) != {"when", "set"}:
            raise SweepError(f"overrides[{i}]: expected {{when: {{grid key: value}}, set: {{key: value}}}}")
        when = _mapping(item["when"], f"overrides[{i}].when")
        _check_grid_match(when, axes, f"overrides[{i}].when")
        setting = _mapping(item["set"], f"overrides[{i}].set")
        _check_setting_keys(setting, f"overrides[{i}].set")
        overrides.append(Override(when, setting))
    exclude = []
    for i, item in enumerate(data.get("exclude") or []):
        match = _mapping(item, f"exclude[{i}]")
        _check_grid_match(match, axes, f"exclude[{i}]")
        exclude.append(match)

    ablation = data.get("ablation")
    if ablation is not None and ablation not in keys:
        raise SweepError(f"ablation: {ablation!r} must be a grid key; grid keys: {', '.join(keys)}")

    paired = _parse_paired(data.get("paired"), axes)

    launcher = {k: data.get(k, v) for k, v in LAUNCHER_DEFAULTS.items()}
    timeout = data.get("timeout", DEFAULT_TIMEOUT)
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
        raise SweepError(f"timeout: expected seconds > 0, got {timeout!r}")
    axis_labels = {str(k): str(v) for k, v in _mapping(data.get("axis-labels"), "axis-labels").items()}
    value_labels = {
        str(k): {str(vk): str(vv) for vk, vv in _mapping(v, f"value-labels.{k}").items()}
        for k, v in _mapping(data.get("value-labels"), "value-labels").items()
    }
    return SweepSpec(
        name=name,
        description=str(data.get("description") or "").strip(),
        base=base,
        rows=rows,
        axes=tuple(axes),
        seeds=tuple(seeds),
        overrides=tuple(overrides),
        exclude=tuple(exclude),
        ablation=ablation,
        paired=paired,
        axis_labels=axis_labels,
        value_labels=value_labels,
        launcher=launcher,
        timeout=float(timeout),
        source=source,
        raw=dict(data),
    )


def _parse_paired(value: Any, axes: Sequence[Axis]) -> tuple[str, str] | None:
    """``paired: {key: method, reference: fedavg}``: compare every value of ``key`` with the reference, per seed."""
    if value is None:
        return None
    item = _mapping(value, "paired")
    if set(item) != {"key", "reference"}:
        raise SweepError("paired: expected {key: <grid key>, reference: <one of its values>}")
    _check_grid_match({str(item["key"]): item["reference"]}, axes, "paired")
    key = str(item["key"])
    if len(next(a for a in axes if a.key == key).values) < 2:
        raise SweepError(f"paired: grid key {key!r} has a single value; nothing to compare with the reference")
    return key, value_text(item["reference"])


def _check_grid_match(match: Mapping[str, Any], axes: Sequence[Axis], where: str) -> None:
    if not match:
        raise SweepError(f"{where}: needs at least one grid key")
    by_key = {a.key: a for a in axes}
    for key, value in match.items():
        if key not in by_key:
            raise SweepError(f"{where}: {key!r} is not a grid key; grid keys: {', '.join(by_key)}")
        if not any(value_text(v) == value_text(value) for v in by_key[key].values):
            raise SweepError(f"{where}: {value!r} is not a value of grid key {key!r}")


def load_spec(path: str | Path) -> SweepSpec:
    import yaml  # PyYAML comes with omegaconf

    path = Path(path)
    if not path.is_file():
        raise SweepError(f"no sweep file {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SweepError(f"{path}: not valid YAML: {err}") from err
    return parse_spec(data, default_name=path.stem, source=str(path))


# ----------------------------------------------------------------- the cells


@dataclass(frozen=True)
class Cell:
    """One run of the sweep: a grid point and a seed."""

    name: str
    coords: Mapping[str, Any]  # grid key -> value (a bundle axis: its label), in grid order
    seed: int
    row: tuple[str, ...]  # the row keys' values, as text
    column: tuple[str, ...]  # the column keys' values, as text
    run_config: Mapping[str, Any]  # the full resolved run config this cell means (kebab-case keys)
    overrides: Mapping[str, Any]  # what is passed to the app: the keys that differ from the schema defaults
    num_clients: int
    cpus: int
    gpus: float

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "coords": dict(self.coords),
            "seed": self.seed,
            "row": list(self.row),
            "column": list(self.column),
            "num_clients": self.num_clients,
            "run_config": dict(self.run_config),
        }


def _matches(coords: Mapping[str, Any], match: Mapping[str, Any]) -> bool:
    return all(value_text(coords[k]) == value_text(v) for k, v in match.items())


def cell_name(spec: SweepSpec, coords: Mapping[str, Any], seed: int) -> str:
    parts = [value_text(v) if spec.axis(k).is_bundle else f"{k}-{value_text(v)}" for k, v in coords.items()]
    return SAFE.sub("_", "__".join([*parts, f"seed-{seed}"]))


def format_value(value: Any) -> str:
    """A value as Flower's ``--run-config`` parses it (TOML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise SweepError(f"cannot pass the non-finite value {value!r} through --run-config")
        return repr(value)
    text = str(value)
    if "'" in text or "\n" in text:
        raise SweepError(f"cannot pass {text!r} through --run-config (it contains a quote or a newline)")
    return f"'{text}'"


def run_config_arg(overrides: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={format_value(v)}" for k, v in overrides.items())


def _launcher_value(key: str, value: Any, where: str) -> Any:
    if key in ("num-clients", "cpus-per-client"):
        if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value) or value < 1:
            raise SweepError(f"{where}: {key} must be an integer >= 1, got {value!r}")
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise SweepError(f"{where}: {key} must be a number >= 0, got {value!r}")
    return float(value)


def expand(spec: SweepSpec) -> list[Cell]:
    """Every cell of the grid, in grid order (seeds innermost), each validated with ``resolve``.

    The intended run config of a cell is: schema defaults < the preset (from
    ``base``, a bundle or an override; the last one named wins) < ``base`` <
    bundle values < plain grid values < overrides < the seed. The app counts a
    key as explicit only where it differs from the schema default and lets a
    preset fill the others, so the sweep expands the preset itself and passes
    every key that differs from the default, without ``preset``: what runs is
    exactly what the sweep file says (e.g. ``local-epochs: 1`` on top of a
    preset with 5 local epochs).
    """
    cells: list[Cell] = []
    names: set[str] = set()
    for combo in itertools.product(*(a.values for a in spec.axes)):
        coords = {a.key: v for a, v in zip(spec.axes, combo, strict=True)}
        if any(_matches(coords, m) for m in spec.exclude):
            continue
        layers: list[tuple[str, Mapping[str, Any]]] = [("base", spec.base)]
        layers += [(f"grid.{a.key}.{coords[a.key]}", a.bundles[coords[a.key]]) for a in spec.axes if a.bundles]
        layers += [("grid", {a.key: coords[a.key] for a in spec.axes if not a.bundles})]
        layers += [(f"overrides (when {dict(o.when)})", o.set) for o in spec.overrides if _matches(coords, o.when)]
        for seed in spec.seeds:
            name = cell_name(spec, coords, seed)
            if name in names:
                raise SweepError(f"two cells would share the name {name!r}; make the grid values distinct")
            names.add(name)
            cells.append(_make_cell(spec, name, coords, seed, layers))
    if not cells:
        raise SweepError("the grid has no cells left after 'exclude'")
    return cells


def _make_cell(
    spec: SweepSpec, name: str, coords: dict[str, Any], seed: int, layers: list[tuple[str, Mapping[str, Any]]]
) -> Cell:
    launcher = dict(spec.launcher)
    preset = ""
    for _, layer in layers:
        preset = str(layer.get("preset", preset) or preset)
    wanted: dict[str, Any] = defaults()
    try:
        if preset:
            wanted.update(load_preset(preset))  # a bad name fails with the known presets
        for _, layer in layers:
            for key, value in layer.items():
                if key in LAUNCHER_DEFAULTS:
                    launcher[key] = value
                elif key != "preset":
                    wanted[key] = value
        wanted["seed"] = seed
        wanted["preset"] = ""
        cfg = resolve(wanted)  # every key typed and checked, as the app will
    except ConfigError as err:
        raise SweepError(f"cell {name}: {err}") from err
    run_config = {**cfg.as_dict(), "preset": preset}
    default = defaults()
    overrides = {k: v for k, v in cfg.as_dict().items() if k != "preset" and v != default[k]}
    launcher = {k: _launcher_value(k, v, f"cell {name}") for k, v in launcher.items()}
    # what the app will see: pyproject defaults fused with the overrides
    seen = resolve({**default, **overrides})
    if seen != cfg:  # pragma: no cover - a guard on the reasoning above
        raise SweepError(f"cell {name}: the app would not run the intended config")
    if cfg.clients_per_round > launcher["num-clients"]:
        raise SweepError(
            f"cell {name}: clients-per-round {cfg.clients_per_round} is more than num-clients {launcher['num-clients']}"
        )
    run_config_arg(overrides)  # every value must survive Flower's --run-config parsing
    return Cell(
        name=name,
        coords=coords,
        seed=seed,
        row=tuple(value_text(coords[k]) for k in spec.rows),
        column=tuple(value_text(coords[k]) for k in spec.columns),
        run_config=run_config,
        overrides=overrides,
        num_clients=launcher["num-clients"],
        cpus=launcher["cpus-per-client"],
        gpus=launcher["gpus-per-client"],
    )


def parse_only(items: Sequence[str], spec: SweepSpec) -> dict[str, set[str]]:
    """``--only KEY=V1,V2`` filters: grid key -> allowed values (as text)."""
    only: dict[str, set[str]] = {}
    keys = [a.key for a in spec.axes] + ["seed"]
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or key not in keys:
            raise SweepError(f"--only {item!r}: expected KEY=VALUE[,VALUE...] with KEY one of {', '.join(keys)}")
        allowed = {value_text(_yaml_scalar(v)) for v in values.split(",") if v}
        known = {str(s) for s in spec.seeds} if key == "seed" else {value_text(v) for v in spec.axis(key).values}
        if not allowed or not allowed <= known:
            raise SweepError(f"--only {item!r}: values of {key} are {', '.join(sorted(known))}")
        only.setdefault(key, set()).update(allowed)
    return only


def with_settings(spec: SweepSpec, items: Sequence[str]) -> SweepSpec:
    """``--set KEY=VALUE`` (YAML values): set a run-config or launcher key in every cell, over the sweep file."""
    if not items:
        return spec
    settings: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SweepError(f"--set {item!r}: expected KEY=VALUE, e.g. data-dir=/data")
        settings[key] = _yaml_scalar(value)
    _check_setting_keys(settings, "--set")
    return replace(spec, overrides=(*spec.overrides, Override({}, settings)))


def _yaml_scalar(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def selected(cell: Cell, only: Mapping[str, set[str]]) -> bool:
    return all(
        (str(cell.seed) if key == "seed" else value_text(cell.coords[key])) in allowed for key, allowed in only.items()
    )


# ------------------------------------------------------------ running cells


@dataclass(frozen=True)
class CellRun:
    """Everything a runner needs to run one cell into ``run_dir``."""

    cell: Cell
    run_name: str
    run_dir: Path
    run_config: Mapping[str, Any]  # cell.overrides + output-dir + run-name
    run_config_arg: str  # the same, as ``--run-config`` text
    num_clients: int
    cpus: int
    gpus: float
    timeout: float
    app_dir: Path
    flwr_home: Path  # the sweep's own Flower home (SuperLink config and logs)


Runner = Callable[[CellRun], int]


def launch_runner(run: CellRun) -> int:
    """The default runner: the real app through Flower's simulation engine.

    Each sweep uses its own ``FLWR_HOME``: the launcher writes the address of
    the SuperLink it starts into ``$FLWR_HOME/config.toml``, so a ``fedlt-run``
    started meanwhile from the same app directory would otherwise redirect
    this run's status queries to its own SuperLink.
    """
    import os

    from fedlt_app import launch

    before = os.environ.get("FLWR_HOME")
    os.environ["FLWR_HOME"] = str(run.flwr_home)
    try:
        return launch.run(run.app_dir, run.run_config_arg, run.num_clients, run.cpus, run.gpus, run.timeout)
    finally:
        if before is None:
            os.environ.pop("FLWR_HOME", None)
        else:
            os.environ["FLWR_HOME"] = before


@dataclass(frozen=True)
class CellState:
    # "completed"; "resume" (the last attempt stopped after a checkpoint: continue it with resume-from);
    # "partial" (results but no completed summary, nothing to continue: re-run as -retry<k>); or "new"
    status: str
    completed: Path | None
    next_name: str
    resume_from: Path | None = None


def cell_state(runs_dir: Path, name: str) -> CellState:
    """Where a cell stands. An interrupted attempt with a checkpoint whose resume replays the uninterrupted run
    (``methods.resumes_exactly``) is continued in its own folder; any other is re-run from round 1."""
    from fedlt_app.checkpoint import CHECKPOINT_FILE  # torch: only when a sweep plans its cells

    attempts = report.attempts(runs_dir, name)
    done = report.completed_attempt(runs_dir, name)
    if done is not None:
        return CellState("completed", done, name)
    if not attempts:
        return CellState("new", None, name)
    last = attempts[-1]  # oldest first
    if (last / CHECKPOINT_FILE).is_file() and replays_from_checkpoint(last):
        return CellState("resume", None, last.name, resume_from=last)
    return CellState("partial", None, f"{name}-retry{report.retry_index(last.name, name) + 1}")


def replays_from_checkpoint(run_dir: Path) -> bool:
    """An interrupted run whose resume gives the uninterrupted run's results (a method keeping no state on its
    clients, or clients that wrote theirs to the run folder); an unreadable config.json: no."""
    from fedlt_app.methods import resumes_exactly

    try:
        return resumes_exactly(json.loads((run_dir / "config.json").read_text())["run_config"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _check_finished_run(cell: Cell, run_dir: Path) -> None:
    """A finished run counts only if it ran what the sweep file says now."""
    try:
        info = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise SweepError(f"cell {cell.name}: {run_dir}/config.json is unreadable ({err})") from err
    ran = info.get("run_config", {})
    differ = [
        f"{k}: ran {recorded_value(ran, k)!r}, sweep says {v!r}"
        for k, v in cell.run_config.items()
        if k not in NOT_IDENTITY and not _same(recorded_value(ran, k), v)
    ]
    if "num_clients" in info and info["num_clients"] != cell.num_clients:
        differ.append(f"num-clients: ran {info['num_clients']}, sweep says {cell.num_clients}")
    if differ:
        raise SweepError(
            f"cell {cell.name}: the finished run {run_dir} does not match the sweep file ({'; '.join(differ)}); "
            f"the sweep file changed since it ran: use another sweep name or --output, or remove that run"
        )


def duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


@dataclass
class SweepOutcome:
    sweep_dir: Path
    cells: list[Cell]
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    not_selected: list[str] = field(default_factory=list)
    stopped: bool = False

    @property
    def ok(self) -> bool:
        return not self.failed and not self.stopped


def sweep_manifest(spec: SweepSpec, cells: Sequence[Cell]) -> dict[str, Any]:
    return {
        "name": spec.name,
        "description": spec.description,
        "source": spec.source,
        "rows": list(spec.rows),
        "columns": list(spec.columns),
        "ablation": spec.ablation,
        "paired": {"key": spec.paired[0], "reference": spec.paired[1]} if spec.paired else None,
        "seeds": list(spec.seeds),
        "axes": [
            {"key": a.key, "values": [value_text(v) for v in a.values], "bundle": a.is_bundle} for a in spec.axes
        ],
        "axis_labels": dict(spec.axis_labels),
        "value_labels": {k: dict(v) for k, v in spec.value_labels.items()},
        "spec": json.loads(json.dumps(spec.raw, default=str)),
        "cells": [c.describe() for c in cells],
    }


def run_sweep(
    spec: SweepSpec,
    output: str | Path,
    runner: Runner = launch_runner,
    *,
    only: Mapping[str, set[str]] | None = None,
    app_dir: str | Path = APP_DIR,
    cpus: int | None = None,
    gpus: float | None = None,
    timeout: float | None = None,
    dry_run: bool = False,
    max_failures_in_a_row: int = 3,
    write_report: bool = True,
    log: Callable[[str], None] = lambda line: print(line, flush=True),
    clock: Callable[[], float] = time.monotonic,
) -> SweepOutcome:
    """Run every unfinished (selected) cell of ``spec`` under ``<output>/<spec.name>/``.

    ``runner`` runs one cell and returns an exit code (0 = completed); tests
    inject one that writes the app's outputs. Cells are validated before any
    runs; finished ones are skipped; partial ones re-run as ``-retry<k>``.
    ``cpus``/``gpus`` override every cell's resources (not its identity).
    """
    cells = expand(spec)
    only = only or {}
    sweep_dir = Path(output).expanduser().resolve() / spec.name
    runs_dir = sweep_dir / "runs"
    outcome = SweepOutcome(sweep_dir, cells)

    plan: list[tuple[Cell, CellState]] = []
    for cell in cells:
        state = cell_state(runs_dir, cell.name)
        if state.completed is not None:
            _check_finished_run(cell, state.completed)
        plan.append((cell, state))
    todo = [(c, s) for c, s in plan if s.status != "completed" and selected(c, only)]
    outcome.not_selected = [c.name for c, _ in plan if not selected(c, only)]
    if not dry_run and any((gpus if gpus is not None else c.gpus) > 0 for c, _ in todo):
        _check_gpu()
    total = len(cells)
    log(
        f"[sweep] {spec.name}: {total} cells ({len(spec.seeds)} seeds), "
        f"{sum(s.status == 'completed' for _, s in plan)} finished, {len(todo)} to run"
        + (f", {len(outcome.not_selected)} not selected by --only" if outcome.not_selected else "")
        + f" -> {sweep_dir}"
    )
    if dry_run:
        for k, (cell, state) in enumerate(plan, 1):
            what = {"completed": "finished, skip", "partial": f"partial results, re-run as {state.next_name}",
                    "resume": f"interrupted, continue {state.next_name} from its checkpoint",
                    "new": "run"}[state.status]
            if state.status != "completed" and not selected(cell, only):
                what = "not selected"
            log(f"[sweep] cell {k}/{total} {cell.name}: {what}")
            arg = run_config_arg(cell.overrides)
            log(f"         --num-clients {cpus_text(cell, cpus, gpus)} --run-config \"{arg}\"")
        return outcome

    sweep_dir.mkdir(parents=True, exist_ok=True)
    runs_dir.mkdir(exist_ok=True)
    (sweep_dir / "sweep.json").write_text(json.dumps(sweep_manifest(spec, cells), indent=2))
    started = clock()
    run_seconds = 0.0
    run_rounds = 0
    prior = _prior_seconds_per_round(sweep_dir, plan)
    failures_in_a_row = 0
    rounds_left = sum(c.run_config["num-server-rounds"] for c, _ in todo)
    for k, (cell, state) in enumerate(plan, 1):
        if state.status == "completed":
            outcome.skipped.append(cell.name)
            log(f"[sweep] cell {k}/{total} {cell.name}: finished earlier ({state.completed.name}), skipped")
            continue
        if not selected(cell, only):
            continue
        rate = run_seconds / run_rounds if run_rounds else prior
        remaining = f"estimated remaining {duration(rate * rounds_left)}" if rate else "estimated remaining unknown"
        retry = {"partial": f" (partial results left; re-running as {state.next_name})",
                 "resume": f" (interrupted; continuing {state.next_name} from its checkpoint)"}.get(state.status, "")
        log(f"[sweep] cell {k}/{total} {cell.name}: elapsed {duration(clock() - started)}, {remaining}{retry}")
        run_config = {**cell.overrides, "output-dir": str(runs_dir), "run-name": state.next_name}
        if state.resume_from is not None:  # the app continues in the checkpoint's folder
            run_config["resume-from"] = str(state.resume_from)
        run = CellRun(
            cell=cell,
            run_name=state.next_name,
            run_dir=runs_dir / state.next_name,
            run_config=run_config,
            run_config_arg=run_config_arg(run_config),
            num_clients=cell.num_clients,
            cpus=cpus if cpus is not None else cell.cpus,
            gpus=gpus if gpus is not None else cell.gpus,
            timeout=timeout if timeout is not None else spec.timeout,
            app_dir=Path(app_dir),
            flwr_home=sweep_dir / "flwr-home",
        )
        cell_started = clock()
        code = runner(run)
        took = clock() - cell_started
        rounds = cell.run_config["num-server-rounds"]
        rounds_left -= rounds
        status = report.run_status(run.run_dir) or ("partial" if run.run_dir.exists() else "no results")
        with open(sweep_dir / CELL_LOG, "a", encoding="utf-8") as cell_log:
            cell_log.write(json.dumps({
                "cell": cell.name, "run_name": run.run_name, "exit_code": code, "status": status,
                "seconds": round(took, 3), "rounds": rounds, "ended": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }) + "\n")
        if code == 0 and status == "completed":
            run_seconds += took
            run_rounds += rounds
            failures_in_a_row = 0
            outcome.ran.append(cell.name)
            log(f"[sweep] cell {k}/{total} {cell.name}: completed in {duration(took)}")
        else:
            failures_in_a_row += 1
            outcome.failed.append(cell.name)
            log(f"[sweep] cell {k}/{total} {cell.name}: FAILED after {duration(took)} (exit code {code}); "
                f"a later invocation re-runs it")
            if failures_in_a_row >= max_failures_in_a_row:
                outcome.stopped = True
                log(f"[sweep] {failures_in_a_row} cells failed in a row; stopping (see the logs above)")
                break
    log(f"[sweep] {spec.name}: ran {len(outcome.ran)}, skipped {len(outcome.skipped)}, failed {len(outcome.failed)} "
        f"in {duration(clock() - started)}")
    if write_report:
        for path in report.write_report(sweep_dir, log=log):
            log(f"[sweep] wrote {path}")
    return outcome


def cpus_text(cell: Cell, cpus: int | None, gpus: float | None) -> str:
    c = cpus if cpus is not None else cell.cpus
    g = gpus if gpus is not None else cell.gpus
    return f"{cell.num_clients} --cpus-per-client {c} --gpus-per-client {value_text(g)}"


def _prior_seconds_per_round(sweep_dir: Path, plan: Sequence[tuple[Cell, CellState]]) -> float:
    """Wall seconds per round of the cells run by earlier invocations (``cells.jsonl``), for the first
    estimate; failing that, the finished runs' own round times (which miss each run's start-up)."""
    seconds = rounds = 0.0
    try:
        for line in (sweep_dir / CELL_LOG).read_text().splitlines():
            entry = json.loads(line)
            if entry.get("status") == "completed":
                seconds += float(entry["seconds"])
                rounds += int(entry["rounds"])
    except (OSError, ValueError, KeyError, TypeError):
        seconds = rounds = 0.0
    if rounds:
        return seconds / rounds
    for _, state in plan:
        if state.completed is None:
            continue
        try:
            summary = json.loads((state.completed / "summary.json").read_text())
            seconds += float(summary["total_seconds"])
            rounds += int(summary["rounds"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return seconds / rounds if rounds else 0.0


def _check_gpu() -> None:
    import torch

    if not torch.cuda.is_available():
        raise SweepError(
            "this sweep asks for gpus-per-client > 0 but torch sees no CUDA device (Ray would wait forever for one); "
            "run it with --gpus-per-client 0 on a CPU-only machine"
        )


# ---------------------------------------------------------------------- CLI


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedlt-sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", type=Path, help="a sweep file, e.g. conf/sweeps/cpu-fmnist-ir100.yaml")
    parser.add_argument("--output", type=Path, default=Path("results"), help="results root (default: results)")
    parser.add_argument("--dry-run", action="store_true", help="validate every cell and print the plan; run nothing")
    parser.add_argument("--report-only", action="store_true", help="only (re)write the tables and plots")
    parser.add_argument("--only", action="append", default=[], metavar="KEY=V[,V]",
                        help="run only the cells with these grid values (repeatable; e.g. --only seed=0)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="set a run-config or launcher key in every cell (repeatable; e.g. --set data-dir=/data)")
    parser.add_argument("--app", type=Path, default=APP_DIR, help="the Flower app directory (default: this app)")
    parser.add_argument("--cpus-per-client", type=int, help="override every cell's CPU cores per client")
    parser.add_argument("--gpus-per-client", type=float, help="override every cell's GPU fraction (0 on a CPU machine)")
    parser.add_argument("--timeout", type=float, help="per-cell time limit in seconds (default: the sweep file's)")
    parser.add_argument("--max-failures-in-a-row", type=int, default=3, help="stop after this many (default 3)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # unwind like Ctrl-C: the launcher then stops its SuperLink
    try:
        spec = with_settings(load_spec(args.spec), args.set)
        if args.report_only:
            sweep_dir = args.output.expanduser().resolve() / spec.name
            if (sweep_dir / "sweep.json").is_file():  # the report's own keys (e.g. paired) may be newer
                (sweep_dir / "sweep.json").write_text(json.dumps(sweep_manifest(spec, expand(spec)), indent=2))
            for path in report.write_report(args.output.expanduser().resolve() / spec.name):
                print(f"[sweep] wrote {path}")
            return 0
        outcome = run_sweep(
            spec,
            args.output,
            only=parse_only(args.only, spec),
            app_dir=args.app,
            cpus=args.cpus_per_client,
            gpus=args.gpus_per_client,
            timeout=args.timeout,
            dry_run=args.dry_run,
            max_failures_in_a_row=args.max_failures_in_a_row,
        )
    except (SweepError, report.ReportError) as err:
        print(f"fedlt-sweep: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\n[sweep] interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    if outcome.failed:
        print(f"fedlt-sweep: {len(outcome.failed)} cell(s) failed: {', '.join(outcome.failed)}", file=sys.stderr)
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main())
