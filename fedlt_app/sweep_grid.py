"""The grid of a sweep file: what ``fedlt-sweep`` runs, before anything runs.

A sweep file (``conf/sweeps/<name>.yaml``) names a base run config, a grid of
run-config keys (plus the launcher's ``num-clients``), a list of seeds, which
grid key(s) make the table's rows, and optional per-row overrides.
:func:`load_spec` reads and checks it (every key named where it is wrong);
:func:`expand` turns it into :class:`Cell` s, one per grid point and seed, each
resolved with :func:`fedlt_app.config.resolve` exactly as the app will resolve
it, so a bad cell fails here and not hours into a sweep. Running the cells is
:mod:`fedlt_app.sweep`'s job.

The sweep-file format is described in the README ("Reproducing the paper's tables").
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fedlt_app.config import OPTIONS, ConfigError, defaults, load_preset, resolve
from fedlt_app.sweep_results import value_text

# Launcher options: not run-config keys, but a cell may set them like one.
# num-clients changes the experiment (it is part of a cell's identity);
# cpus/gpus per client only change how fast it runs.
LAUNCHER_DEFAULTS: dict[str, Any] = {"num-clients": 10, "cpus-per-client": 1, "gpus-per-client": 0.0}
SPEC_KEYS = (
    "name", "description", "base", "rows", "grid", "seeds", "more-seeds", "row-overrides", "overrides", "exclude",
    "ablation", "paired", "axis-labels", "value-labels", "timeout", *LAUNCHER_DEFAULTS,
)
DEFAULT_TIMEOUT = 72 * 3600.0
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
class MoreSeeds:
    """Seeds beyond the sweep's ``seeds`` for the cells matching ``when``: where a paired difference is smaller
    than its spread over the common seeds, those settings (and the paired reference) need more."""

    when: Mapping[str, Any]
    seeds: tuple[int, ...]


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
    # (grid key, reference values): tables of per-seed differences to each (the first: table-paired.csv)
    paired: tuple[str, tuple[str, ...]] | None
    axis_labels: Mapping[str, str]
    value_labels: Mapping[str, Mapping[str, str]]
    launcher: Mapping[str, Any]
    timeout: float
    source: str = ""
    raw: Mapping[str, Any] = field(default_factory=dict)
    more_seeds: tuple[MoreSeeds, ...] = ()

    @property
    def columns(self) -> tuple[str, ...]:
        """Every grid key that is not a row key: together they name a table column (a setting)."""
        return tuple(a.key for a in self.axes if a.key not in self.rows)

    def axis(self, key: str) -> Axis:
        return next(a for a in self.axes if a.key == key)

    def seeds_at(self, coords: Mapping[str, Any]) -> tuple[int, ...]:
        """The seeds a grid point runs: the sweep's ``seeds``, then those ``more-seeds`` adds for it."""
        extra = [s for m in self.more_seeds if _matches(coords, m.when) for s in m.seeds]
        return tuple(dict.fromkeys([*self.seeds, *extra]))

    @property
    def all_seeds(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys([*self.seeds, *(s for m in self.more_seeds for s in m.seeds)]))


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

    more_seeds = [_parse_more_seeds(item, axes, seeds, f"more-seeds[{i}]")
                  for i, item in enumerate(data.get("more-seeds") or [])]

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
        more_seeds=tuple(more_seeds),
    )


def _parse_more_seeds(value: Any, axes: Sequence[Axis], seeds: Sequence[int], where: str) -> MoreSeeds:
    """``{when: {grid key: value}, seeds: [3, 4]}``: seeds the matching cells run beyond the sweep's ``seeds``."""
    item = _mapping(value, where)
    if set(item) != {"when", "seeds"}:
        raise SweepError(f"{where}: expected {{when: {{grid key: value}}, seeds: [seed, ...]}}")
    when = _mapping(item["when"], f"{where}.when")
    _check_grid_match(when, axes, f"{where}.when")
    extra = item["seeds"]
    if not isinstance(extra, list) or not extra or any(not isinstance(s, int) or isinstance(s, bool) for s in extra):
        raise SweepError(f"{where}.seeds: expected a non-empty list of integers, got {extra!r}")
    if len(set(extra)) != len(extra) or set(extra) & set(seeds):
        raise SweepError(f"{where}.seeds: {extra!r} repeats a seed or one of the sweep's seeds {list(seeds)}")
    return MoreSeeds(when, tuple(extra))


def _parse_paired(value: Any, axes: Sequence[Axis]) -> tuple[str, tuple[str, ...]] | None:
    """``paired: {key: method, reference: fedavg}``: compare every value of ``key`` with the reference, per seed;
    ``reference: [fedavg, mine]``: with each of them, a table each (e.g. the baseline, and a method every other
    one must trail on every seed)."""
    if value is None:
        return None
    item = _mapping(value, "paired")
    if set(item) != {"key", "reference"}:
        raise SweepError("paired: expected {key: <grid key>, reference: <one of its values, or a list of them>}")
    key = str(item["key"])
    references = item["reference"] if isinstance(item["reference"], list) else [item["reference"]]
    if not references:
        raise SweepError("paired: reference: an empty list; name at least one value of the grid key")
    for reference in references:
        _check_grid_match({key: reference}, axes, "paired")
    texts = tuple(value_text(r) for r in references)
    if len(set(texts)) < len(texts):
        raise SweepError(f"paired: reference: a value twice in {list(texts)}")
    if len(next(a for a in axes if a.key == key).values) < 2:
        raise SweepError(f"paired: grid key {key!r} has a single value; nothing to compare with the reference")
    return key, texts


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
        for seed in spec.seeds_at(coords):
            name = cell_name(spec, coords, seed)
            if name in names:
                raise SweepError(f"two cells would share the name {name!r}; make the grid values distinct")
            names.add(name)
            cells.append(_make_cell(spec, name, coords, seed, layers))
    if not cells:
        raise SweepError("the grid has no cells left after 'exclude'")
    _check_more_seeds_paired(spec, cells)
    return cells


def _check_more_seeds_paired(spec: SweepSpec, cells: Sequence[Cell]) -> None:
    """A seed that ``more-seeds`` adds must reach the paired table: its cell needs a partner at the sweep's main
    reference with the same seed (the other references' tables count only the seeds they share)."""
    if spec.paired is None:
        return
    key, references = spec.paired
    present = {(tuple((k, value_text(v)) for k, v in c.coords.items()), c.seed) for c in cells}
    for cell in cells:
        if cell.seed in spec.seeds:
            continue
        partner = tuple((k, references[0] if k == key else value_text(v)) for k, v in cell.coords.items())
        if (partner, cell.seed) not in present:
            raise SweepError(f"more-seeds: cell {cell.name} has no partner at {key}={references[0]} with seed "
                             f"{cell.seed}, so it could not be paired; add that seed for {{{key}: {references[0]}}}")


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
        known = {str(s) for s in spec.all_seeds} if key == "seed" else {value_text(v) for v in spec.axis(key).values}
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
