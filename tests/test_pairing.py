"""Runs of two methods with one seed are paired: same data, initialisation, batches, augmentation, dropout."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from fedlt_app.config import CLIP_METHODS, resolve
from fedlt_app.methods import METHODS, ClientMethod, get_method
from fedlt_app.models import build_model
from fedlt_app.train import LocalTraining, train_locally

NUM_CLASSES = 10
EXTRA = {"fedprox": {"prox-mu": 0.01}, "fedic": {"fedic-server-data": "heldout"}}
# their classifiers read a projection of the shared backbone's features: MOON's 256-d (methods/representation/moon.py),
# FedETF's fixed ETF on a C-d one (methods/fixed_classifier/fedetf.py); FedNH's frozen prototypes and scale
# (methods/fixed_classifier/fednh.py);
# FedLoGe's heads: its g_aux is the linear classifier (checked in tests/test_fedloge.py), beside SSE-C and a local head
OWN_CLASSIFIER = {"moon", "fedetf", "fednh", "fedloge"}


def payload_for(method: str) -> dict[str, np.ndarray]:
    """What the server would send in a later round, so every method's hooks do their full work."""
    rng = np.random.default_rng(0)
    if method == "redgrape":
        return {"proto-weight": rng.normal(size=(NUM_CLASSES, NUM_CLASSES, 128)).astype(np.float32),
                "proto-bias": rng.normal(size=(NUM_CLASSES, NUM_CLASSES)).astype(np.float32),
                "proto-mask": np.ones(NUM_CLASSES, dtype=bool)}
    if method == "ratio-loss":
        return {"class-weights": rng.uniform(1, 2, NUM_CLASSES).astype(np.float32)}
    if method == "creff":
        return {"creff-weight": rng.normal(size=(NUM_CLASSES, 128)).astype(np.float32),
                "creff-bias": rng.normal(size=NUM_CLASSES).astype(np.float32)}
    if method == "rucr":  # a rectification round: prototypes in the loss, own features taken in begin
        return {"rucr-prototypes": rng.normal(size=(NUM_CLASSES, 128)).astype(np.float32),
                "rucr-class-ratio": np.full(NUM_CLASSES, 1 / NUM_CLASSES),
                "rucr-norm-means": rng.normal(size=(NUM_CLASSES, 128)).astype(np.float32),
                "rucr-norm-holders": np.ones(NUM_CLASSES, dtype=bool)}
    if method == "fedyoyo":  # past the warm-up: the distillation at full weight
        return {"fedyoyo-prior": rng.dirichlet(np.ones(NUM_CLASSES)).astype(np.float32),
                "fedyoyo-round": np.array([60])}
    return {}


@functools.lru_cache(maxsize=1)
def fedavg_sees() -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    return what_training_sees("fedavg")


def what_training_sees(method: str) -> tuple[list[torch.Tensor], list[torch.Tensor], list[list[torch.Tensor]]]:
    """Per training step of one client's round (CIFAR-shaped, so augmentation is random): the loss's input, the
    labels, and the global RNG state at each dropout call inside the loss, in call order."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(torch.tensor([12, 10, 9, 8, 6, 5, 3, 2, 1, 0][:NUM_CLASSES]))
    images = torch.randint(0, 256, (len(labels), 3, 32, 32), generator=g, dtype=torch.uint8)
    torch.manual_seed(3)
    model = get_method(method).extend_model(build_model("cnn", NUM_CLASSES, 3, 32))
    cfg = resolve({"method": method, "dataset": "cifar10", "balance-threshold": 2, **EXTRA.get(method, {})})
    client = get_method(method).client(cfg, NUM_CLASSES, payload_for(method))
    inputs, targets, masks = [], [], []
    in_loss = False
    original_loss = client.loss

    def spy(model, x, y):  # type: ignore[no-untyped-def]
        nonlocal in_loss
        inputs.append(x.clone())
        targets.append(y.clone())
        masks.append([])
        in_loss = True
        try:
            return original_loss(model, x, y)
        finally:
            in_loss = False

    client.loss = spy  # type: ignore[method-assign]
    for module in model.encoder.modules():
        if isinstance(module, torch.nn.Dropout):
            # same global RNG state at every training dropout call = the same masks
            module.register_forward_pre_hook(lambda m, i: masks[-1].append(torch.get_rng_state()) if in_loss else None)
    setup = LocalTraining(epochs=2, batch_size=16, lr=0.05, momentum=0.9, grad_clip=1.0, prox_mu=cfg.prox_mu,
                          dataset="cifar10")
    torch.manual_seed(11)  # the client app seeds dropout from (seed, round, client)
    train_locally(model, images, labels, client, setup, torch.Generator().manual_seed(11))
    return inputs, targets, masks


# the CLIP methods train a different model (a CLIP tower with prompts) on CLIP's input: tests/test_clip.py
@pytest.mark.parametrize("method", [m for m in METHODS if m != "fedavg" and m not in CLIP_METHODS])
def test_every_method_sees_fedavgs_batches_augmentation_and_dropout(method: str) -> None:
    """Every step's shared view and labels are FedAvg's, and its forward on them draws FedAvg's dropout masks.

    A method with more views of the batch (``ClientMethod.batch_input``: FedYoYo's strong view) gets them after
    the shared rows, and draws their masks after FedAvg's, leaving the RNG where FedAvg's left it for the next
    step; every other method's input and dropout draws are exactly FedAvg's."""
    reference = fedavg_sees()
    inputs, targets, masks = what_training_sees(method)
    assert len(inputs) == len(reference[0]) == 8  # 2 epochs x ceil(56 / 16)
    more_views = get_method(method).client.batch_input is not ClientMethod.batch_input
    for x, y, drawn, want_x, want_y, want_drawn in zip(inputs, targets, masks, *reference, strict=True):
        assert torch.equal(y, want_y)
        assert torch.equal(x[: len(want_x)], want_x) and (len(x) > len(want_x)) == more_views
        assert len(drawn) >= len(want_drawn) and (len(drawn) > len(want_drawn)) <= more_views
        assert all(torch.equal(a, b) for a, b in zip(drawn, want_drawn))  # FedAvg's draws come first


def test_initial_encoder_and_classifier_are_shared() -> None:
    models = {}
    for method in METHODS:
        torch.manual_seed(5)
        models[method] = get_method(method).extend_model(build_model("cnn", NUM_CLASSES, 1, 28)).state_dict()
    for method, state in models.items():
        for key, value in models["fedavg"].items():
            if method in OWN_CLASSIFIER and key.startswith("classifier."):
                continue
            assert torch.equal(state[key], value), (method, key)
