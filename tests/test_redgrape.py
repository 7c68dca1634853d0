"""RedGrape's equations, each checked against an independent computation."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fedlt_app.config import resolve
from fedlt_app.methods import ClientMethod
from fedlt_app.methods.decoupled.redgrape import (
    RedGrapeClient,
    add_supplementary_classifier,
    gradient_prototypes,
    mix_balanced_gradient,
    two_head_logits,
)
from fedlt_app.models import EncoderClassifier
from fedlt_app.train import LocalTraining, method_stream, train_locally

NUM_CLASSES = 4


def tiny_model(seed: int = 0) -> EncoderClassifier:
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.ReLU())
    return add_supplementary_classifier(EncoderClassifier(encoder, 5, NUM_CLASSES))


def tiny_data(counts: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in enumerate(counts)])
    images = torch.randint(0, 256, (len(labels), 1, 2, 2), generator=g, dtype=torch.uint8)
    return images, labels


def config(**overrides):  # type: ignore[no-untyped-def]
    base = {"method": "redgrape", "local-lr": 0.1, "rebalance-lambda": 0.5, "balance-threshold": 2, "grad-clip": 0.0}
    return resolve({**base, **overrides})


def prototype_payload(seed: int = 3, known: tuple[bool, ...] = (True,) * NUM_CLASSES) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "proto-weight": rng.normal(size=(NUM_CLASSES, NUM_CLASSES, 5)).astype(np.float32),
        "proto-bias": rng.normal(size=(NUM_CLASSES, NUM_CLASSES)).astype(np.float32),
        "proto-mask": np.array(known),
    }


def test_prototypes_equal_autograd_gradient_of_class_mean_ce() -> None:
    torch.manual_seed(0)
    features = torch.randn(30, 5)
    labels = torch.tensor([0] * 12 + [2] * 15 + [3] * 3)
    head = nn.Linear(5, NUM_CLASSES)
    classes, weight_grads, bias_grads = gradient_prototypes(features, labels, head)
    assert classes.tolist() == [0, 2, 3]
    for i, c in enumerate(classes.tolist()):
        members = labels == c
        loss = F.cross_entropy(head(features[members]), labels[members])
        gw, gb = torch.autograd.grad(loss, [head.weight, head.bias])
        torch.testing.assert_close(weight_grads[i], gw, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bias_grads[i], gb, rtol=1e-5, atol=1e-6)


def test_client_reports_prototypes_of_every_local_class_on_the_received_model() -> None:
    model = tiny_model()
    images, labels = tiny_data([5, 0, 1, 7])
    received = copy.deepcopy(model)
    method = RedGrapeClient(config(**{"local-epochs": 2}), NUM_CLASSES, {})
    train_locally(model, images, labels, method, setup(), torch.Generator().manual_seed(0))
    report = method.report()
    assert report["proto-classes"].tolist() == [0, 2, 3]
    received.eval()
    with torch.no_grad():
        features = received.encoder(images.float() / 255)
    for i, c in enumerate(report["proto-classes"]):
        members = labels == int(c)
        loss = F.cross_entropy(received.classifier(features[members]), labels[members])
        gw, gb = torch.autograd.grad(loss, [received.classifier.weight, received.classifier.bias])
        np.testing.assert_allclose(report["proto-weight"][i], gw.numpy(), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(report["proto-bias"][i], gb.numpy(), rtol=1e-4, atol=1e-6)


def test_eq12_mixes_local_class_gradients_and_missing_prototypes_over_all_classes() -> None:
    # 5 classes; classes 0 and 1 are local (their per-class gradients a0, a1),
    # 2 and 3 are missing with prototypes p2, p3, class 4 is missing with none.
    a0, a1 = torch.tensor([1.0, 0.0]), torch.tensor([3.0, 2.0])
    p2, p3 = torch.tensor([0.0, 4.0]), torch.tensor([2.0, -2.0])
    local_mean = (a0 + a1) / 2  # CE over the balanced set = mean of the class means
    mixed = mix_balanced_gradient(local_mean, 2, torch.stack([p2, p3]), 3, 5)
    by_hand = (a0 + a1 + p2 + p3 + (p2 + p3) / 2) / 5
    torch.testing.assert_close(mixed, by_hand)
    # no local class: prototypes only; no prototypes: local classes only
    torch.testing.assert_close(mix_balanced_gradient(None, 0, torch.stack([p2, p3]), 5, 5), (p2 + p3) / 2)
    torch.testing.assert_close(mix_balanced_gradient(local_mean, 2, None, 3, 5), (a0 + a1) / 5)


def setup(epochs: int = 1, batch_size: int = 64) -> LocalTraining:
    return LocalTraining(epochs=epochs, batch_size=batch_size, lr=0.1, momentum=0.9, grad_clip=0.0, prox_mu=0.0,
                         dataset="fmnist")


def test_one_local_step_matches_an_independent_computation() -> None:
    cfg = config(**{"grad-clip": 0.7})
    model = tiny_model()
    images, labels = tiny_data([6, 3, 1, 0])  # T=2: classes 0, 1 local; 2 (1 sample) and 3 missing
    payload = prototype_payload(known=(True, True, False, True))
    reference = copy.deepcopy(model)

    method = RedGrapeClient(cfg, NUM_CLASSES, payload)
    generator = torch.Generator().manual_seed(5)
    train_locally(model, images, labels, method,
                  LocalTraining(1, 64, cfg.local_lr, 0.9, cfg.grad_clip, 0.0, "fmnist"), generator)

    # Replay the streams: the balanced draws come from the method's own stream, the batch order from the data's.
    method_replay = method_stream(torch.Generator().manual_seed(5))
    sufficient = [0, 1]
    picks = [(labels == c).nonzero().flatten()[torch.randperm(int((labels == c).sum()), generator=method_replay)[:2]]
             for c in sufficient]
    balanced = torch.cat(picks)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(5))

    x = images[order].float() / 255
    y = labels[order]
    head = reference.classifier
    loss = F.cross_entropy(two_head_logits(reference, x), y)
    params = list(reference.parameters())
    grads = torch.autograd.grad(loss, params)
    grad_of = dict(zip([id(p) for p in params], grads, strict=True))
    # balanced gradient on W with P fixed, mixed with the prototypes of missing classes 2 (unknown) and 3
    with torch.no_grad():
        h_bal = reference.encoder(images[balanced].float() / 255)
    bal_loss = F.cross_entropy(head(h_bal), labels[balanced])
    gw_local, gb_local = torch.autograd.grad(bal_loss, [head.weight, head.bias])
    known_missing_w = torch.from_numpy(payload["proto-weight"][[3]])
    known_missing_b = torch.from_numpy(payload["proto-bias"][[3]])
    g_w = (2 * gw_local + 2 * known_missing_w.mean(0)) / NUM_CLASSES
    g_b = (2 * gb_local + 2 * known_missing_b.mean(0)) / NUM_CLASSES
    g_w = g_w * grad_of[id(head.weight)].norm() / g_w.norm()  # norm-matched before clipping
    g_b = g_b * grad_of[id(head.bias)].norm() / g_b.norm()
    total_norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
    clip = min(1.0, cfg.grad_clip / (float(total_norm) + 1e-6))
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p -= cfg.local_lr * clip * g  # first SGD step: momentum buffer = gradient
        head.weight -= cfg.local_lr * cfg.rebalance_lambda * g_w
        head.bias -= cfg.local_lr * cfg.rebalance_lambda * g_b

    for (name, got), want in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


def reference_redgrape(model, images, labels, payload, cfg, batch_size: int, seed: int) -> None:  # type: ignore[no-untyped-def]
    """RedGrape's local training written out independently: Eq. 7 loss, Eq. 12 mixing, norm matching,
    global clipping, SGD-momentum by hand, and the re-balancing either as the authors' extra step (plain)
    or inside W's gradient (combined, Eq. 13). Classes 0, 1 local (T=2), class 3 from the prototypes."""
    method_gen = method_stream(torch.Generator().manual_seed(seed))
    picks = [(labels == c).nonzero().flatten()[torch.randperm(int((labels == c).sum()), generator=method_gen)[:2]]
             for c in (0, 1)]
    balanced = torch.cat(picks)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    head, params = model.classifier, list(model.parameters())
    buffers: dict[int, torch.Tensor] = {}
    lam, lr = cfg.rebalance_lambda, cfg.local_lr
    for batch in order.split(batch_size):
        loss = F.cross_entropy(two_head_logits(model, images[batch].float() / 255), labels[batch])
        grads = dict(zip([id(p) for p in params], torch.autograd.grad(loss, params), strict=True))
        with torch.no_grad():
            h_bal = model.encoder(images[balanced].float() / 255)
        gw, gb = torch.autograd.grad(F.cross_entropy(head(h_bal), labels[balanced]), [head.weight, head.bias])
        g_w = (2 * gw + 2 * torch.from_numpy(payload["proto-weight"][[3]]).mean(0)) / NUM_CLASSES
        g_b = (2 * gb + 2 * torch.from_numpy(payload["proto-bias"][[3]]).mean(0)) / NUM_CLASSES
        g_w = g_w * grads[id(head.weight)].norm() / g_w.norm()
        g_b = g_b * grads[id(head.bias)].norm() / g_b.norm()
        if cfg.rebalance_step == "combined":
            grads[id(head.weight)] = grads[id(head.weight)] + lam * g_w
            grads[id(head.bias)] = grads[id(head.bias)] + lam * g_b
        total_norm = torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))
        clip = min(1.0, cfg.grad_clip / (float(total_norm) + 1e-6))
        with torch.no_grad():
            for p in params:
                g = clip * grads[id(p)]
                buffers[id(p)] = g if id(p) not in buffers else 0.9 * buffers[id(p)] + g
                p -= lr * buffers[id(p)]
            if cfg.rebalance_step == "plain":
                head.weight -= lr * lam * g_w
                head.bias -= lr * lam * g_b


