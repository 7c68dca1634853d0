"""FedYoYo's defining rules, each against an independent computation.

The effective weight of a class in a batch is 1 / mean cosine of its centred features (1 for a single
sample, the floor 1e-6 for a mean at or below it); the server's smoothing (round 1 caps outliers, later
rounds EMA with the change limit); the prior moves toward the client's labels once per step; the loss is
cross-entropy on both adjusted views plus the warmed-up KL from the correctly classified weak views; the
strong view draws from the method's stream only, so the shared batches stay paired with every other
method's; one run through the real apps (in process) with the query before training.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from app_runs import metrics_rows
from in_process import record_calls, run_in_process, run_off_and_secagg
from test_baselines import C, federated, images_labels, linear_model, setup
from torch import nn
from torch.nn import functional as F

from fedlt_app.config import resolve
from fedlt_app.methods import ClientMethod
from fedlt_app.methods.base import ClientReport
from fedlt_app.methods.distillation.fedyoyo import (
    EFFECTIVE,
    PRIOR,
    ROUND,
    FedYoYoClient,
    FedYoYoServer,
    batch_effective_weights,
    distillation_weight,
    effective_weights,
    fedyoyo_loss,
    self_distillation,
    smoothed_effective_weights,
    strong_view,
)
from fedlt_app.models import EncoderClassifier
from fedlt_app.precision import FP32
from fedlt_app.train import train_locally


def test_effective_weight_of_a_batch_is_the_inverse_mean_cosine_of_centred_features() -> None:
    centred = torch.tensor([
        [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0],  # class 0: orthogonal, R = I, mean 1/3 -> 3
        [1.0, 1.0, 0.0], [2.0, 2.0, 0.0],  # class 1: parallel, R = 1, mean 1 -> 1
        [0.5, -1.0, 3.0],  # class 2: a single sample -> 1
        [1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 0.0],  # class 3: opposite + a zero row
    ])
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3])
    eff = batch_effective_weights(centred, labels, 5)
    # class 3: cosines [[1, -1, 0], [-1, 1, 0], [0, 0, 0]] (zero norm products -> 1e-6, dot 0), mean 0 -> floor
    expected = torch.tensor([3.0, 1.0, 1.0, 1e6, 0.0])
    torch.testing.assert_close(eff, expected, rtol=1e-5, atol=1e-5)


def test_capped_effective_weight_counts_a_clients_only_two_samples_as_two() -> None:
    """fedyoyo-cap-effective: a client's only two samples of a class, centred at their own mean, are exactly
    opposite; the authors' floor makes them 1e6 effective samples, the cap makes them 2. Any class whose batch
    holds all of the client's samples of it cancels below random directions (four here count as ~18): capped
    at 4. A batch's eff at or below its count stays."""
    features = torch.tensor([[1.0, 2.0, 0.0], [3.0, -1.0, 1.0],  # class 0: the client's only two samples
                             [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.3, 0.3, 0.3]])  # class 1
    labels = torch.tensor([0, 0, 1, 1, 1, 1])
    authors = effective_weights(features, labels, 2, 64, torch.Generator().manual_seed(0))
    capped = effective_weights(features, labels, 2, 64, torch.Generator().manual_seed(0), cap=True)
    assert float(authors[0]) == pytest.approx(1e6)
    assert float(capped[0]) == 2.0
    assert float(authors[1]) > 4.0 and float(capped[1]) == 4.0
    centred = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0],  # orthogonal: 3 of 3
                            [1.0, 1.0, 0.0], [2.0, 2.0, 0.0]])  # parallel: 1 of 2
    batch = batch_effective_weights(centred, torch.tensor([0, 0, 0, 1, 1]), 2, cap=True)
    torch.testing.assert_close(batch, torch.tensor([3.0, 1.0]))
    cfg = resolve({"method": "fedyoyo", "fedyoyo-cap-effective": True})
    assert cfg.fedyoyo_cap_effective and not resolve({"method": "fedyoyo"}).fedyoyo_cap_effective


