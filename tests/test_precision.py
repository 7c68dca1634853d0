"""Mixed precision: validation, and that only the arithmetic changes, never the state."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fedlt_app import precision as precision_module
from fedlt_app.checkpoint import check_resumable
from fedlt_app.config import ConfigError, defaults, recorded_value, resolve
from fedlt_app.methods import get_method
from fedlt_app.methods.base import ClientReport
from fedlt_app.methods.decoupled.redgrape import RedGrapeServer
from fedlt_app.models import build_model
from fedlt_app.precision import Precision, precision_for
from fedlt_app.train import LocalTraining, train_locally

CPU = torch.device("cpu")
TOLERANCE = 0.15  # relative error of one local update against fp32


@pytest.fixture
def native_cpu(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Pretend the CPU has (True) or lacks (False) native bf16."""

    def set_native(value: bool) -> None:
        monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: value)

    return set_native


def test_unknown_precision_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="precision: must be one of fp32, bf16, fp16, auto"):
        resolve({"precision": "int8"})


def test_fp16_needs_cuda() -> None:
    with pytest.raises(ConfigError, match="precision: 'fp16' needs a CUDA device"):
        precision_for("fp16", CPU)


def test_bf16_is_refused_where_the_cpu_only_emulates_it(native_cpu) -> None:  # type: ignore[no-untyped-def]
    native_cpu(False)
    with pytest.raises(ConfigError, match="precision: 'bf16' is not native here"):
        precision_for("bf16", CPU)
    assert precision_for("auto", CPU).name == "fp32"


def test_auto_is_bf16_where_native(native_cpu) -> None:  # type: ignore[no-untyped-def]
    native_cpu(True)
    assert precision_for("auto", CPU) == Precision("bf16", "cpu")
    assert precision_for("bf16", CPU).dtype is torch.bfloat16
    assert precision_for("fp32", CPU).enabled is False