@pytest.mark.parametrize("step", ["plain", "combined"])
def test_rebalance_step_follows_the_code_or_the_papers_equation(step: str) -> None:
    cfg = config(**{"grad-clip": 0.7, "rebalance-step": step})
    model = tiny_model()
    images, labels = tiny_data([6, 3, 1, 0])
    payload = prototype_payload(known=(True, True, False, True))
    reference = copy.deepcopy(model)
    train_locally(model, images, labels, RedGrapeClient(cfg, NUM_CLASSES, payload),
                  LocalTraining(1, 4, cfg.local_lr, 0.9, cfg.grad_clip, 0.0, "fmnist"),
                  torch.Generator().manual_seed(5))
    reference_redgrape(reference, images, labels, payload, cfg, batch_size=4, seed=5)  # 3 steps, momentum at work
    for (name, got), want in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


def test_combined_and_plain_steps_differ_with_momentum() -> None:
    images, labels = tiny_data([6, 3, 1, 0])
    payload = prototype_payload(known=(True, True, False, True))
    weights = []
    for step in ("plain", "combined"):
        cfg = config(**{"rebalance-step": step})
        model = tiny_model()
        train_locally(model, images, labels, RedGrapeClient(cfg, NUM_CLASSES, payload),
                      LocalTraining(1, 4, cfg.local_lr, 0.9, 0.0, 0.0, "fmnist"), torch.Generator().manual_seed(5))
        weights.append(model.classifier.weight.detach().clone())
    assert not torch.allclose(weights[0], weights[1])