def test_client_effective_weights_sum_the_batches_and_centre_at_the_class_means() -> None:
    torch.manual_seed(0)
    features = torch.randn(12, 4) + 5.0  # a large common offset: centring must remove it
    labels = torch.tensor([0] * 6 + [1] * 6)
    one_batch = effective_weights(features, labels, 3, batch_size=64, generator=torch.Generator().manual_seed(1))
    centred = features.double() - torch.stack([features[:6].double().mean(0), features[6:].double().mean(0)])[labels]
    for c, rows in ((0, centred[:6]), (1, centred[6:])):
        unit = rows / rows.norm(dim=1, keepdim=True)
        assert float(one_batch[c]) == pytest.approx(1.0 / float((unit @ unit.T).mean()), rel=1e-4)
    assert one_batch[2] == 0  # a class the client lacks adds nothing
    # in batches of 4: the sum over the shuffled batches of each batch's weight
    generator = torch.Generator().manual_seed(3)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(3))
    split = effective_weights(features, labels, 3, batch_size=4, generator=generator)
    centred32 = (features - torch.stack([features[:6].mean(0), features[6:].mean(0)])[labels])
    by_hand = sum(batch_effective_weights(centred32[b], labels[b], 3) for b in order.split(4))
    torch.testing.assert_close(split, by_hand)


def test_server_smoothing_caps_the_first_round_then_averages_with_a_change_limit() -> None:
    first = smoothed_effective_weights(np.array([2.0, 4.0, 5e4]), None)
    np.testing.assert_allclose(first, [2.0, 4.0, 3.0])  # the outlier becomes the mean of the others
    previous = np.array([1.0, 10.0, 3.0])
    later = smoothed_effective_weights(np.array([2000.0, 20.0, 3.0]), previous)
    # 0.9 * previous + 0.1 * current = (200.9, 11, 3); class 0 changed by 199.9x > 100: kept at 1
    np.testing.assert_allclose(later, [1.0, 11.0, 3.0])


def yoyo_server(cfg) -> FedYoYoServer:  # type: ignore[no-untyped-def]
    data = federated(*images_labels([2, 2, 2]), [np.arange(3), np.arange(3, 6)], train_indices=np.arange(6))
    return FedYoYoServer(cfg, linear_model(), data)


def answers(*per_client: list[float]) -> list[ClientReport]:
    return [ClientReport(k, 0, {EFFECTIVE: np.asarray(a, dtype=np.float64)}) for k, a in enumerate(per_client)]


def test_server_prior_is_the_normalised_smoothed_sum_and_survives_a_checkpoint() -> None:
    cfg = resolve({"method": "fedyoyo"})
    server = yoyo_server(cfg)
    assert server.wants_statistics_before_training(1)
    server.absorb_statistics(1, linear_model(), answers([1.0, 2.0, 0.0], [3.0, 0.0, 5.0]))
    total = np.array([5.0, 3.0, 6.0])  # 1 + the clients' sum
    payload = server.broadcast(1, linear_model())
    np.testing.assert_allclose(payload[PRIOR], total / total.sum(), rtol=1e-6)
    assert payload[ROUND].tolist() == [1]
    restored = yoyo_server(cfg)
    restored.load_state_dict(copy.deepcopy(server.state_dict()))
    for s in (server, restored):
        s.absorb_statistics(2, linear_model(), answers([9.0, 9.0, 9.0]))
    expected = 0.9 * total + 0.1 * np.array([10.0, 10.0, 10.0])
    np.testing.assert_allclose(server.broadcast(2, linear_model())[PRIOR], expected / expected.sum(), rtol=1e-6)
    np.testing.assert_array_equal(restored.broadcast(2, linear_model())[PRIOR],
                                  server.broadcast(2, linear_model())[PRIOR])


def test_distillation_uses_only_correct_weak_views_and_is_zero_without_any() -> None:
    weak = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0], [0.0, 4.0, 1.0]])
    strong = torch.tensor([[1.0, 1.0, 0.0], [0.5, 0.0, 0.0], [0.0, 0.0, 2.0]])
    labels = torch.tensor([0, 1, 1])  # rows 0 and 2 are classified correctly by the weak view
    t = 1.5
    by_hand = 0.0
    for row in (0, 2):
        p = F.softmax(weak[row] / t, dim=0)
        q = F.softmax(strong[row] / t, dim=0)
        by_hand += float((p * (p.log() - q.log())).sum())
    assert float(self_distillation(weak, strong, labels, t)) == pytest.approx(by_hand / 2, rel=1e-5)
    assert float(self_distillation(weak, strong, torch.tensor([2, 0, 0]), t)) == 0.0
    both = torch.cat([weak, strong])
    loss = fedyoyo_loss(both, labels, t, kd_weight=0.7)
    cross_entropy = float(F.cross_entropy(both, torch.cat([labels, labels])))
    assert float(loss) == pytest.approx(cross_entropy + 0.7 * by_hand / 2, rel=1e-5)
    assert distillation_weight(4.0, 10, 50) == pytest.approx(0.8)
    assert distillation_weight(4.0, 80, 50) == 4.0
    assert distillation_weight(4.0, 1, 0) == 4.0


