"""FLAT-LA (fedlt's method): FedAvg-LA's loss (tau 1.5) with SAM local steps, server momentum and server-side
averaging."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from app_runs import without_timing
from in_process import run_in_process
from test_secagg_e2e import secure_rows
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

from fedlt_app.config import (
    SAM_METHODS,
    SECAGG_METHODS,
    ConfigError,
    flat_la_average_start,
    recorded_value,
    resolve,
    resolve_recorded,
)
from fedlt_app.data.transforms import to_float
from fedlt_app.methods import get_method
from fedlt_app.methods.class_prior import PRIOR_KEY
from fedlt_app.methods.loss.fedavg_la import FedAvgLAClient
from fedlt_app.models import EncoderClassifier
from fedlt_app.train import LocalTraining, train_locally

NUM_CLASSES = 3


@pytest.mark.parametrize(("fraction", "rounds", "start"), [
    (0.5, 100, 51), (0.5, 3, 2), (0.0, 10, 1), (0.25, 10, 3), (0.99, 10, 10), (1.0, 100, 0)])
def test_the_averaging_starts_past_the_fraction_of_the_rounds(fraction: float, rounds: int, start: int) -> None:
    assert flat_la_average_start(fraction, rounds) == start


def test_flat_la_sets_the_mechanisms_from_its_own_keys() -> None:
    cfg = resolve({"method": "flat-la", "num-server-rounds": 100})
    assert (cfg.fedavg_la_tau, cfg.sam_rho, cfg.swa_start, cfg.server_opt, cfg.server_momentum) == (
        1.5, 0.05, 51, "fedavgm", 0.9)
    cfg = resolve({"method": "flat-la", "num-server-rounds": 20, "flat-la-rho": 0.1, "flat-la-average-from": 0.75,
                   "server-momentum": 0.5, "flat-la-tau": 0.5})
    assert (cfg.fedavg_la_tau, cfg.sam_rho, cfg.swa_start, cfg.server_opt, cfg.server_momentum) == (
        0.5, 0.1, 16, "fedavgm", 0.5)
    ablated = resolve({"method": "flat-la", "flat-la-rho": 0.0, "flat-la-average-from": 1.0, "flat-la-tau": 0.0})
    assert (ablated.fedavg_la_tau, ablated.sam_rho, ablated.swa_start) == (0.0, 0.0, 0)
    # a recorded (resolved) config resolves to itself: the general keys it carries agree with the method's
    assert resolve(cfg.as_dict()) == cfg
    # the other methods keep the general keys as given
    fedavg_la = resolve({"method": "fedavg-la"})
    assert (fedavg_la.fedavg_la_tau, fedavg_la.sam_rho, fedavg_la.swa_start) == (1.0, 0.0, 0)
    assert "flat-la" in SAM_METHODS and "flat-la" in SECAGG_METHODS


@pytest.mark.parametrize(("overrides", "message"), [
    ({"sam-rho": 0.1}, "sam-rho: method 'flat-la' sets it .* from flat-la-rho; leave sam-rho at 0.0"),
    ({"fedavg-la-tau": 2.0}, "fedavg-la-tau: method 'flat-la' sets it .* from flat-la-tau; leave fedavg-la-tau at 1.0"),
    ({"flat-la-tau": -0.5}, "flat-la-tau: must be >= 0"),
    ({"swa-start": 3, "num-server-rounds": 10}, "swa-start: method 'flat-la' sets it .* from flat-la-average-from"),
    ({"server-opt": "fedadam"}, "server-opt: method 'flat-la' sets it .* from server-momentum"),
    ({"flat-la-rho": -0.1}, "flat-la-rho: must be >= 0"),
    ({"flat-la-average-from": 1.5}, "flat-la-average-from: "),
    ({"al-method": "random"}, "al-method: method 'flat-la' is for plain federated runs"),
])
def test_bad_values_name_the_key(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve({"method": "flat-la", **overrides})


def test_a_run_recorded_before_flat_la_tau_reads_as_the_tau_it_ran() -> None:
    """FLAT-LA took its strength from fedavg-la-tau (1) until flat-la-tau (1.5) came: a config recorded then
    must not read as today's default, or a resume, a sweep's finished cell or a probe would change what ran."""
    old_flat = {"method": "flat-la", "num-server-rounds": 100, "fedavg-la-tau": 1.0, "sam-rho": 0.05,
                "server-opt": "fedavgm", "swa-start": 51}
    assert recorded_value(old_flat, "flat-la-tau") == 1.0
    assert recorded_value({**old_flat, "fedavg-la-tau": 1.5}, "flat-la-tau") == 1.5
    cfg = resolve_recorded(old_flat)
    assert (cfg.flat_la_tau, cfg.fedavg_la_tau, cfg.sam_rho, cfg.swa_start) == (1.0, 1.0, 0.05, 51)
    assert resolve(old_flat).fedavg_la_tau == 1.5  # what plain resolve would have made of it
    # other methods' records read as today's default, which they ignore: a sweep sees no difference
    assert recorded_value({"method": "fedavg-la", "fedavg-la-tau": 1.0}, "flat-la-tau") == 1.5
    assert resolve_recorded({"method": "fedavg-la"}).flat_la_tau == resolve({"method": "fedavg-la"}).flat_la_tau
    # a config recorded with every key (today's) reads as itself
    today = resolve({"method": "flat-la", "num-server-rounds": 100})
    assert resolve_recorded(today.as_dict()) == today


def linear_model() -> EncoderClassifier:
    torch.manual_seed(0)
    return EncoderClassifier(nn.Flatten(), 4, NUM_CLASSES)


def la_loss(model: nn.Module, weights: dict[str, Tensor], x: Tensor, y: Tensor, prior: np.ndarray, tau: float
            ) -> Tensor:
    logits = functional_call(model, weights, (x,)) + tau * torch.log(torch.as_tensor(prior, dtype=torch.float32))
    return F.cross_entropy(logits, y)


def expected_step(model: nn.Module, x: Tensor, y: Tensor, prior: np.ndarray, rho: float, lr: float,
                  tau: float = 1.5) -> dict[str, Tensor]:
    """w - lr * grad L(w + rho g / |g|) with g = grad L(w), L the cross-entropy of the logits + tau log prior."""
    w = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}

    def gradient(at: dict[str, Tensor]) -> dict[str, Tensor]:
        return dict(zip(at, torch.autograd.grad(la_loss(model, at, x, y, prior, tau), list(at.values())), strict=True))

    g = gradient(w)
    norm = torch.sqrt(sum((t ** 2).sum() for t in g.values()))
    ascended = {k: (w[k] + rho * g[k] / norm).detach().requires_grad_(True) for k in w}
    return {k: w[k].detach() - lr * g_k for k, g_k in gradient(ascended).items()}


def test_a_flat_la_step_descends_the_adjusted_loss_at_the_ascended_weights() -> None:
    """The defining rule, on a hand-built case: one local step is w - lr * grad L_LA(w + rho g / |g|), with
    g = grad L_LA(w) and L_LA the cross-entropy of z + 1.5 log prior (FLAT-LA's default strength): both passes
    of the sharpness-aware step take the logit-adjusted loss."""
    cfg = resolve({"method": "flat-la", "grad-clip": 0.0, "batch-size": 6, "local-epochs": 1, "local-lr": 0.1,
                   "flat-la-rho": 0.5, "precision": "fp32"})
    prior = np.array([0.6, 0.3, 0.1])
    images = torch.randint(0, 256, (6, 1, 2, 2), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    x = to_float(images, "fmnist")
    model = linear_model()
    expected = expected_step(model, x, labels, prior, rho=0.5, lr=0.1)
    fedavg_la = expected_step(model, x, labels, prior, rho=0.0, lr=0.1)  # FedAvg-LA's step, no SAM
    uniform = np.full(NUM_CLASSES, 1 / NUM_CLASSES)  # a uniform prior shifts every logit alike: plain CE
    sam_ce = expected_step(model, x, labels, uniform, rho=0.5, lr=0.1)
    tau_one = expected_step(model, x, labels, prior, rho=0.5, lr=0.1, tau=1.0)  # FedAvg-LA's strength

    client = get_method("flat-la").client(cfg, NUM_CLASSES, {PRIOR_KEY: prior})
    assert isinstance(client, FedAvgLAClient)
    train_locally(model, images, labels, client, LocalTraining.from_config(cfg), torch.Generator().manual_seed(0))
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=0, atol=1e-6)
        assert not torch.allclose(p.detach(), fedavg_la[name], atol=1e-5)
        assert not torch.allclose(p.detach(), sam_ce[name], atol=1e-5)
        assert not torch.allclose(p.detach(), tau_one[name], atol=1e-5)


SMALL = ("samples-per-class=20 imbalance-ratio=5.0 wandb-mode='disabled' precision='fp32' num-server-rounds=3 "
         "checkpoint-every=0")


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_flat_la_through_flower_is_fedavg_la_with_its_mechanisms(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end: a FLAT-LA run is, round for round, FedAvg-LA run with fedavg-la-tau, sam-rho,
    server-opt=fedavgm and swa-start set by hand (so the converged protocol's `fedavgm-la-sam-swa` cells are
    FLAT-LA's at tau 1), and differs from FedAvg-LA without them."""
    runs = {
        "flat": "method='flat-la' flat-la-average-from=0.5",
        "composed": "method='fedavg-la' fedavg-la-tau=1.5 sam-rho=0.05 server-opt='fedavgm' swa-start=2",
        "fedavg-la": "method='fedavg-la'",
    }
    for name, keys in runs.items():
        run_in_process(tmp_path, monkeypatch, f"{keys} {SMALL} output-dir='{tmp_path}' run-name='{name}'",
                       num_clients=2)
    flat, composed, plain = (_rows(tmp_path / name) for name in runs)
    assert without_timing(flat) == without_timing(composed)
    assert [r["swa_models"] for r in flat] == [0, 1, 2]  # the mean of rounds 2-3 evaluates from round 2
    assert flat[0]["loss"] != plain[0]["loss"]  # SAM: the same batches, other steps (round 1: no momentum yet)
    recorded = json.loads((tmp_path / "flat" / "config.json").read_text())["run_config"]
    assert (recorded["method"], recorded["fedavg-la-tau"], recorded["sam-rho"], recorded["swa-start"],
            recorded["server-opt"]) == ("flat-la", 1.5, 0.05, 2, "fedavgm")


def test_flat_la_under_secure_aggregation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its server needs only sums (the model, FedAvg-LA's counts); momentum and the mean act on the sum's result."""
    rows = secure_rows(tmp_path, monkeypatch, "method='flat-la' flat-la-average-from=0.5", num_clients=3)
    assert all(r["failed_clients"] == [] and r["accuracy"] > 0 for r in rows)
    assert [r["swa_models"] for r in rows] == [0, 1]  # 2 rounds x 0.5: the mean from round 2 on