class PlainTwoHead(ClientMethod):
    """Cross-entropy on the summed logits and nothing else."""

    def loss(self, model, x, y):  # type: ignore[no-untyped-def]
        return F.cross_entropy(two_head_logits(model, x), y)


def test_lambda_zero_is_plain_two_head_training() -> None:
    images, labels = tiny_data([20, 9, 4, 1])
    runs = []
    for method_cls, cfg in ((RedGrapeClient, config(**{"rebalance-lambda": 0.0})), (PlainTwoHead, config())):
        model = tiny_model()
        method = method_cls(cfg, NUM_CLASSES, prototype_payload())
        train_locally(model, images, labels, method, setup(epochs=2, batch_size=8), torch.Generator().manual_seed(9))
        runs.append(model.state_dict())
    for name in runs[0]:
        torch.testing.assert_close(runs[0][name], runs[1][name], rtol=0, atol=0, msg=name)


def test_rebalancing_moves_only_w() -> None:
    """The re-balancing step changes W and nothing the plain path trains."""
    images, labels = tiny_data([20, 9, 4, 1])
    results = []
    for lam in (0.0, 1.0):
        model = tiny_model()
        method = RedGrapeClient(config(**{"rebalance-lambda": lam, "local-epochs": 1}), NUM_CLASSES,
                                prototype_payload())
        train_locally(model, images, labels, method, setup(batch_size=64), torch.Generator().manual_seed(9))
        results.append(model.state_dict())
    # one full batch per epoch: the batch order (drawn after the balanced set) only reorders a sum
    changed = {k for k in results[0] if not torch.allclose(results[0][k], results[1][k], rtol=1e-5, atol=1e-6)}
    assert changed == {"classifier.weight", "classifier.bias"}


