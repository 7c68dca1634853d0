"""The baselines' defining rules, each against an independent small computation.

Reference rules: ../shared/PAPER.md ("Baselines, precisely") and
../shared/notes/reference-code.md §4. Expected values are computed here in numpy
(or with a hand-written torch formula), never read back from the code under
test. No Ray: method parts are driven directly, or through FedLTStrategy with a
mock Grid and hand-built replies.
"""

from __future__ import annotations

import copy
import itertools
from unittest.mock import Mock

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from torch import nn
from torch.nn import functional as F

from fedlt_app import train as train_module
from fedlt_app.config import CLIP_METHODS, METHOD_NAMES, ConfigError, resolve
from fedlt_app.data import FederatedData, ImageDataset
from fedlt_app.methods import METHODS, ClientMethod, ClientReport, ServerMethod, get_method
from fedlt_app.methods.decoupled.creff import CReFFClient, CReFFServer, class_gradient, rowwise_cosine_distance
from fedlt_app.methods.loss.climb import ClimbClient, ClimbServer
from fedlt_app.methods.loss.focal import FocalClient, focal_loss
from fedlt_app.methods.loss.ratio_loss import (
    RatioLossClient,
    RatioLossServer,
    auxiliary_indices,
    dominant_entries,
    ratio_loss_weights,
)
from fedlt_app.models import EncoderClassifier, build_model
from fedlt_app.precision import FP32
from fedlt_app.records import payload_to_record, record_to_payload
from fedlt_app.strategy import METHOD_KEY, FedLTStrategy, server_optimizer
from fedlt_app.train import LocalTraining, proximal_term, train_locally

C, D = 3, 4  # classes; pixels of a (1, 1, D) image = feature width of the linear toy model


# ---------------------------------------------------------------- helpers


def linear_model(seed: int = 0, dropout: float = 0.0) -> EncoderClassifier:
    """h = the image's D pixels in [0, 1] (optionally through dropout); logits = W h + b."""
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Flatten(), nn.Dropout(dropout)) if dropout else nn.Flatten()
    return EncoderClassifier(encoder, D, C)


def images_labels(counts: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in enumerate(counts)])
    perm = torch.randperm(len(labels), generator=g)
    images = torch.randint(0, 256, (len(labels), 1, 1, D), generator=g, dtype=torch.uint8)
    return images, labels[perm]


def features_of(images: torch.Tensor) -> np.ndarray:
    """The linear model's features, computed without the model: pixels / 255 (fmnist: no augmentation)."""
    return images.numpy().reshape(len(images), -1).astype(np.float64) / 255.0


def np_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def np_head(model: EncoderClassifier) -> tuple[np.ndarray, np.ndarray]:
    return (model.classifier.weight.detach().numpy().astype(np.float64),
            model.classifier.bias.detach().numpy().astype(np.float64))


def np_ce_per_sample(h: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    p = np_softmax(h @ w.T + b)
    return -np.log(p[np.arange(len(y)), y])


def np_ce_grads(h: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """∂/∂(W, b) of the mean CE of a linear head: (softmax − e_y) hᵀ averaged over samples."""
    residual = np_softmax(h @ w.T + b)
    residual[np.arange(len(y)), y] -= 1.0
    return residual.T @ h / len(y), residual.mean(axis=0)


def federated(images: torch.Tensor, labels: torch.Tensor, client_indices: list[np.ndarray],
              train_indices: np.ndarray | None = None) -> FederatedData:
    dataset = ImageDataset(name="fmnist", num_classes=C, train_images=images, train_labels=labels,
                           test_images=images, test_labels=labels)
    train = np.arange(len(labels)) if train_indices is None else train_indices
    counts = np.bincount(labels.numpy()[train], minlength=C)
    return FederatedData(dataset=dataset, train_indices=train, class_counts=tuple(int(n) for n in counts),
                         client_indices=tuple(client_indices))


def setup(**overrides) -> LocalTraining:  # type: ignore[no-untyped-def]
    base = {"epochs": 1, "batch_size": 1000, "lr": 0.5, "momentum": 0.0, "grad_clip": 0.0, "prox_mu": 0.0,
            "dataset": "fmnist"}
    return LocalTraining(**{**base, **overrides})


# ---------------------------------------------------------------- Fed-Focal


def test_focal_loss_is_minus_one_minus_p_to_the_gamma_times_log_p() -> None:
    logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-3.0, 4.0, 0.0], [1.0, 1.0, 1.0]])
    targets = np.array([0, 2, 0, 1])
    p = np_softmax(logits)[np.arange(4), targets]
    t_logits, t_targets = torch.tensor(logits), torch.tensor(targets)
    for gamma in (0.0, 0.5, 2.0):
        expected = np.mean(-((1 - p) ** gamma) * np.log(p))
        assert float(focal_loss(t_logits, t_targets, gamma)) == pytest.approx(expected, rel=1e-10)
    # γ = 0 is cross-entropy; γ = 2 down-weights the well-classified first sample most
    assert float(focal_loss(t_logits, t_targets, 0.0)) == pytest.approx(float(F.cross_entropy(t_logits, t_targets)))
    assert float(focal_loss(t_logits, t_targets, 2.0)) < float(focal_loss(t_logits, t_targets, 0.0))


def test_focal_client_trains_on_the_focal_loss_with_the_configured_gamma() -> None:
    images, labels = images_labels([6, 3, 2])
    model = linear_model()
    w0 = model.classifier.weight.detach().clone()
    b0 = model.classifier.bias.detach().clone()
    lr, gamma = 0.5, 2.0
    cfg = resolve({"method": "focal", "focal-gamma": gamma})
    method = get_method("focal").client(cfg, C, {})
    assert isinstance(method, FocalClient)
    train_locally(model, images, labels, method, setup(lr=lr), torch.Generator().manual_seed(0))

    # one full-batch step on a hand-written focal loss
    w, b = w0.clone().double().requires_grad_(True), b0.clone().double().requires_grad_(True)
    h = torch.from_numpy(features_of(images))
    p = torch.softmax(h @ w.T + b, dim=1)[torch.arange(len(labels)), labels]
    loss = (-((1 - p) ** gamma) * torch.log(p)).mean()
    gw, gb = torch.autograd.grad(loss, [w, b])
    torch.testing.assert_close(model.classifier.weight.detach().double(), w0.double() - lr * gw, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.classifier.bias.detach().double(), b0.double() - lr * gb, rtol=1e-5, atol=1e-6)
    # ... which is not the cross-entropy step
    ce_w, _ = np_ce_grads(features_of(images), labels.numpy(), w0.double().numpy(), b0.double().numpy())
    assert not np.allclose(model.classifier.weight.detach().numpy(), w0.numpy() - lr * ce_w, atol=1e-4)


