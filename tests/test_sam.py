"""``sam-rho``: sharpness-aware local steps (SAM, Foret et al. 2021) in the shared training loop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from in_process import run_in_process
from torch import Tensor, nn
from torch.nn import functional as F

from fedlt_app.config import SAM_METHODS, ConfigError, resolve
from fedlt_app.data.transforms import to_float
from fedlt_app.methods import METHODS, get_method
from fedlt_app.models import build_model
from fedlt_app.train import LocalTraining, sharpness_aware_ascent, train_locally


class CrossEntropy:
    """The loop's hooks with nothing but a cross-entropy loss (``TrainingHooks``)."""

    def begin(self, model: nn.Module, images: Tensor, labels: Tensor, generator: torch.Generator) -> None: ...

    def batch_input(self, raw: Tensor, augmented: Tensor) -> Tensor:
        return augmented

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(model(x), y)

    def before_step(self, model: nn.Module) -> None: ...

    def after_step(self, model: nn.Module) -> None: ...


def linear_case() -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 3))
    images = torch.randint(0, 256, (12, 1, 28, 28), dtype=torch.uint8)
    return model, images, torch.tensor([0, 1, 2] * 4)


def one_step(model: nn.Module, images: Tensor, labels: Tensor, rho: float) -> nn.Module:
    setup = LocalTraining(epochs=1, batch_size=len(labels), lr=0.1, momentum=0.0, grad_clip=0.0, prox_mu=0.0,
                          dataset="fmnist", sam_rho=rho)  # MNIST-type data: no augmentation
    train_locally(model, images, labels, CrossEntropy(), setup, torch.Generator().manual_seed(1))
    return model


def gradient_at(model: nn.Module, x: Tensor, y: Tensor, weights: list[Tensor]) -> list[Tensor]:
    probe = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 3))
    with torch.no_grad():
        for p, w in zip(probe.parameters(), weights, strict=True):
            p.copy_(w)
    return list(torch.autograd.grad(F.cross_entropy(probe(x), y), list(probe.parameters())))


def test_a_sam_step_descends_with_the_gradient_at_the_ascended_weights() -> None:
    model, images, labels = linear_case()
    w = [p.detach().clone() for p in model.parameters()]
    x = to_float(images, "fmnist")
    rho, lr = 0.5, 0.1
    g = gradient_at(model, x, labels, w)
    norm = torch.sqrt(sum((t ** 2).sum() for t in g))
    ascended = [wi + rho * gi / norm for wi, gi in zip(w, g, strict=True)]
    g_sam = gradient_at(model, x, labels, ascended)
    expected = [wi - lr * gi for wi, gi in zip(w, g_sam, strict=True)]
    plain = [wi - lr * gi for wi, gi in zip(w, g, strict=True)]

    one_step(model, images, labels, rho)
    for p, want, not_want in zip(model.parameters(), expected, plain, strict=True):
        torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-6)
        assert not torch.allclose(p.detach(), not_want, atol=1e-5)  # SAM's step is not the plain one

    model, images, labels = linear_case()
    one_step(model, images, labels, rho=0.0)  # off: the plain gradient step
    for p, want in zip(model.parameters(), plain, strict=True):
        torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-6)


def test_the_ascent_is_rho_along_the_normalised_gradient_and_undone_exactly() -> None:
    a = torch.tensor([3.0, 0.0], requires_grad=True)
    b = torch.tensor([4.0], requires_grad=True)
    loss = (a * torch.tensor([1.0, 0.0])).sum() * 3 + b.sum() * 4  # gradient (3, 0 | 4), norm 5
    moves = sharpness_aware_ascent([a, b], loss, rho=2.0)
    assert moves is not None
    torch.testing.assert_close(moves[0], torch.tensor([1.2, 0.0]))
    torch.testing.assert_close(moves[1], torch.tensor([1.6]))
    torch.testing.assert_close(a.detach(), torch.tensor([4.2, 0.0]))
    flat = torch.tensor([1.0], requires_grad=True)
    assert sharpness_aware_ascent([flat], flat.sum() * 0.0, rho=1.0) is None  # a zero gradient moves nothing
    assert torch.equal(flat.detach(), torch.tensor([1.0]))


def dropout_states(rho: float) -> tuple[list[Tensor], Tensor, nn.Module]:
    """The global RNG state at every dropout call of a 2-epoch round of fedlt's CNN, and the state after it."""
    torch.manual_seed(3)
    model = build_model("cnn", 10, 1, 28)
    states: list[Tensor] = []
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.register_forward_pre_hook(lambda m, i: states.append(torch.get_rng_state()))
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(10).repeat_interleave(4)
    images = torch.randint(0, 256, (len(labels), 1, 28, 28), generator=g, dtype=torch.uint8)
    setup = LocalTraining(epochs=2, batch_size=16, lr=0.05, momentum=0.9, grad_clip=1.0, prox_mu=0.0,
                          dataset="fmnist", sam_rho=rho)
    torch.manual_seed(11)
    train_locally(model, images, labels, CrossEntropy(), setup, torch.Generator().manual_seed(11))
    return states, torch.get_rng_state(), model