def test_no_rebalancing_before_the_first_prototypes() -> None:
    images, labels = tiny_data([20, 9, 4, 1])
    states = []
    for method_cls in (RedGrapeClient, PlainTwoHead):
        model = tiny_model()
        train_locally(model, images, labels, method_cls(config(), NUM_CLASSES, {}), setup(),
                      torch.Generator().manual_seed(2))
        states.append(model.state_dict())
    for name in states[0]:
        torch.testing.assert_close(states[0][name], states[1][name], rtol=0, atol=0)


def test_inference_ignores_the_supplementary_classifier() -> None:
    model = tiny_model().eval()
    x = torch.rand(7, 1, 2, 2)
    before = model(x)
    with torch.no_grad():
        model.supplementary.weight.mul_(-5).add_(3)
        model.supplementary.bias.add_(10)
    torch.testing.assert_close(model(x), before)
    assert not torch.allclose(two_head_logits(model, x), before)


@pytest.mark.parametrize("lam", [0.1])
def test_balanced_set_has_t_real_samples_of_each_sufficient_class(lam: float) -> None:
    images, labels = tiny_data([5, 2, 1, 0])
    method = RedGrapeClient(config(**{"rebalance-lambda": lam}), NUM_CLASSES, prototype_payload())
    method.begin(tiny_model(), images, labels, torch.Generator().manual_seed(0))
    assert method._balanced_y.tolist().count(0) == 2 and method._balanced_y.tolist().count(1) == 2
    assert set(method._balanced_y.tolist()) == {0, 1}
    assert method._num_missing == 2


@pytest.mark.parametrize("step", ["plain", "combined"])
def test_w_minus_w_hat_moves_only_by_the_rebalancing(step: str) -> None:
    """The two-head loss sees only W + Ŵ, so both get the same gradient (and momentum, and clip):
    W − Ŵ keeps its initial value at λ = 0 and is changed only by the re-balancing otherwise."""
    images, labels = tiny_data([20, 9, 4, 1])
    differences = []
    for lam in (0.0, 0.5):
        model = tiny_model()
        start = (model.classifier.weight - model.supplementary.weight).detach().clone()
        cfg = config(**{"rebalance-lambda": lam, "rebalance-step": step, "grad-clip": 0.5})
        train_locally(model, images, labels, RedGrapeClient(cfg, NUM_CLASSES, prototype_payload()),
                      setup(epochs=2, batch_size=8), torch.Generator().manual_seed(3))
        differences.append((model.classifier.weight - model.supplementary.weight).detach() - start)
    torch.testing.assert_close(differences[0], torch.zeros_like(differences[0]), rtol=0, atol=1e-6)
    assert differences[1].abs().max() > 1e-3