# ---------------------------------------------------------------- Ratio Loss


def reference_ratio_weights(deltas: np.ndarray) -> np.ndarray:
    """The official balanced-fl rule, entry by entry (search_neuron_new + whole_determination)."""
    num, rows, cols = deltas.shape
    marked = np.zeros(deltas.shape, dtype=bool)
    for i, j in itertools.product(range(rows), range(cols)):
        column = [float(deltas[p, i, j]) for p in range(num)]
        winner = column.index(max(column))
        top = column[winner]
        if top == 0:
            close = sum(1 for x in column if x == top)
        else:
            close = sum(1 for x in column if abs(x) / abs(top) > 0.8)
        marked[winner, i, j] = close < 2
    alphas = []
    for c in range(num):
        own = other = 0.0
        for i, j in itertools.product(range(rows), range(cols)):
            if marked[c, i, j]:
                own += deltas[c, i, j]
                other += sum(deltas[p, i, j] for p in range(num) if p != c) / (num - 1)
        ratio = abs(own) / abs(other) if other != 0 else 10.0
        alphas.append(1.0 + 0.1 * min(ratio, 5000.0))
    return np.array(alphas)


def test_ratio_loss_weights_on_a_hand_worked_example() -> None:
    # deltas[p] = change of the 3x2 classifier weight after the step on class p's samples
    deltas = np.array([
        [[1.0, 0.5], [-0.2, 0.3], [0.0, 0.9]],
        [[0.1, 0.45], [-0.1, 0.0], [0.2, 0.1]],
        [[0.2, 0.0], [-0.3, 0.1], [0.1, 0.1]],
    ])
    # (0,0) class 0 alone; (0,1) class 1 within 90% of class 0: nobody; (1,0) the max is
    # class 1's −0.1 and every |Δ| is > 80% of it: nobody; (1,1), (2,1) class 0; (2,0) class 1.
    expected_mask = np.zeros((3, 3, 2), dtype=bool)
    expected_mask[0, 0, 0] = expected_mask[0, 1, 1] = expected_mask[0, 2, 1] = expected_mask[1, 2, 0] = True
    assert np.array_equal(dominant_entries(deltas), expected_mask)
    ratio0 = (1.0 + 0.3 + 0.9) / ((0.1 + 0.2) / 2 + (0.0 + 0.1) / 2 + (0.1 + 0.1) / 2)  # 2.2 / 0.3
    ratio1 = 0.2 / ((0.0 + 0.1) / 2)  # 4
    ratio2 = 10.0  # no entry of its own: the denominator is 0
    expected = 1.0 + 0.1 * np.array([ratio0, ratio1, ratio2])
    np.testing.assert_allclose(ratio_loss_weights(deltas), expected, rtol=1e-12)
    np.testing.assert_allclose(reference_ratio_weights(deltas), expected, rtol=1e-12)


def test_ratio_loss_caps_the_ratio_at_5000() -> None:
    deltas = np.zeros((3, 1, 2))
    deltas[:, 0, 0] = [1.0, 1e-4, 1e-4]  # class 0 dominates; the others moved 1e-4: ratio 1e4
    deltas[:, 0, 1] = [0.0, 0.5, 0.1]  # class 1 dominates: ratio 0.5 / 0.05 = 10
    weights = ratio_loss_weights(deltas)
    assert weights[0] == pytest.approx(1.0 + 0.1 * 5000)
    assert weights[1] == pytest.approx(1.0 + 0.1 * 10)
    assert weights[2] == pytest.approx(1.0 + 0.1 * 10)  # nothing marked


def test_ratio_loss_weights_match_the_official_rule_on_random_deltas() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        deltas = rng.normal(size=(5, 5, 6))
        deltas[rng.integers(0, 5), rng.integers(0, 5)] *= 20  # one class dominating a row
        deltas[:, 0, 0] = [0.0, -1.0, -2.0, 0.0, -0.5]  # a zero maximum, tied twice
        deltas[:, 1, 1] = [-1.0, 0.0, -2.0, -0.5, -0.1]  # a zero maximum, unique
        np.testing.assert_allclose(ratio_loss_weights(deltas), reference_ratio_weights(deltas), rtol=1e-10)


def test_auxiliary_indices_are_the_first_per_class_in_original_order() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, size=200)
    labels[labels == 3] = 2  # class 3 only at the very end, and rarely
    labels[-2:] = 3
    chosen = auxiliary_indices(labels, 32)
    assert len(chosen) == 4
    for c, idx in enumerate(chosen):
        expected = [i for i, y in enumerate(labels) if y == c][:32]
        assert list(idx) == expected
    assert len(chosen[3]) == 2


def ratio_server_setup(aux_per_class: int = 3):  # type: ignore[no-untyped-def]
    images, labels = images_labels([8, 6, 7], seed=4)
    # the long-tail cut dropped all but one sample of class 2: the auxiliary set still has 3
    keep = np.concatenate([np.flatnonzero(labels.numpy() != 2), np.flatnonzero(labels.numpy() == 2)[-1:]])
    data = federated(images, labels, [np.sort(keep)], train_indices=np.sort(keep))
    # float32 arithmetic (the default `auto` is bf16 on some CPUs): the rule is checked against exact sums
    cfg = resolve({"method": "ratio-loss", "ratio-aux-per-class": aux_per_class, "local-lr": 0.3, "precision": "fp32"})
    return cfg, data, images, labels


