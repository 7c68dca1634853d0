"""The run-config schema: defaults, validation, presets."""

from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from fedlt_app import config
from fedlt_app.config import ConfigError, RunConfig, defaults, resolve

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- defaults


def test_resolve_of_nothing_gives_the_defaults() -> None:
    cfg = resolve({})
    assert cfg.as_dict() == defaults()
    for key, value in defaults().items():
        got = getattr(cfg, key.replace("-", "_"))
        assert got == value and type(got) is type(value), key


def test_pyproject_run_config_equals_the_schema_defaults() -> None:
    with (ROOT / "pyproject.toml").open("rb") as f:
        table = tomllib.load(f)["tool"]["flwr"]["app"]["config"]
    expected = defaults()
    assert list(table) == list(expected)  # same keys (and the same order as the schema)
    for key, value in expected.items():
        assert table[key] == value and type(table[key]) is type(value), key


def test_resolving_the_pyproject_defaults_changes_nothing() -> None:
    with (ROOT / "pyproject.toml").open("rb") as f:
        table = tomllib.load(f)["tool"]["flwr"]["app"]["config"]
    assert resolve(table) == resolve({})


def test_run_config_fields_are_the_schema_keys() -> None:
    assert [f.name for f in fields(RunConfig)] == [k.replace("-", "_") for k in defaults()]


def test_as_dict_round_trips() -> None:
    cfg = resolve({"method": "fedavg", "dataset": "cifar10", "model": "resnet56", "seed": 7, "server-lr": 0.5})
    assert resolve(cfg.as_dict()) == cfg


def test_minority_classes_parse() -> None:
    assert resolve({"minority-classes": " 1, 4 ,9,"}).minority_class_tuple == (1, 4, 9)
    assert resolve({}).minority_class_tuple == (0, 7, 8)


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_ints_are_accepted_for_float_keys() -> None:
    cfg = resolve({"imbalance-ratio": 100, "dirichlet-alpha": 2, "local-lr": 1, "rebalance-lambda": 0})
    assert cfg.imbalance_ratio == 100.0 and isinstance(cfg.imbalance_ratio, float)
    assert cfg.dirichlet_alpha == 2.0 and isinstance(cfg.dirichlet_alpha, float)
    assert cfg.local_lr == 1.0 and isinstance(cfg.local_lr, float)
    assert cfg.rebalance_lambda == 0.0 and isinstance(cfg.rebalance_lambda, float)


def test_integral_floats_are_accepted_for_int_keys() -> None:
    cfg = resolve({"num-server-rounds": 5.0})
    assert cfg.num_server_rounds == 5 and isinstance(cfg.num_server_rounds, int)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("imbalance-ratio", 1.0),
        ("dirichlet-alpha", 1e-3),
        ("rebalance-lambda", 0.0),
        ("balance-threshold", 1),
        ("momentum", 0.0),
        ("clients-per-round", 3),
        ("grad-clip", 0.0),
        ("partition", "iid"),
        ("partition", "dirichlet-per-class"),
        ("imbalance-profile", "step"),
        ("dataset", "cifar100"),
        ("model", "cnn-mcmahan"),
        ("method", "fedavg"),
    ],
)
def test_boundary_and_alternative_values_are_accepted(key: str, value) -> None:
    assert resolve({key: value}).as_dict()[key] == value


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("method", "fedprox-typo"),
        ("dataset", "imagenet"),
        ("model", "vgg"),
        ("partition", "shards"),
        ("imbalance-profile", "linear"),
        ("device", "tpu"),
        ("wandb-mode", "sometimes"),
        ("dirichlet-alpha", 0.0),
        ("dirichlet-alpha", -1.0),
        ("dirichlet-alpha", float("inf")),
        ("dirichlet-alpha", float("nan")),
        ("imbalance-ratio", 0.5),
        ("rebalance-lambda", -0.1),
        ("balance-threshold", 0),
        ("local-lr", 0.0),
        ("local-lr", -0.01),
        ("server-lr", 0.0),
        ("momentum", 1.0),
        ("momentum", -0.1),
        ("num-server-rounds", 0),
        ("clients-per-round", -1),
        ("local-epochs", 0),
        ("batch-size", 0),
        ("grad-clip", -1.0),
        ("prox-mu", -0.1),
        ("samples-per-class", -1),
        ("num-server-rounds", "5"),
        ("num-server-rounds", 5.5),
        ("seed", 1.5),
        ("seed", "0"),
        ("seed", True),
        ("imbalance-ratio", "100"),
        ("method", 3),
        ("minority-classes", "a,b"),
        ("minority-classes", "1,-2"),
        ("minority-classes", ","),
    ],
)
def test_bad_values_raise_naming_the_key(key: str, value) -> None:
    with pytest.raises(ConfigError) as info:
        resolve({key: value})
    assert str(info.value).startswith(key), str(info.value)