def test_cpu_flags_decide_native_bf16(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    fake = tmp_path / "cpuinfo"
    monkeypatch.setattr(precision_module, "Path", lambda _: fake)
    for flags, expected in (("fpu avx512f avx512_bf16", True), ("fpu amx_bf16 amx_tile", True), ("fpu avx512f", False)):
        fake.write_text(f"flags\t\t: {flags}\n")
        precision_module.cpu_has_native_bf16.cache_clear()
        assert precision_module.cpu_has_native_bf16() is expected
    precision_module.cpu_has_native_bf16.cache_clear()


def one_step(model: torch.nn.Module, precision: str, method: str = "fedavg") -> dict[str, torch.Tensor]:
    """The weight change of one local SGD step on a fixed batch of 64 Fashion-MNIST-shaped images."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 1, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (64,), generator=g)
    before = copy.deepcopy(model.state_dict())
    setup = LocalTraining(epochs=1, batch_size=64, lr=0.05, momentum=0.9, grad_clip=1.0, prox_mu=0.0,
                          dataset="fmnist", precision=precision)
    client = get_method(method).client(resolve({"method": method}), 10, {})
    torch.manual_seed(1)  # dropout
    train_locally(model, images, labels, client, setup, torch.Generator().manual_seed(2))
    return {k: model.state_dict()[k] - before[k] for k in before}


def relative_error(update: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    diff = torch.cat([(update[k].float() - reference[k]).flatten() for k in reference])
    return float(diff.norm() / torch.cat([v.flatten() for v in reference.values()]).norm())


def cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("cnn", 10, 1, 28)


def test_one_bf16_step_stays_close_to_fp32_and_keeps_fp32_weights(native_cpu) -> None:  # type: ignore[no-untyped-def]
    native_cpu(True)  # the numerics are bf16's on any CPU (emulated, slower, where not native)
    reference = one_step(cnn(), "fp32")
    model = cnn()
    update = one_step(model, "bf16")
    error = relative_error(update, reference)
    # bf16 keeps 8 bits of mantissa: ~6 % relative error on this step's (clipped) update; bf16 master
    # weights give >100 % (the test below). Zero would mean autocast never ran.
    assert 0.0 < error < TOLERANCE
    assert all(v.dtype == torch.float32 for v in model.state_dict().values())


def test_bf16_master_weights_would_exceed_the_tolerance() -> None:
    """What the tolerance above guards against: weights stored in bf16 lose most of a small update."""
    reference = one_step(cnn(), "fp32")
    broken = cnn().to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 1, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (64,), generator=g)
    before = copy.deepcopy(broken.state_dict())
    optimizer = torch.optim.SGD(broken.parameters(), lr=0.05, momentum=0.9)
    torch.manual_seed(1)
    x = (images.float() / 255.0).to(torch.bfloat16)
    torch.nn.functional.cross_entropy(broken(x), labels).backward()
    torch.nn.utils.clip_grad_norm_(broken.parameters(), 1.0)
    optimizer.step()
    update = {k: broken.state_dict()[k].float() - before[k].float() for k in before}
    assert relative_error(update, reference) > TOLERANCE


def test_fp16_with_gradient_scaling_trains_fp32_weights() -> None:
    """The fp16 path (CUDA in real runs) exercised on CPU: scaled backward, unscaled step, fp32 state."""
    reference = one_step(cnn(), "fp32")
    model = cnn()
    fp16 = Precision("fp16", "cpu")
    original = precision_module.precision_for
    try:
        import fedlt_app.train as train_module

        train_module.precision_for = lambda name, device: fp16 if name == "fp16" else original(name, device)
        update = one_step(model, "fp16")
    finally:
        train_module.precision_for = original
    assert relative_error(update, reference) < TOLERANCE
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in model.state_dict().values())


def test_prototypes_and_reports_are_fp32_in_bf16(native_cpu) -> None:  # type: ignore[no-untyped-def]
    native_cpu(True)  # emulated where the CPU lacks native bf16: same dtypes, the point of this test
    for method in ("redgrape", "creff"):
        model = get_method(method).extend_model(cnn())
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (80, 1, 28, 28), generator=g, dtype=torch.uint8)
        labels = torch.arange(10).repeat(8)
        cfg = resolve({"method": method, "precision": "fp32"})
        payload = {}
        if method == "redgrape":
            payload = {"proto-weight": np.zeros((10, 10, 128), np.float32),
                       "proto-bias": np.zeros((10, 10), np.float32), "proto-mask": np.ones(10, dtype=bool)}
        client = get_method(method).client(cfg, 10, payload)
        setup = LocalTraining(epochs=1, batch_size=32, lr=0.05, momentum=0.9, grad_clip=1.0, prox_mu=0.0,
                              dataset="fmnist", precision="bf16")
        train_locally(model, images, labels, client, setup, torch.Generator().manual_seed(1))
        report = client.report()
        floats = [v for v in report.values() if v.dtype.kind == "f"]
        assert floats and all(v.dtype == np.float32 for v in floats), method
        assert all(v.dtype == torch.float32 for v in model.state_dict().values())


def test_server_prototype_store_is_fp32_in_bf16_runs(native_cpu) -> None:  # type: ignore[no-untyped-def]
    native_cpu(True)
    cfg = resolve({"method": "redgrape", "precision": "bf16"})
    model = get_method("redgrape").extend_model(cnn())

    class Data:
        num_clients = 2

    server = RedGrapeServer(cfg, model, Data())  # type: ignore[arg-type]
    assert server.precision == Precision("bf16", "cpu")
    reports = [ClientReport(p, 10, {"proto-classes": np.array([0, 1]),
                                    "proto-weight": np.full((2, 10, 128), 0.1 * (p + 1), np.float64),
                                    "proto-bias": np.full((2, 10), 1.0, np.float64)}) for p in (0, 1)]
    server.absorb(1, reports)
    assert server.weight.dtype == np.float32 and server.bias.dtype == np.float32
    np.testing.assert_allclose(server.weight[0], 0.15, rtol=1e-6)


def test_server_training_in_bf16_sees_its_weights_change(native_cpu) -> None:  # type: ignore[no-untyped-def]
    """CReFF re-trains a classifier on the server. Autocast caches a weight's bf16 copy until its context
    exits, so one context around the whole loop would train on stale weights (every step at the initial
    point): the bf16 classifier must instead stay close to the fp32 one."""
    native_cpu(True)
    classifiers = {}
    for precision in ("fp32", "bf16"):
        cfg = resolve({"method": "creff", "precision": precision, "creff-features-per-class": 20,
                       "creff-retrain-epochs": 30, "creff-retrain-lr": 0.5})

        class Data:
            num_clients = 2

        server = get_method("creff").server(cfg, cnn(), Data())  # type: ignore[arg-type]
        with torch.no_grad():  # separable features: class c around 3·e_c
            server.features.copy_(0.3 * server.features + 3 * torch.eye(128)[server.feature_labels])
        classifiers[precision] = server.retrain_classifier().weight.detach()
    drift = (classifiers["bf16"] - classifiers["fp32"]).norm() / classifiers["fp32"].norm()
    assert drift < 0.05


def test_a_record_older_than_a_key_counts_as_what_runs_did_then() -> None:
    current = resolve({"precision": "fp32"}).as_dict()
    saved = {k: v for k, v in current.items() if k not in ("precision", "creff-retrain-lr")}
    check_resumable(saved, current)  # precision missing: runs before the key were float32
    with pytest.raises(ValueError, match="precision: 'fp32' -> 'auto'"):
        check_resumable(saved, {**current, "precision": "auto"})  # today's default is not what it ran
    assert recorded_value(saved, "precision") == "fp32" and defaults()["precision"] == "auto"
    # CReFF re-trained at the local lr; for another method the key is irrelevant
    assert recorded_value({**saved, "method": "creff", "local-lr": 0.05}, "creff-retrain-lr") == 0.05
    assert recorded_value(saved, "creff-retrain-lr") == defaults()["creff-retrain-lr"]
    assert recorded_value(saved, "fedlc-tau") == defaults()["fedlc-tau"]