def test_ratio_loss_server_broadcasts_uniform_round_1_then_weights_from_the_global_model() -> None:
    cfg, data, images, labels = ratio_server_setup()
    model = linear_model(seed=5)
    server = RatioLossServer(cfg, model, data)
    before = copy.deepcopy(model.state_dict())
    assert server.broadcast(1, model) == {}

    payload = server.broadcast(2, model)
    assert set(payload) == {"class-weights"}
    # independent: Δ_c = −lr ∇_W CE on the first 3 samples of class c (of the full training set)
    w, b = np_head(model)
    h_all, y_all = features_of(images), labels.numpy()
    deltas = []
    for c in range(C):
        idx = np.flatnonzero(y_all == c)[:3]
        gw, _ = np_ce_grads(h_all[idx], y_all[idx], w, b)
        deltas.append(-cfg.local_lr * gw)
    expected = reference_ratio_weights(np.stack(deltas))
    np.testing.assert_allclose(payload["class-weights"], expected, rtol=1e-4)
    assert payload["class-weights"].shape == (C,)
    # the global model being sent is left as it was
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in model.parameters())


def test_ratio_loss_client_weights_cross_entropy_by_the_class_weight_of_the_label() -> None:
    images, labels = images_labels([5, 2, 4], seed=6)
    model = linear_model(seed=7)
    cfg = resolve({"method": "ratio-loss"})
    h, y = features_of(images), labels.numpy()
    ce = np_ce_per_sample(h, y, *np_head(model))
    alphas = np.array([1.5, 40.0, 2.25], dtype=np.float32)

    weighted = RatioLossClient(cfg, C, {"class-weights": alphas})
    weighted.begin(model, images, labels, torch.Generator().manual_seed(0))
    x = images.float() / 255
    assert weighted.loss(model, x, labels).item() == pytest.approx(np.mean(alphas[y] * ce), rel=1e-5)

    uniform = RatioLossClient(cfg, C, {})  # round 1: no weights yet
    uniform.begin(model, images, labels, torch.Generator().manual_seed(0))
    assert uniform.loss(model, x, labels).item() == pytest.approx(np.mean(ce), rel=1e-5)


# ---------------------------------------------------------------- CLIMB


def reference_climb(rounds: list[tuple[list[int], list[int], list[float]]], num_clients: int, lr: float, eps: float):
    """[(partition ids, sizes, losses)] per round -> (weights per round, duals after each round)."""
    duals = [0.0] * num_clients
    all_weights, all_duals = [], []
    for ids, sizes, losses in rounds:
        total = sum(sizes)
        mean_dual = sum(duals) / num_clients
        all_weights.append([max(0.0, n / total * (1 + duals[k] - mean_dual)) for k, n in zip(ids, sizes)])
        mean_loss = sum(n / total * loss for n, loss in zip(sizes, losses))
        for k, loss in zip(ids, losses):
            duals[k] = min(5.0, max(0.0, duals[k] + lr * (loss - mean_loss - eps)))
        all_duals.append(list(duals))
    return all_weights, all_duals


CLIMB_ROUNDS = [
    ([0, 1, 2], [10, 30, 60], [2.5, 0.5, 1.0]),
    ([0, 1, 2], [10, 30, 60], [3.0, 1.5, 0.1]),  # client 0's dual overshoots the cap
    ([0, 1, 2], [10, 30, 60], [1.0, 1.0, 1.0]),  # client 2's weight clips to 0
]


def climb_server(num_clients: int = 4) -> ClimbServer:
    images, labels = images_labels([4, 4, 4])
    data = federated(images, labels, [np.array([k]) for k in range(num_clients)])
    cfg = resolve({"method": "climb", "climb-dual-lr": 2.0, "climb-epsilon": 0.01})
    return ClimbServer(cfg, linear_model(), data)


def test_climb_weights_and_duals_over_rounds_match_the_rule() -> None:
    server = climb_server(num_clients=4)  # client 3 never reports, but its dual counts in the mean
    expected_weights, expected_duals = reference_climb(CLIMB_ROUNDS, 4, lr=2.0, eps=0.01)
    for server_round, (ids, sizes, losses) in enumerate(CLIMB_ROUNDS, start=1):
        reports = [ClientReport(k, n, {"climb-loss": np.array([loss])}) for k, n, loss in zip(ids, sizes, losses)]
        weights = server.aggregation_weights(server_round, reports)  # as the strategy calls them
        server.absorb(server_round, reports)
        np.testing.assert_allclose(weights, expected_weights[server_round - 1], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(server.duals, expected_duals[server_round - 1], rtol=1e-12, atol=1e-12)
    # what the example was built to reach
    assert expected_duals[1][0] == 5.0  # capped (2.98 + 2·2.18 = 7.34 without the cap)
    assert expected_weights[2][2] == 0.0  # 0.6·(1 + 0 − 1.59) < 0, clipped
    assert expected_duals[0] == pytest.approx([2.98, 0.0, 0.0, 0.0])  # 2·(2.5 − 1.0 − 0.01)
    assert server.duals[3] == 0.0


# ---- through the strategy: the round's weights use the duals from before its own update


def _metadata(node_id: int) -> Metadata:
    return Metadata(run_id=1, message_id="", src_node_id=node_id, dst_node_id=0, reply_to_message_id="",
                    group_id="", created_at=0.0, ttl=3600.0, message_type="train")


def _reply(node_id: int, arrays: dict[str, np.ndarray], num_examples: int, payload: dict[str, np.ndarray]) -> Message:
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}),
        "metrics": MetricRecord({"num-examples": num_examples, "train-loss": 1.0}),
        METHOD_KEY: payload_to_record(payload),
    })
    return Message(content=content, metadata=_metadata(node_id))



def climb_strategy(num_clients: int, clients_per_round: int) -> tuple[FedLTStrategy, EncoderClassifier, Mock]:
    model = linear_model()
    server = climb_server(num_clients)
    nodes = {p: 101 + p for p in range(num_clients)}
    strategy = FedLTStrategy(server_optimizer("fedavg", 1.0, 0.0, 0.01), server, model, nodes, clients_per_round, 0)
    grid = Mock()
    grid.get_node_ids.return_value = list(nodes.values())
    return strategy, model, grid


