"""The balanced-test-set evaluation: its figures against a plain computation, and the channels_last copy that a
batch-norm network is evaluated as on the CPU (same predictions, the trained model untouched)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from fedlt_app.data import to_float
from fedlt_app.metrics import evaluate, inference_network
from fedlt_app.models import build_model

CLASSES = 10


def _batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=generator)
    return images, torch.arange(n) % CLASSES


def _trained_bn_network() -> torch.nn.Module:
    """cnn4conv with non-trivial running statistics (a fresh BN layer is the identity in eval mode)."""
    torch.manual_seed(0)
    model = build_model("cnn4conv", CLASSES, 1, 28)
    images, _ = _batch(64, 1)
    with torch.no_grad():
        model.train()(to_float(images, "fmnist") * 3 + 0.5)
    return model


def test_a_batch_norm_network_is_evaluated_as_a_channels_last_copy_with_the_plain_predictions() -> None:
    model = _trained_bn_network().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, labels = _batch(300, 2)
    result = evaluate(model, images, labels, "fmnist", [8, 9], [100] * CLASSES, batch_size=128)

    model.eval()
    with torch.no_grad():
        logits = model(to_float(images, "fmnist"))  # the plain NCHW forward
    hits = (logits.argmax(1) == labels).numpy()
    per_class = [float(hits[labels.numpy() == c].mean()) for c in range(CLASSES)]
    assert result.per_class_accuracy == pytest.approx(per_class, abs=0)
    assert result.accuracy == pytest.approx(float(hits.mean()), abs=1e-7)
    assert result.loss == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-5)
    # the trained model keeps its values and its (contiguous) layout
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]) and value.is_contiguous(), key
    network, memory_format = inference_network(model, torch.device("cpu"))
    assert network is not model and memory_format == torch.channels_last
    conv = next(m for m in network.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_evaluate_restores_the_training_mode() -> None:
    model = _trained_bn_network().train()
    images, labels = _batch(20, 3)
    evaluate(model, images, labels, "fmnist", [9], [100] * CLASSES)
    assert model.training
    model.eval()
    evaluate(model, images, labels, "fmnist", [9], [100] * CLASSES)
    assert not model.training


def test_a_network_without_batch_norm_is_evaluated_as_it_is() -> None:
    model = build_model("cnn", CLASSES, 1, 28)
    network, memory_format = inference_network(model, torch.device("cpu"))
    assert network is model and memory_format == torch.contiguous_format
    assert np.isfinite(evaluate(model, *_batch(20, 4), "fmnist", [9], [100] * CLASSES).loss)