@pytest.mark.parametrize(("key", "value"), [("seed", False), ("local-epochs", True), ("prox-mu", False)])
def test_bools_are_refused_even_when_equal_to_the_default(key: str, value: bool) -> None:
    with pytest.raises(ConfigError, match=f"^{key}"):
        resolve({key: value})


def test_unknown_key_raises_naming_it() -> None:
    with pytest.raises(ConfigError, match="num-rounds"):
        resolve({"num-rounds": 3})


def test_unknown_key_is_refused_even_next_to_valid_ones() -> None:
    with pytest.raises(ConfigError, match="learning-rate"):
        resolve({"method": "fedavg", "learning-rate": 0.1})


def test_unknown_preset_lists_the_known_presets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "alpha.yaml").write_text("seed: 1\n")
    (tmp_path / "beta.yaml").write_text("seed: 2\n")
    monkeypatch.setattr(config, "CONF_DIR", tmp_path)
    with pytest.raises(ConfigError) as info:
        resolve({"preset": "gamma"})
    message = str(info.value)
    assert message.startswith("preset") and "gamma" in message
    assert "alpha" in message and "beta" in message


def test_unknown_preset_in_the_real_conf_dir_lists_its_presets() -> None:
    known = sorted(p.stem for p in (ROOT / "conf").glob("*.yaml"))
    assert known, "conf/ holds no preset"
    with pytest.raises(ConfigError) as info:
        resolve({"preset": "no-such-preset"})
    assert all(name in str(info.value) for name in known)


# ---------------------------------------------------------------- presets


@pytest.fixture
def preset_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(config, "CONF_DIR", tmp_path)
    return tmp_path


def test_defaults_then_preset_then_explicit(preset_dir: Path) -> None:
    (preset_dir / "cifar.yaml").write_text(
        "dataset: cifar10\nmodel: resnet56\nlocal-lr: 0.05\nnum-server-rounds: 200\nmethod: fedavg\n"
    )
    cfg = resolve({"preset": "cifar", "local-lr": 0.2, "num-server-rounds": 3, "seed": 4})
    base = defaults()
    # explicit (non-default) values beat the preset
    assert cfg.local_lr == 0.2
    assert cfg.num_server_rounds == 3
    assert cfg.seed == 4
    # keys only the preset sets come from the preset
    assert cfg.dataset == "cifar10"
    assert cfg.model == "resnet56"
    assert cfg.method == "fedavg"
    # keys neither sets keep the schema default
    assert cfg.batch_size == base["batch-size"]
    assert cfg.dirichlet_alpha == base["dirichlet-alpha"]
    assert cfg.preset == "cifar"


def test_key_left_at_default_takes_the_presets_value(preset_dir: Path) -> None:
    """Flower merges pyproject defaults with overrides, so a default-valued key is not explicit."""
    (preset_dir / "p.yaml").write_text("model: resnet56\ndataset: cifar10\n")
    assert resolve({"preset": "p", "model": "cnn"}).model == "resnet56"
    assert resolve({"preset": "p", "model": "cnn-mcmahan"}).model == "cnn-mcmahan"


def test_full_pyproject_style_mapping_with_preset(preset_dir: Path) -> None:
    (preset_dir / "p.yaml").write_text("imbalance-ratio: 10\nlocal-epochs: 5\n")
    given = {**defaults(), "preset": "p", "local-epochs": 2}
    cfg = resolve(given)
    assert cfg.imbalance_ratio == 10.0 and isinstance(cfg.imbalance_ratio, float)
    assert cfg.local_epochs == 2


def test_preset_with_unknown_key_raises(preset_dir: Path) -> None:
    (preset_dir / "bad.yaml").write_text("dataset: cifar10\nlearning-rate: 0.1\n")
    with pytest.raises(ConfigError, match="learning-rate"):
        resolve({"preset": "bad"})