def random_arrays(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"classifier.weight": rng.normal(size=(C, D)).astype(np.float32),
            "classifier.bias": rng.normal(size=(C,)).astype(np.float32)}


def test_climb_through_the_strategy_averages_with_pre_update_duals(task_identity) -> None:
    rng = np.random.default_rng(2)
    strategy, model, grid = climb_strategy(num_clients=4, clients_per_round=0)
    rounds = [([0, 1, 2, 3], [10, 30, 60, 20], [2.5, 0.5, 1.0, 0.2]),
              ([0, 1, 2, 3], [10, 30, 60, 20], [3.0, 1.5, 0.1, 0.9])]
    expected_weights, expected_duals = reference_climb(rounds, 4, lr=2.0, eps=0.01)
    current = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    for server_round, (ids, sizes, losses) in enumerate(rounds, start=1):
        strategy.configure_train(server_round, ArrayRecord({k: Array(v) for k, v in current.items()}),
                                 ConfigRecord(), grid)
        client_arrays = [random_arrays(rng) for _ in ids]
        replies = [_reply(101 + k, a, n, {"climb-loss": np.array([loss])})
                   for k, a, n, loss in zip(ids, client_arrays, sizes, losses)]
        arrays, _ = strategy.aggregate_train(server_round, replies)
        weights = np.array(expected_weights[server_round - 1])
        assert weights.sum() > 0
        for key in current:
            expected = sum(w * a[key].astype(np.float64) for w, a in zip(weights, client_arrays)) / weights.sum()
            np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(strategy.server_method.duals, expected_duals[server_round - 1], rtol=1e-12)
        current = {k: v.numpy() for k, v in arrays.items()}
    # round 2's weights came from round 1's duals, not round 2's (which differ)
    assert expected_duals[0] != expected_duals[1]


def test_climb_round_survives_when_every_sampled_weight_clips_to_zero(task_identity) -> None:
    rng = np.random.default_rng(3)
    strategy, model, grid = climb_strategy(num_clients=4, clients_per_round=2)
    theta = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in theta.items()}), ConfigRecord(), grid)
    cohort = strategy.current.cohort
    duals = np.full(4, 5.0)
    duals[cohort] = 0.0  # the unsampled pair is at the cap: mean 2.5, so 1 + 0 − 2.5 < 0 for the cohort
    strategy.server_method.duals = duals
    replies = [_reply(101 + k, random_arrays(rng), 10, {"climb-loss": np.array([1.0])}) for k in cohort]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert all(np.all(np.isfinite(v.numpy())) for v in arrays.values())


def test_climb_client_reports_the_received_models_mean_cross_entropy_in_eval_mode() -> None:
    images, labels = images_labels([200, 90, 10], seed=8)  # > 256 samples: more than one batch
    model = linear_model(seed=9, dropout=0.5)
    received_w, received_b = np_head(model)
    cfg = resolve({"method": "climb"})
    method = get_method("climb").client(cfg, C, {})
    assert isinstance(method, ClimbClient)
    train_locally(model, images, labels, method, setup(lr=1.0, epochs=2), torch.Generator().manual_seed(0))
    expected = np.mean(np_ce_per_sample(features_of(images), labels.numpy(), received_w, received_b))
    report = method.report()
    assert set(report) == {"climb-loss"}
    assert float(report["climb-loss"][0]) == pytest.approx(expected, rel=1e-5)
    # the model did train, so the loss was not taken after training
    trained = np.mean(np_ce_per_sample(features_of(images), labels.numpy(), *np_head(model)))
    assert abs(trained - expected) > 1e-3


# ---------------------------------------------------------------- CReFF


def test_rowwise_cosine_distance_sums_one_minus_cos_per_row() -> None:
    synthetic = torch.tensor([[1.0, 0.0], [1.0, 1.0], [3.0, 4.0]])
    real = torch.tensor([[0.0, 2.0], [2.0, 2.0], [-4.0, 3.0]])
    # rows: orthogonal (1), parallel (0), orthogonal (1)
    assert float(rowwise_cosine_distance(synthetic, real)) == pytest.approx(2.0, abs=1e-5)
    # a single global cosine would give 1 − (0 + 4 + 0)/(√27·√33)
    bias_syn, bias_real = torch.tensor([3.0, 4.0]), torch.tensor([4.0, 3.0])
    assert float(rowwise_cosine_distance(bias_syn, bias_real)) == pytest.approx(1 - 24 / 25, abs=1e-5)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
    expected = sum(1 - a[i] @ b[i] / (np.linalg.norm(a[i]) * np.linalg.norm(b[i])) for i in range(5))
    assert float(rowwise_cosine_distance(torch.tensor(a), torch.tensor(b))) == pytest.approx(expected, abs=1e-5)


def test_class_gradient_is_the_ce_gradient_and_differentiable_in_the_features() -> None:
    torch.manual_seed(0)
    head = nn.Linear(D, C)
    features = torch.randn(6, D, requires_grad=True)
    weight, bias = class_gradient(head, features, 1)
    w, b = head.weight.detach().double().numpy(), head.bias.detach().double().numpy()
    gw, gb = np_ce_grads(features.detach().double().numpy(), np.ones(6, dtype=int), w, b)
    np.testing.assert_allclose(weight.detach().numpy(), gw, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bias.detach().numpy(), gb, rtol=1e-5, atol=1e-6)
    (weight.sum() + bias.sum()).backward()  # create_graph: the features can be optimised through it
    assert features.grad is not None and features.grad.abs().sum() > 0


def creff_config(**overrides):  # type: ignore[no-untyped-def]
    base = {"method": "creff", "creff-features-per-class": 10, "creff-match-steps": 40, "creff-feature-lr": 0.1,
            "creff-retrain-epochs": 5, "local-lr": 0.1, "precision": "fp32"}  # exact float32 checks
    return resolve({**base, **overrides})


def creff_server(cfg=None) -> tuple[CReFFServer, EncoderClassifier]:  # type: ignore[no-untyped-def]
    images, labels = images_labels([5, 5, 5])
    model = linear_model(seed=11)
    return CReFFServer(cfg or creff_config(), model, federated(images, labels, [np.arange(15)])), model