def test_the_prior_moves_toward_the_local_labels_once_per_step_and_adjusts_both_views() -> None:
    cfg = resolve({"method": "fedyoyo", "fedyoyo-gamma": 0.25, "fedyoyo-tau": 2.0, "fedyoyo-lambda": 0.0})
    prior = np.array([0.5, 0.3, 0.2], dtype=np.float32)
    client = FedYoYoClient(cfg, C, {PRIOR: prior, ROUND: np.array([1])})
    model = linear_model()
    images, labels = images_labels([3, 1, 0])
    client.begin(model, images, labels, torch.Generator().manual_seed(0))
    local = np.array([0.75, 0.25, 0.0])
    x = images[:2].float() / 255
    x2 = torch.cat([x, x])
    y = labels[:2]
    for step in (1, 2):
        loss = client.loss(model, x2, y)
        pi = (1 - 0.25) ** step * prior + (1 - (1 - 0.25) ** step) * local
        logits = model(x2).detach().double() + torch.log(torch.from_numpy(pi) ** 2 + 1e-9)
        expected = F.cross_entropy(logits, torch.cat([y, y]))
        assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)


def test_strong_view_draws_only_from_its_generator() -> None:
    images = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    before = torch.get_rng_state()
    first = strong_view(images, "fmnist", torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG (the loop's dropout) is untouched
    again = strong_view(images, "fmnist", torch.Generator().manual_seed(5))
    other = strong_view(images, "fmnist", torch.Generator().manual_seed(6))
    assert first.shape == (8, 1, 28, 28) and first.dtype == torch.float32
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert float(first.min()) >= 0.0 and float(first.max()) <= 1.0
    assert not torch.equal(first, images.float() / 255)  # augmented
    colour = strong_view(torch.zeros(2, 3, 32, 32, dtype=torch.uint8) + 128, "cifar10", torch.Generator())
    assert colour.shape == (2, 3, 32, 32)


def test_training_sees_the_shared_batches_and_doubles_each_with_the_strong_view() -> None:
    cfg = resolve({"method": "fedyoyo", "batch-size": 4})
    images, labels = images_labels([6, 3, 1])
    seen: list[int] = []

    class Watching(FedYoYoClient):
        def loss(self, model, x, y):  # type: ignore[no-untyped-def]
            seen.append(len(x))
            assert len(x) == 2 * len(y)
            return super().loss(model, x, y)

    payload = {PRIOR: np.full(C, 1 / C, dtype=np.float32), ROUND: np.array([3])}
    shared, yoyo = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    train_locally(linear_model(), images, labels, ClientMethod(cfg, C, {}), setup(batch_size=4), shared)
    stats = train_locally(linear_model(), images, labels, Watching(cfg, C, payload), setup(batch_size=4), yoyo)
    assert seen == [8, 8, 4] and math.isfinite(stats.mean_loss)
    # the data stream advanced exactly as FedAvg's: same shuffles, same shared augmentation
    assert torch.equal(shared.get_state(), yoyo.get_state())


def test_client_statistics_answer_the_effective_weights_of_the_received_model() -> None:
    cfg = resolve({"method": "fedyoyo", "batch-size": 4})
    images, labels = images_labels([5, 4, 0])
    model = linear_model()
    answer = FedYoYoClient(cfg, C, {}).statistics(copy.deepcopy(model), images, labels, FP32,
                                                  torch.Generator().manual_seed(2))
    with torch.no_grad():
        features = model.encoder(images.float() / 255)
    expected = effective_weights(features, labels, C, 4, torch.Generator().manual_seed(2))
    np.testing.assert_allclose(answer[EFFECTIVE], expected.double().numpy(), rtol=1e-6)
    capped_cfg = resolve({"method": "fedyoyo", "batch-size": 4, "fedyoyo-cap-effective": True})
    capped = FedYoYoClient(capped_cfg, C, {}).statistics(copy.deepcopy(model), images, labels, FP32,
                                                         torch.Generator().manual_seed(2))
    by_hand = effective_weights(features, labels, C, 4, torch.Generator().manual_seed(2), cap=True)
    np.testing.assert_allclose(capped[EFFECTIVE], by_hand.double().numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="generator"):
        FedYoYoClient(cfg, C, {}).statistics(model, images, labels, FP32)


def test_fedyoyo_runs_through_the_apps_with_the_query_before_training(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    code = run_in_process(
        tmp_path, monkeypatch,
        "method='fedyoyo' num-server-rounds=2 samples-per-class=30 imbalance-ratio=10.0 fedyoyo-warmup=2 "
        f"output-dir='{tmp_path / 'out'}' run-name='yoyo' wandb-mode='disabled'",
        num_clients=2,
    )
    assert code == 0
    rows = metrics_rows(tmp_path / "out" / "yoyo")
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert math.isfinite(row["accuracy"])
        assert 0 < row["fedyoyo_prior_min"] <= row["fedyoyo_prior_max"] < 1
        # the query before training travels too: the model goes down twice to each client
        assert row["parameters_down"] > 2 * row["parameters_up"] * 0.9


def test_fedyoyo_under_secure_aggregation_takes_the_prior_from_the_cohorts_masked_sum(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """secagg: the query before training is a protocol instance of its own, asked of the round's cohort only;
    the server's sum is what those clients masked (within the statistics codec's steps) and round 1, where
    both runs start from one model, broadcasts the plain run's prior."""
    broadcasts = record_calls(monkeypatch, FedYoYoServer, "broadcast")
    sums = record_calls(monkeypatch, FedYoYoServer, "absorb_statistics_sums")
    answers = record_calls(monkeypatch, FedYoYoClient, "statistics_summands")
    runs = run_off_and_secagg(tmp_path, monkeypatch, "method='fedyoyo' num-server-rounds=2 clients-per-round=3 "
                              "samples-per-class=30 imbalance-ratio=10.0 fedyoyo-warmup=2 precision='fp32'",
                              num_clients=4, run_name="yoyo")
    assert len(answers) == 2 * 3  # two rounds, a cohort of 3 of the 4 clients each
    secure_sums = [call.args[2] for call in sums if call.instance.cfg.secure_aggregation == "secagg"]
    assert len(secure_sums) == 2
    for round_index, total in enumerate(secure_sums):
        masked = sum(call.result[EFFECTIVE] for call in answers[3 * round_index:3 * round_index + 3])
        np.testing.assert_allclose(total[EFFECTIVE], masked, rtol=0, atol=3 * 2.0**-16)
    priors = {mode: [call.result[PRIOR] for call in broadcasts if call.instance.cfg.secure_aggregation == mode]
              for mode in ("off", "secagg")}
    np.testing.assert_allclose(priors["secagg"][0], priors["off"][0], rtol=1e-5)
    rows = metrics_rows(runs["secagg"])
    assert [r["round"] for r in rows] == [1, 2] and all(math.isfinite(r["accuracy"]) for r in rows)
    assert all(r["bytes_up"] > 0 for r in rows)


def test_views_share_batch_statistics_on_batchnorm_models_and_dropout_masks_stay_paired_on_the_others() -> None:
    cfg = resolve({"method": "fedyoyo"})
    client = FedYoYoClient(cfg, C, {PRIOR: np.full(C, 1 / C, dtype=np.float32), ROUND: np.array([1])})
    client.generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1, 1, 4)
    torch.manual_seed(0)
    batchnorm = EncoderClassifier(nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU()), 6, C)
    batchnorm.train()
    together = batchnorm(x)  # the authors' one forward: batch statistics over both views
    torch.testing.assert_close(client.forward_views(batchnorm, x, 4), together)
    assert not torch.allclose(torch.cat([batchnorm(x[:4]), batchnorm(x[4:])]), together)
    dropout = EncoderClassifier(nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.Dropout(0.5)), 6, C)
    dropout.train()
    torch.manual_seed(1)
    alone = dropout(x[:4])  # FedAvg's forward of the shared view
    after_fedavg = torch.get_rng_state()
    torch.manual_seed(1)
    both = client.forward_views(dropout, x, 4)
    assert torch.equal(both[:4], alone) and torch.equal(torch.get_rng_state(), after_fedavg)