def test_both_passes_of_a_step_draw_the_plain_steps_dropout_masks() -> None:
    """Pairing: the ascent's forward and the descent's forward of a step use the masks the plain run's one
    forward uses, and leave the RNG where the plain run leaves it, so the next step's masks match too."""
    plain, plain_after, plain_model = dropout_states(0.0)
    sam, sam_after, sam_model = dropout_states(0.05)
    per_forward = sum(isinstance(m, nn.Dropout) for m in plain_model.modules())
    assert per_forward >= 1 and len(plain) == 6 * per_forward  # 2 epochs x ceil(40 / 16) steps
    assert len(sam) == 2 * len(plain)
    for step in range(6):
        want = plain[step * per_forward:(step + 1) * per_forward]
        got = sam[2 * step * per_forward:2 * (step + 1) * per_forward]
        assert all(torch.equal(a, b) for a, b in zip(got, want + want, strict=True))
    assert torch.equal(sam_after, plain_after)
    assert any(not torch.equal(a, b) for a, b in zip(sam_model.parameters(), plain_model.parameters(), strict=True))


def test_sam_refuses_methods_whose_loss_has_side_effects_and_bad_values() -> None:
    assert resolve({"method": "fedavg-la", "sam-rho": 0.05}).sam_rho == 0.05
    assert resolve({}).sam_rho == 0.0
    for method in ("fedgrab", "rucr", "moon", "fedyoyo"):
        with pytest.raises(ConfigError, match=rf"sam-rho: method='{method}' cannot take sharpness-aware steps"):
            resolve({"method": method, "sam-rho": 0.05})
        assert resolve({"method": method}).sam_rho == 0.0
    with pytest.raises(ConfigError, match="sam-rho"):
        resolve({"sam-rho": -0.1})
    with pytest.raises(ConfigError, match=r"sam-rho: .*not active learning"):
        resolve({"sam-rho": 0.05, "al-method": "random"})
    assert set(SAM_METHODS) <= set(METHODS)


@pytest.mark.parametrize("method", SAM_METHODS)
def test_every_method_sam_accepts_has_a_loss_that_two_calls_leave_unchanged(method: str) -> None:
    """SAM calls a method's loss twice a step: for the methods it accepts, a second call on the same batch gives
    the same loss and leaves the method's state as the first left it (the property the list in config.py
    claims; a method that starts counting or drawing in loss() fails here)."""
    from test_pairing import EXTRA, NUM_CLASSES, payload_for

    cfg = resolve({"method": method, "dataset": "cifar10", "balance-threshold": 2, **EXTRA.get(method, {})})
    torch.manual_seed(3)
    model = get_method(method).extend_model(build_model("cnn", NUM_CLASSES, 3, 32)).eval()
    client = get_method(method).client(cfg, NUM_CLASSES, payload_for(method))
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(3)
    images = torch.randint(0, 256, (len(labels), 3, 32, 32), generator=g, dtype=torch.uint8)
    client.begin(model, images, labels, torch.Generator().manual_seed(5))
    x = to_float(images, "cifar10")
    first = client.loss(model, x, labels)
    state = {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in vars(client).items()
             if isinstance(v, Tensor | int | float)}
    second = client.loss(model, x, labels)
    assert torch.equal(first.detach(), second.detach())
    for key, value in state.items():
        now = vars(client)[key]
        assert (torch.equal(now, value) if isinstance(value, Tensor) else now == value), key


def test_a_run_with_sam_goes_through_flower(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small = ("samples-per-class=60 imbalance-ratio=10.0 precision='fp32' num-server-rounds=2 "
             f"output-dir='{tmp_path}'")
    for name, rho in (("plain", 0.0), ("sam", 0.05)):
        run_in_process(tmp_path, monkeypatch, f"method='fedavg-la' sam-rho={rho} {small} run-name='{name}'",
                       num_clients=2)
    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("plain", "sam")}
    assert [r["round"] for r in rows["sam"]] == [1, 2]
    assert json.loads((tmp_path / "sam" / "config.json").read_text())["run_config"]["sam-rho"] == 0.05
    # the same batches from the same model: the first step's loss is the same, the later steps' are not
    assert rows["sam"][0]["train_loss"] != rows["plain"][0]["train_loss"]