def synthetic_real_gradients(head: nn.Linear, seed: int = 0) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Gradients the classifier would get on made-up 'real' features, one cluster per class."""
    rng = np.random.default_rng(seed)
    w, b = head.weight.detach().double().numpy(), head.bias.detach().double().numpy()
    real = {}
    for c in range(C):
        h = rng.normal(loc=3.0 * np.eye(D)[c], size=(20, D))
        gw, gb = np_ce_grads(h, np.full(20, c), w, b)
        real[c] = (torch.tensor(gw, dtype=torch.float32), torch.tensor(gb, dtype=torch.float32))
    return real


def test_creff_feature_matching_lowers_the_matching_loss() -> None:
    server, _ = creff_server()
    real = synthetic_real_gradients(server.classifier)
    before = server.matching_loss(real).item()
    # the loss is Σ_c [rows of W: Σ (1 − cos)] + [bias: 1 − cos], recomputed here
    per_class = server.cfg.creff_features_per_class
    manual = 0.0
    w, b = server.classifier.weight.detach().double().numpy(), server.classifier.bias.detach().double().numpy()
    for c, (rw, rb) in real.items():
        gw, gb = np_ce_grads(server.features[c * per_class:(c + 1) * per_class].detach().double().numpy(),
                             np.full(per_class, c), w, b)
        rw, rb = rw.double().numpy(), rb.double().numpy()
        manual += sum(1 - gw[i] @ rw[i] / (np.linalg.norm(gw[i]) * np.linalg.norm(rw[i])) for i in range(C))
        manual += 1 - gb @ rb / (np.linalg.norm(gb) * np.linalg.norm(rb))
    assert before == pytest.approx(manual, rel=1e-4)
    features_before = server.features.detach().clone()
    server.match_features(real)
    after = server.matching_loss(real).item()
    assert after < 0.8 * before
    assert not torch.equal(server.features.detach(), features_before)


def test_creff_retrained_classifier_fits_the_federated_features_with_their_labels() -> None:
    server, _ = creff_server(creff_config(**{"creff-retrain-epochs": 300}))  # official crt_epoch, at lr_net 0.01
    per_class = server.cfg.creff_features_per_class
    with torch.no_grad():  # well-separated clusters, class c around 4·e_c
        centres = 4.0 * torch.eye(D)[:C].repeat_interleave(per_class, dim=0)
        server.features.copy_(centres + 0.3 * torch.randn(C * per_class, D))
    classifier = server.retrain_classifier()
    expected_labels = torch.arange(C).repeat_interleave(per_class)  # feature block c belongs to class c
    with torch.no_grad():
        logits = classifier(server.features.detach())
    assert torch.equal(logits.argmax(dim=1), expected_labels)
    assert float(F.cross_entropy(logits, expected_labels)) < 0.2  # fitted, not a lucky initialisation


def creff_reports(model: EncoderClassifier, payload: dict[str, np.ndarray]) -> list[ClientReport]:
    reports = []
    for k, counts in enumerate(([6, 4, 0], [0, 3, 5])):
        images, labels = images_labels(counts, seed=20 + k)
        client = CReFFClient(creff_config(), C, payload)
        client.begin(copy.deepcopy(model), images, labels, torch.Generator().manual_seed(k))
        reports.append(ClientReport(k, len(labels), client.report()))
    return reports


def test_creff_server_evaluates_the_global_encoder_with_the_retrained_classifier() -> None:
    server, model = creff_server()
    before = copy.deepcopy(model.state_dict())
    first = server.broadcast(1, model)  # round 1 already sends the (fresh) matching head
    evaluated = server.evaluation_model(model)
    for key, value in evaluated.state_dict().items():  # nothing re-trained yet: the global model itself
        assert torch.equal(value, before[key]), key

    server.absorb(1, creff_reports(model, first))
    evaluated = server.evaluation_model(model)
    assert evaluated is not model
    assert torch.equal(evaluated.classifier.weight, server.classifier.weight)
    assert torch.equal(evaluated.classifier.bias, server.classifier.bias)
    assert not torch.allclose(evaluated.classifier.weight, before["classifier.weight"])
    assert not torch.allclose(evaluated.classifier.bias, before["classifier.bias"])
    x = torch.rand(5, 1, 1, D)
    with torch.no_grad():
        expected_logits = x.flatten(1) @ server.classifier.weight.T + server.classifier.bias
        torch.testing.assert_close(evaluated(x), expected_logits)
    # the global model that keeps training is untouched
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key

    payload = server.broadcast(2, model)
    assert set(payload) == {"creff-weight", "creff-bias"}
    np.testing.assert_array_equal(payload["creff-weight"], server.classifier.weight.detach().numpy())
    np.testing.assert_array_equal(payload["creff-bias"], server.classifier.bias.detach().numpy())


def test_creff_round_1_matches_at_exactly_the_head_the_clients_computed_gradients_at(monkeypatch) -> None:
    """The official code shares one fresh nn.Linear between the clients' real gradients and the server's matching
    in round 1; the server must not match at a head the clients never saw (e.g. its own while they use the global
    model's classifier)."""
    import fedlt_app.methods.decoupled.creff as creff_module

    server, model = creff_server()
    with torch.no_grad():  # a global classifier that differs from the server's fresh head
        model.classifier.weight.copy_(torch.arange(C * D, dtype=torch.float32).reshape(C, D) / 10)
        model.classifier.bias.copy_(torch.tensor([0.5, -0.5, 0.25]))
    server_head = copy.deepcopy(server.classifier.state_dict())
    assert not torch.equal(server_head["weight"], model.classifier.weight.detach())

    client_heads, matching_heads = [], []
    real_prototypes, real_class_gradient = creff_module.gradient_prototypes, creff_module.class_gradient

    def spy_prototypes(features, labels, head):  # type: ignore[no-untyped-def]
        client_heads.append({k: v.detach().clone() for k, v in head.state_dict().items()})
        return real_prototypes(features, labels, head)

    def spy_class_gradient(head, features, label):  # type: ignore[no-untyped-def]
        matching_heads.append({k: v.detach().clone() for k, v in head.state_dict().items()})
        return real_class_gradient(head, features, label)

    monkeypatch.setattr(creff_module, "gradient_prototypes", spy_prototypes)
    monkeypatch.setattr(creff_module, "class_gradient", spy_class_gradient)

    payload = record_to_payload(payload_to_record(server.broadcast(1, model)))  # the wire format
    assert set(payload) == {"creff-weight", "creff-bias"}
    reports = creff_reports(model, payload)
    assert len(client_heads) == 2
    server.absorb(1, reports)
    assert len(matching_heads) == server.cfg.creff_match_steps * C
    for head in client_heads + matching_heads:
        assert torch.equal(head["weight"], server_head["weight"])
        assert torch.equal(head["bias"], server_head["bias"])
    # and the reported real gradients are the analytic CE gradients at that head
    images, labels = images_labels([6, 4, 0], seed=20)
    h, y = features_of(images), labels.numpy()
    w, b = server_head["weight"].double().numpy(), server_head["bias"].double().numpy()
    for row, c in enumerate(reports[0].payload["creff-classes"].tolist()):
        gw, gb = np_ce_grads(h[y == c], y[y == c], w, b)
        np.testing.assert_allclose(reports[0].payload["creff-weight"][row], gw, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(reports[0].payload["creff-bias"][row], gb, rtol=1e-4, atol=1e-6)

    # round 2: the re-trained classifier, again on both sides
    client_heads.clear(), matching_heads.clear()
    retrained = copy.deepcopy(server.classifier.state_dict())
    assert not torch.equal(retrained["weight"], server_head["weight"])
    payload = server.broadcast(2, model)
    np.testing.assert_array_equal(payload["creff-weight"], retrained["weight"].numpy())
    server.absorb(2, creff_reports(model, payload))
    for head in client_heads + matching_heads:
        assert torch.equal(head["weight"], retrained["weight"]) and torch.equal(head["bias"], retrained["bias"])


def test_creff_checkpoint_restores_the_broadcast_head_and_features() -> None:
    server, model = creff_server()
    server.absorb(1, creff_reports(model, server.broadcast(1, model)))
    other, _ = creff_server(creff_config(seed=99))  # another fresh head and other features
    assert not np.array_equal(other.broadcast(2, model)["creff-weight"], server.broadcast(2, model)["creff-weight"])
    other.load_state_dict(copy.deepcopy(server.state_dict()))
    for key, value in server.broadcast(2, model).items():
        np.testing.assert_array_equal(other.broadcast(2, model)[key], value)
    assert torch.equal(other.features.detach(), server.features.detach()) and other.trained
    # a fresh server resumed before any absorb still broadcasts its (restored) round-1 head
    fresh, _ = creff_server()
    resumed, _ = creff_server(creff_config(seed=99))
    resumed.load_state_dict(copy.deepcopy(fresh.state_dict()))
    for key, value in fresh.broadcast(1, model).items():
        np.testing.assert_array_equal(resumed.broadcast(1, model)[key], value)
    assert not resumed.trained


@pytest.mark.parametrize("lr", [0.01, 0.3])
def test_creff_retraining_takes_sgd_steps_at_creff_retrain_lr_not_the_local_lr(lr: float, monkeypatch) -> None:
    # one epoch over 3 classes x 2 features = one batch of 6: a single full-batch SGD step, order-free
    cfg = creff_config(**{"creff-features-per-class": 2, "creff-retrain-epochs": 1, "creff-retrain-lr": lr,
                          "local-lr": 0.7})
    assert cfg.creff_retrain_lr == lr
    server, _ = creff_server(cfg)
    torch.manual_seed(5)
    start = nn.Linear(D, C)
    initial = copy.deepcopy(start.state_dict())
    monkeypatch.setattr(server, "_fresh_classifier", lambda feature_dim: start)
    sgd_lrs = []
    real_sgd = torch.optim.SGD

    def spy_sgd(params, lr, **kwargs):  # type: ignore[no-untyped-def]
        sgd_lrs.append(lr)
        return real_sgd(params, lr=lr, **kwargs)

    monkeypatch.setattr(torch.optim, "SGD", spy_sgd)
    classifier = server.retrain_classifier()
    assert sgd_lrs == [lr]
    h = server.features.detach().double().numpy()
    y = server.feature_labels.numpy()
    w0, b0 = initial["weight"].double().numpy(), initial["bias"].double().numpy()
    gw, gb = np_ce_grads(h, y, w0, b0)
    np.testing.assert_allclose(classifier.weight.detach().numpy(), w0 - lr * gw, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(classifier.bias.detach().numpy(), b0 - lr * gb, rtol=1e-5, atol=1e-6)


def test_creff_retrain_lr_defaults_to_the_official_lr_net_and_must_be_positive() -> None:
    assert resolve({"method": "creff"}).creff_retrain_lr == 0.01
    for bad in (0.0, -0.1):
        with pytest.raises(ConfigError, match="creff-retrain-lr"):
            resolve({"method": "creff", "creff-retrain-lr": bad})


def test_creff_server_averages_real_gradients_per_class_over_the_clients_that_have_it() -> None:
    server, model = creff_server()
    reports = creff_reports(model, {})
    real = server.mean_real_gradients(reports)
    assert sorted(real) == [0, 1, 2]
    p0, p1 = reports[0].payload, reports[1].payload
    np.testing.assert_allclose(real[0][0].numpy(), p0["creff-weight"][0], rtol=1e-6)
    np.testing.assert_allclose(real[1][0].numpy(), (p0["creff-weight"][1] + p1["creff-weight"][0]) / 2, rtol=1e-6)
    np.testing.assert_allclose(real[1][1].numpy(), (p0["creff-bias"][1] + p1["creff-bias"][0]) / 2, rtol=1e-6)
    np.testing.assert_allclose(real[2][1].numpy(), p1["creff-bias"][1], rtol=1e-6)


def test_creff_client_gradients_use_the_servers_classifier_on_the_received_encoder() -> None:
    images, labels = images_labels([5, 0, 3], seed=12)
    model = linear_model(seed=13, dropout=0.5)
    own_w, own_b = np_head(model)
    rng = np.random.default_rng(14)
    payload = {"creff-weight": rng.normal(size=(C, D)).astype(np.float32),
               "creff-bias": rng.normal(size=(C,)).astype(np.float32)}
    client = CReFFClient(creff_config(), C, payload)
    client.begin(model, images, labels, torch.Generator().manual_seed(0))
    report = client.report()
    assert report["creff-classes"].tolist() == [0, 2]
    h, y = features_of(images), labels.numpy()  # eval mode: no dropout on the features
    for row, c in enumerate([0, 2]):
        members = y == c
        gw, gb = np_ce_grads(h[members], y[members], payload["creff-weight"].astype(np.float64),
                             payload["creff-bias"].astype(np.float64))
        np.testing.assert_allclose(report["creff-weight"][row], gw, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(report["creff-bias"][row], gb, rtol=1e-4, atol=1e-6)
        own_gw, _ = np_ce_grads(h[members], y[members], own_w, own_b)
        assert not np.allclose(report["creff-weight"][row], own_gw, atol=1e-3)
    # the model's own classifier is not replaced by the server's
    np.testing.assert_array_equal(np_head(model)[0], own_w)


def test_creff_client_without_a_payload_uses_the_models_classifier() -> None:
    images, labels = images_labels([4, 4, 4], seed=15)
    model = linear_model(seed=16)
    client = CReFFClient(creff_config(), C, {})
    client.begin(model, images, labels, torch.Generator().manual_seed(0))
    report = client.report()
    h, y = features_of(images), labels.numpy()
    for row, c in enumerate(report["creff-classes"].tolist()):
        gw, gb = np_ce_grads(h[y == c], y[y == c], *np_head(model))
        np.testing.assert_allclose(report["creff-weight"][row], gw, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(report["creff-bias"][row], gb, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- FedProx


def test_proximal_term_gradient_is_mu_times_the_distance_to_the_global_model() -> None:
    model = nn.Sequential(nn.Linear(D, 5), nn.ReLU(), nn.Linear(5, C))
    anchor = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    mu = 0.37
    grads = torch.autograd.grad(mu * proximal_term(list(model.parameters()), anchor), list(model.parameters()))
    for g, p, a in zip(grads, model.parameters(), anchor, strict=True):
        torch.testing.assert_close(g, mu * (p.detach() - a))
    expected_value = 0.5 * sum(float(((p.detach() - a) ** 2).sum()) for p, a in zip(model.parameters(), anchor))
    assert proximal_term(list(model.parameters()), anchor).item() == pytest.approx(expected_value, rel=1e-6)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_fedprox_local_steps_add_mu_times_the_drift_from_the_received_model(momentum: float) -> None:
    images, labels = images_labels([6, 2, 4], seed=17)
    model = linear_model(seed=18)
    lr, mu = 0.5, 0.8
    cfg = resolve({"method": "fedprox", "prox-mu": mu})
    method = get_method("fedprox").client(cfg, C, {})
    # two full-batch steps (the proximal gradient is zero at the first one)
    train_locally(model, images, labels, method, setup(lr=lr, epochs=2, momentum=momentum, prox_mu=mu),
                  torch.Generator().manual_seed(0))

    h, y = features_of(images), labels.numpy()
    anchor = np_head(linear_model(seed=18))
    theta = [x.copy() for x in anchor]
    buffers = [np.zeros_like(x) for x in theta]
    for step in range(2):
        grads = np_ce_grads(h, y, *theta)
        for i in range(2):
            g = grads[i] + mu * (theta[i] - anchor[i])
            buffers[i] = g if step == 0 else momentum * buffers[i] + g
            theta[i] = theta[i] - lr * buffers[i]
    got = np_head(model)
    np.testing.assert_allclose(got[0], theta[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1], theta[1], rtol=1e-5, atol=1e-6)
    # without the proximal term the second step lands elsewhere
    plain = linear_model(seed=18)
    train_locally(plain, images, labels, ClientMethod(cfg, C, {}), setup(lr=lr, epochs=2, momentum=momentum),
                  torch.Generator().manual_seed(0))
    assert not np.allclose(np_head(plain)[0], got[0], atol=1e-4)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_weight_decay_adds_its_multiple_of_the_weights_to_every_local_gradient(momentum: float) -> None:
    images, labels = images_labels([5, 3, 4], seed=21)
    lr, wd = 0.5, 0.03
    cfg = resolve({"method": "fedavg", "weight-decay": wd})
    assert LocalTraining.from_config(cfg).weight_decay == wd
    model = linear_model(seed=22)
    train_locally(model, images, labels, ClientMethod(cfg, C, {}), setup(lr=lr, epochs=2, momentum=momentum,
                                                                          weight_decay=wd),
                  torch.Generator().manual_seed(0))
    h, y = features_of(images), labels.numpy()
    theta = list(np_head(linear_model(seed=22)))
    buffers = [np.zeros_like(x) for x in theta]
    for step in range(2):  # SGD: g + wd·θ, then momentum, then the step
        grads = np_ce_grads(h, y, *theta)
        for i in range(2):
            g = grads[i] + wd * theta[i]
            buffers[i] = g if step == 0 else momentum * buffers[i] + g
            theta[i] = theta[i] - lr * buffers[i]
    got = np_head(model)
    np.testing.assert_allclose(got[0], theta[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1], theta[1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="weight-decay"):
        resolve({"weight-decay": -1e-4})


def test_augment_key_reaches_the_shared_loop_and_refuses_flipped_glyphs(monkeypatch: pytest.MonkeyPatch) -> None:
    """augment='crop-flip' is what the shared loop's batches go through; mnist/femnist refuse it by name."""
    cfg = resolve({"method": "fedavg", "augment": "crop-flip"})
    assert LocalTraining.from_config(cfg).augment == "crop-flip"
    assert LocalTraining.from_config(resolve({"method": "fedavg"})).augment == "authors"
    seen: list[str] = []
    real = train_module.augment

    def spy(images: torch.Tensor, dataset: str, generator: torch.Generator | None, policy: str = "authors"):
        seen.append(policy)
        return real(images, dataset, generator, policy)

    monkeypatch.setattr(train_module, "augment", spy)
    images = torch.randint(0, 256, (10, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 1, 2] * 3 + [0])
    model = build_model("cnn", 3, 1, 28)
    train_locally(model, images, labels, ClientMethod(cfg, 3, {}), LocalTraining.from_config(cfg),
                  torch.Generator().manual_seed(0))
    assert seen and set(seen) == {"crop-flip"}
    for dataset, partition in (("mnist", "dirichlet"), ("femnist", "writers")):
        with pytest.raises(ConfigError, match="augment: 'crop-flip'"):
            resolve({"dataset": dataset, "partition": partition, "augment": "crop-flip"})
    with pytest.raises(ConfigError, match="augment"):
        resolve({"augment": "mixup"})


def test_fedprox_trains_a_model_with_a_frozen_parameter() -> None:
    images, labels = images_labels([3, 3, 3])
    model = linear_model()
    model.classifier.bias.requires_grad_(False)
    cfg = resolve({"method": "fedprox", "prox-mu": 0.1})
    train_locally(model, images, labels, ClientMethod(cfg, C, {}), setup(epochs=2, prox_mu=0.1),
                  torch.Generator().manual_seed(0))


def test_fedprox_needs_a_positive_prox_mu() -> None:
    with pytest.raises(ConfigError, match="prox-mu"):
        resolve({"method": "fedprox"})
    cfg = resolve({"method": "fedprox", "prox-mu": 0.01})
    assert cfg.method == "fedprox" and cfg.prox_mu == 0.01


# ---------------------------------------------------------------- every method


def test_config_accepts_exactly_the_registered_methods() -> None:
    assert set(METHOD_NAMES) == set(METHODS)
    with pytest.raises(ValueError, match="method"):
        get_method("fedbogus")
    with pytest.raises(ConfigError, match="method"):
        resolve({"method": "fedbogus"})


def statistics_answers(method, cfg, model, data) -> list[ClientReport]:  # type: ignore[no-untyped-def]
    """Every client's answer to the statistics query on ``model``, through the wire format."""
    answers = []
    for k in range(data.num_clients):
        x, y = data.client_data(k)
        answer = method.client(cfg, C, {}).statistics(copy.deepcopy(model), x, y, FP32,
                                                      torch.Generator().manual_seed(k))
        answers.append(ClientReport(k, 0, record_to_payload(payload_to_record(answer)) if answer else {}))
    return answers


# the CLIP methods need a CLIP model and its weights file: tests/test_clip.py runs their parts on a tiny one
@pytest.mark.parametrize("name", sorted(set(METHODS) - set(CLIP_METHODS)))
def test_every_method_builds_and_runs_two_rounds_of_its_parts(name: str) -> None:
    overrides = {"method": name, "creff-features-per-class": 4, "creff-match-steps": 2, "creff-retrain-epochs": 2,
                 "ratio-aux-per-class": 2, "balance-threshold": 1, "grad-clip": 1.0, "rucr-crt-epochs": 2,
                 "fedic-server-data": "heldout", "fedic-steps": 2, "fedic-teach-per-class": 1,
                 "fedic-labeled-batch-size": 2, "fedic-unlabeled-batch-size": 2}
    if name == "fedprox":
        overrides["prox-mu"] = 0.01
    cfg = resolve(overrides)
    assert cfg.method == name
    method = get_method(name)
    torch.manual_seed(0)
    model = method.extend_model(EncoderClassifier(nn.Sequential(nn.Flatten(), nn.Linear(D, 6), nn.ReLU()), 6, C))
    images, labels = images_labels([6, 4, 2])
    held_images, held_labels = images_labels([2, 2, 2], seed=9)  # on no client: FedIC's server data
    images, labels = torch.cat([images, held_images]), torch.cat([labels, held_labels])
    data = federated(images, labels, [np.arange(0, 6), np.arange(6, 12)], train_indices=np.arange(12))
    server = method.server(cfg, model, data)
    assert isinstance(server, ServerMethod)
    global_state = copy.deepcopy(model.state_dict())
    for server_round in (1, 2):
        model.load_state_dict(global_state)
        server.begin_round(server_round, list(range(data.num_clients)))
        if server.wants_statistics_before_training(server_round):  # the cohort's query first (FedYoYo)
            server.absorb_statistics(server_round, model, statistics_answers(method, cfg, model, data))
        payload = server.broadcast(server_round, model)
        payload = record_to_payload(payload_to_record(payload)) if payload else {}  # the wire format
        reports, states = [], []
        for k in range(data.num_clients):
            local = copy.deepcopy(model)
            client = method.client(cfg, C, payload)
            assert isinstance(client, ClientMethod)
            x, y = data.client_data(k)
            stats = train_locally(local, x, y, client, setup(lr=0.05), torch.Generator().manual_seed(k))
            assert np.isfinite(stats.mean_loss)
            client.finish(local)
            report = client.report()
            report = record_to_payload(payload_to_record(report)) if report else {}
            local_model = ({key: v.detach().numpy().copy() for key, v in local.travelling_state().items()}
                           if server.reads_client_models else {})
            reports.append(ClientReport(k, len(y), report, local_model))
            states.append(local.state_dict())
        weights = server.aggregation_weights(server_round, reports)
        assert weights is None or (len(weights) == len(reports) and all(w >= 0 for w in weights))
        server.absorb(server_round, reports)
        global_state = {key: sum(s[key].double() for s in states).div(len(states)).to(states[0][key].dtype)
                        for key in global_state}
        for key, value in server.global_model_overrides(server_round).items():  # FedNH's prototypes, FedIC's model
            global_state[key] = torch.from_numpy(np.asarray(value)).to(global_state[key].dtype)
        model.load_state_dict(global_state)
        if server.wants_statistics(server_round):  # the query on the new global model (CCVR, RUCR)
            server.absorb_statistics(server_round, model, statistics_answers(method, cfg, model, data))
        evaluated = server.evaluation_model(model)
        assert isinstance(evaluated, EncoderClassifier)
        with torch.no_grad():
            assert torch.isfinite(evaluated(images[:4].float() / 255)).all()
        metrics = server.round_metrics()
        assert all(isinstance(v, (int, float)) for v in metrics.values())