def test_preset_with_bad_value_raises_naming_the_key(preset_dir: Path) -> None:
    (preset_dir / "bad.yaml").write_text("dirichlet-alpha: -1.0\n")
    with pytest.raises(ConfigError, match="^dirichlet-alpha"):
        resolve({"preset": "bad"})


def test_preset_naming_another_preset_raises(preset_dir: Path) -> None:
    (preset_dir / "a.yaml").write_text("preset: b\n")
    (preset_dir / "b.yaml").write_text("seed: 3\n")
    with pytest.raises(ConfigError, match="preset"):
        resolve({"preset": "a"})


def test_preset_that_is_not_a_mapping_raises(preset_dir: Path) -> None:
    (preset_dir / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="preset"):
        resolve({"preset": "list"})


@pytest.mark.parametrize("path", sorted((ROOT / "conf").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_preset_resolves(path: Path) -> None:
    given = {"preset": path.stem}
    if config.load_preset(path.stem).get("method") in config.CLIP_METHODS:  # CAPT's: need only the weights
        given["clip-weights"] = "/weights/ViT-B-16.pt"
    cfg = resolve(given)
    assert cfg.preset == path.stem
    # every value the preset sets is what the resolved config holds
    for key, value in config.load_preset(path.stem).items():
        assert cfg.as_dict()[key] == value, key


CIFAR_PRESETS = sorted(p.stem for p in (ROOT / "conf").glob("cifar*-lt*.yaml"))


def test_the_cifar_presets_are_found() -> None:
    assert CIFAR_PRESETS == ["cifar10-lt", "cifar10-lt-partial", "cifar100-lt", "cifar100-lt-partial"]


@pytest.mark.parametrize("name", CIFAR_PRESETS)
def test_cifar_presets_use_climbs_cifar_epsilon_and_dual_step(name: str) -> None:
    """CLIMB's paper: epsilon 0.1 and eta_D 0.1 on CIFAR (the schema defaults 0.01 and 2.0 are its MNIST values)."""
    cfg = resolve({"preset": name})
    assert (cfg.climb_epsilon, cfg.climb_dual_lr) == (0.1, 0.1)
    assert resolve({"preset": name, "method": "climb"}).climb_epsilon == 0.1


def test_sweep_cells_on_cifar_presets_run_climbs_cifar_values() -> None:
    from fedlt_app import sweep_grid

    seen = 0
    for path in sorted((ROOT / "conf" / "sweeps").glob("*.yaml")):
        for cell in sweep_grid.expand(sweep_grid.load_spec(path)):
            if cell.run_config.get("preset") in CIFAR_PRESETS:
                seen += 1
                assert (cell.run_config["climb-epsilon"], cell.run_config["climb-dual-lr"]) == (0.1, 0.1), cell.name
    assert seen


def test_readme_documents_every_run_config_key() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    missing = [o.key for o in config.SCHEMA if f"| `{o.key}` |" not in readme]
    assert not missing, f"README's run-config table lacks {missing}"


def _wrong_type(option: config.Option) -> object:
    return "not-a-number" if option.kind in (int, float) else (3 if option.kind is str else "yes")


@pytest.mark.parametrize("option", config.SCHEMA, ids=lambda o: o.key)
def test_every_key_rejects_a_wrong_type_by_name(option: config.Option) -> None:
    with pytest.raises(ConfigError, match=f"^{option.key}: expected"):
        resolve({option.key: _wrong_type(option)})


OUT_OF_RANGE = {int: -7, float: -7.5, str: "no-such-value"}


@pytest.mark.parametrize("option", [o for o in config.SCHEMA if o.check is not None], ids=lambda o: o.key)
def test_every_checked_key_rejects_an_out_of_range_value_by_name(option: config.Option) -> None:
    value = OUT_OF_RANGE.get(option.kind, OUT_OF_RANGE[str])
    if option.check(value) is None:  # e.g. a key for which -7 is allowed
        value = float("inf") if option.kind is float else 10**9
    assert option.check(value) is not None, f"{option.key}: no out-of-range probe"
    with pytest.raises(ConfigError, match=f"^{option.key}"):
        resolve({option.key: value})
