"""FedLC: cross-entropy on logits calibrated by the client's own class counts, z_c − τ·n_c^(−1/4)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fedlt_app.config import ConfigError, resolve
from fedlt_app.methods import METHODS, ServerMethod, get_method
from fedlt_app.methods.loss.fedlc import FedLCClient, calibrated_logits, calibrated_loss
from fedlt_app.models import EncoderClassifier


def test_calibrated_loss_matches_a_hand_computed_case() -> None:
    # 2 samples, 3 classes; client counts n = (16, 1, 81), tau = 2
    # margins tau * n^(-1/4) = 2 * (1/2, 1, 1/3) = (1, 2, 2/3)
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.5, -1.0, 1.5]], dtype=torch.float64)
    targets = torch.tensor([0, 2])
    counts = torch.tensor([16, 1, 81])
    tau = 2.0
    # calibrated rows: (1, -1, -2/3) and (-0.5, -3, 5/6)
    rows = [(1.0, -1.0, -2 / 3), (-0.5, -3.0, 5 / 6)]
    picked = [rows[0][0], rows[1][2]]
    manual = sum(-(p - math.log(sum(math.exp(v) for v in row))) for p, row in zip(picked, rows, strict=True)) / 2
    torch.testing.assert_close(calibrated_logits(logits, counts, tau),
                               torch.tensor(rows, dtype=torch.float64), rtol=0, atol=1e-12)
    assert float(calibrated_loss(logits, targets, counts, tau)) == pytest.approx(manual, rel=1e-12)
    # the calibration changes the loss (a rarer class gets a larger margin)
    plain = float(F.cross_entropy(logits, targets))
    assert float(calibrated_loss(logits, targets, counts, tau)) != pytest.approx(plain)


def test_tau_zero_is_plain_cross_entropy_even_with_a_missing_class() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, generator=g)
    targets = torch.tensor([0, 1, 2, 0, 1])
    for counts in (torch.tensor([3, 5, 7, 2]), torch.tensor([3, 5, 7, 0])):
        torch.testing.assert_close(calibrated_loss(logits, targets, counts, 0.0), F.cross_entropy(logits, targets))
        assert torch.equal(calibrated_logits(logits, counts, 0.0), logits)


def test_a_class_the_client_lacks_drops_out_of_the_softmax() -> None:
    # FedLTLib's count ** (-1/4) at count 0: an infinite margin, the class's calibrated logit is -inf
    logits = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
    counts = torch.tensor([1, 1, 0])
    cal = calibrated_logits(logits, counts, 1.0)
    assert cal[0, 2] == -math.inf
    loss = calibrated_loss(logits, torch.tensor([0]), counts, 1.0)
    # = CE over the two present classes, with equal margins (1) that cancel
    assert float(loss.detach()) == pytest.approx(float(F.cross_entropy(torch.tensor([[1.0, 2.0]]), torch.tensor([0]))))
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(grad).all() and grad[0, 2] == 0


def linear_model() -> EncoderClassifier:
    torch.manual_seed(0)
    return EncoderClassifier(nn.Flatten(), 4, 3)


def test_client_counts_its_own_labels_and_trains_on_the_calibrated_loss() -> None:
    cfg = resolve({"method": "fedlc", "fedlc-tau": 0.5})
    assert get_method("fedlc").server is ServerMethod
    client = get_method("fedlc").client(cfg, 3, {})
    assert isinstance(client, FedLCClient)
    model = linear_model()
    labels = torch.tensor([0, 0, 0, 1, 0, 1])  # class 2 absent on this client
    images = torch.zeros(len(labels), 1, 1, 4, dtype=torch.uint8)
    client.begin(model, images, labels, torch.Generator().manual_seed(0))
    assert client.class_counts.tolist() == [4, 2, 0]

    x = torch.rand(6, 1, 1, 4, generator=torch.Generator().manual_seed(1))
    z = model(x)
    loss = client.loss(model, x, labels)
    margins = torch.tensor([0.5 * 4 ** -0.25, 0.5 * 2 ** -0.25, math.inf])
    expected = F.cross_entropy(z - margins, labels)
    torch.testing.assert_close(loss, expected)
    assert torch.isfinite(loss)


def test_inference_is_not_calibrated() -> None:
    cfg = resolve({"method": "fedlc", "fedlc-tau": 1.0})
    client = get_method("fedlc").client(cfg, 3, {})
    model = linear_model()
    x = torch.rand(4, 1, 1, 4, generator=torch.Generator().manual_seed(2))
    before = model(x).detach().clone()
    client.begin(model, torch.zeros(3, 1, 1, 4, dtype=torch.uint8), torch.tensor([0, 1, 1]),
                 torch.Generator().manual_seed(0))
    # the hook computes counts only: the network, and so what the server evaluates, is unchanged
    torch.testing.assert_close(model(x), before)
    torch.testing.assert_close(get_method("fedlc").server.evaluation_model(None, model)(x), before)  # type: ignore[arg-type]


def test_tau_default_and_check() -> None:
    assert "fedlc" in METHODS
    assert resolve({"method": "fedlc"}).fedlc_tau == 1.0
    with pytest.raises(ConfigError, match="fedlc-tau"):
        resolve({"method": "fedlc", "fedlc-tau": -0.1})
