"""CAPT (method=capt) on the tiny random CLIP of tests/test_clip.py: model, losses, mask, server, end to end.

Expected values are written out by hand (or with open_clip's own encoders), never with CAPT's functions.
Tests needing open_clip skip without the extra; the server's arithmetic is plain numpy and always runs.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from app_runs import metrics_rows
from in_process import run_in_process
from test_clip import EMBED, IMAGE, build, clip_config
from torch.nn import functional as F

from fedlt_app.clip.classnames import CLASS_NAMES
from fedlt_app.config import ConfigError, resolve
from fedlt_app.methods import ClientReport
from fedlt_app.methods.vision_language.capt import (
    CLASS_AWARE,
    COUNTS_KEY,
    GENERAL,
    PRIOR_KEY,
    VAL_CORRECT,
    VAL_PREDICTED,
    Bandit,
    CAPTClient,
    CAPTServer,
    bandit_reward,
    capt_losses,
    complementarity,
    complementarity_clusters,
    complete_linkage,
    js_divergence,
    kmeans,
    macro_f1,
    per_class_aggregate,
    similarity_clusters,
)
from fedlt_app.records import content_nbytes
from fedlt_app.train import LocalTraining, train_locally

KEYS = ["prompts.general", "prompts.class_aware", "prompts.coupling.weight", "prompts.coupling.bias"]
VISION_WIDTH = 64  # the tiny CLIP's vision width (D_v)


# ---------------------------------------------------------------- model


def test_unprompted_vision_path_is_open_clips_encode_image(tiny_clip: tuple) -> None:
    """The hand-written embed step (prompts go in before ln_pre) equals encode_image when there is no prompt."""
    from fedlt_app.clip.dual_prompts import prompted_image_features

    original, _ = tiny_clip
    pixels = torch.randn(3, 3, IMAGE, IMAGE)
    with torch.no_grad():
        got = prompted_image_features(original, pixels, torch.zeros(0, VISION_WIDTH))
        torch.testing.assert_close(got, original.encode_image(pixels), atol=1e-5, rtol=1e-5)


def test_shapes_splice_and_visual_sequence(tiny_clip: tuple) -> None:
    """g (n_g, D_t), a (C, n_ctx − n_g, D_t); [g, a_c] set to "a photo of a" gives that prompt's text feature;
    the vision sequence carries 1 + patches + n_g tokens."""
    import open_clip

    original, path = tiny_clip
    model = build("capt", path, "cifar10", 10, **{"capt-n-ctx": 4, "capt-n-general": 1})
    assert {k: tuple(v.shape) for k, v in model.travelling_state().items()} == {
        KEYS[0]: (1, EMBED), KEYS[1]: (10, 3, EMBED), KEYS[2]: (VISION_WIDTH, EMBED), KEYS[3]: (VISION_WIDTH,)}
    phrase = original.token_embedding(open_clip.tokenize(["a photo of a"])[0, 1:5]).detach()
    with torch.no_grad():
        model.prompts.general.copy_(phrase[:1])
        model.prompts.class_aware.copy_(phrase[1:].expand(10, -1, -1))
        expected = F.normalize(original.encode_text(
            open_clip.tokenize([f"a photo of a {n}." for n in CLASS_NAMES["cifar10"]])), dim=-1)
        torch.testing.assert_close(model.text_features(), expected, atol=1e-5, rtol=1e-5)
    seen = []
    handle = model.clip.visual.ln_pre.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    with torch.no_grad():
        model(torch.zeros(2, 3, IMAGE, IMAGE))
    handle.remove()
    assert seen == [torch.Size([2, 1 + (IMAGE // 8) ** 2 + 1, VISION_WIDTH])]


# ---------------------------------------------------------------- losses


def hand_losses(model, x: torch.Tensor, y: torch.Tensor, prior: np.ndarray, temperature: float):
    """L_LA, L_CA, L_G written out sample by sample."""
    with torch.no_grad():
        f = model.image_features(x).double()
        t = model.text_features().double()
        scale = model.clip.logit_scale.exp().double()
        a_bar = F.normalize(model.prompts.class_aware.double().mean(dim=1), dim=-1)
        g_hat = F.normalize(model.prompts.general.double(), dim=-1)
    pi = torch.as_tensor(prior, dtype=torch.float64)
    pi = pi / pi.sum()
    la = ca = 0.0
    for i in range(len(y)):
        z = scale * f[i] @ t.T
        la -= torch.log(pi[y[i]] * torch.exp(z[y[i]]) / (pi * torch.exp(z)).sum())
        s = f[i] @ a_bar.T / temperature
        ca -= torch.log(pi[y[i]] * torch.exp(s[y[i]]) / (pi * torch.exp(s)).sum())
    u = (f @ g_hat.T / temperature).reshape(-1)
    lg = -torch.log(torch.exp(u) / torch.exp(u).sum()).mean()
    return float(la / len(y)), float(ca / len(y)), float(lg)


def test_losses_equal_the_hand_computation(tiny_clip: tuple) -> None:
    model = build("capt", tiny_clip[1], "cifar10", 10, **{"capt-n-ctx": 4, "capt-n-general": 2})
    x = torch.randn(5, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 3, 3, 9, 1])
    prior = np.arange(1, 11, dtype=np.float64)[::-1].copy()
    from fedlt_app.methods.vision_language.capt import log_prior_of

    got = capt_losses(model, x, y, log_prior_of(prior), 0.1, "token")
    expected = hand_losses(model, x, y, prior, 0.1)
    for g, e in zip(got, expected, strict=True):
        assert float(g.detach()) == pytest.approx(e, rel=1e-4, abs=1e-5)
    cfg = clip_config("capt", tiny_clip[1], dataset="cifar10", **{"capt-n-ctx": 4, "capt-n-general": 2,
                                                                  "capt-alpha": 0.5, "capt-beta": 2.0})
    client = CAPTClient(cfg, 10, {PRIOR_KEY: prior / prior.sum()})
    client.begin(model, torch.zeros(0, 3, IMAGE, IMAGE, dtype=torch.uint8), torch.zeros(0, dtype=torch.long),
                 torch.Generator())
    total = float(client.loss(model, x, y))
    assert total == pytest.approx(0.5 * expected[2] + 2.0 * expected[1] + expected[0], rel=1e-4)


def test_general_term_is_zero_for_one_sample_and_text_feature_space_differs(tiny_clip: tuple) -> None:
    """L_G's softmax runs over the batch: one sample, one token -> log 1 = 0 (the code's size-1 squeeze guarded)."""
    model = build("capt", tiny_clip[1], "cifar10", 10)
    x = torch.randn(1, 3, IMAGE, IMAGE)
    prior = torch.zeros(10)
    _, ca_token, lg = capt_losses(model, x, torch.tensor([2]), prior, 0.1, "token")
    _, ca_text, _ = capt_losses(model, x, torch.tensor([2]), prior, 0.1, "text-feature")
    assert float(lg) == 0.0
    assert float(ca_token) != pytest.approx(float(ca_text))


# ---------------------------------------------------------------- local training: mask, frozen-ness, travel


def train_two_classes(path: Path, mask: str) -> tuple[torch.nn.Module, dict, dict]:
    model = build("capt", path, "fmnist", 10)
    cfg = clip_config("capt", path, dataset="fmnist", **{"batch-size": 4, "local-lr": 0.05, "local-epochs": 2,
                                                         "precision": "fp32", "grad-clip": 0.0, "capt-mask": mask,
                                                         "capt-mab-reward": "off"})
    images = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1])
    before = {k: v.clone() for k, v in model.travelling_state().items()}
    frozen = {k: v.clone() for k, v in model.clip.state_dict().items()}
    train_locally(model, images, labels, CAPTClient(cfg, 10, {}), LocalTraining.from_config(cfg),
                  torch.Generator().manual_seed(0))
    return model, before, frozen


def test_fixed_mask_moves_only_the_batch_classes_rows_and_clip_stays_frozen(tiny_clip: tuple) -> None:
    """Momentum 0.9 and weight decay on, two epochs: rows 2..9 of a are bit-identical; g, F and rows 0, 1 move;
    every CLIP tensor is bit-identical; only g, a, F travel."""
    model, before, frozen = train_two_classes(tiny_clip[1], "fixed")
    after = model.travelling_state()
    assert torch.equal(after[KEYS[1]][2:], before[KEYS[1]][2:])
    assert all(not torch.equal(after[KEYS[1]][c], before[KEYS[1]][c]) for c in (0, 1))
    assert all(not torch.equal(after[k], before[k]) for k in (KEYS[0], KEYS[2], KEYS[3]))
    assert all(torch.equal(v, frozen[k]) for k, v in model.clip.state_dict().items())
    assert list(after) == KEYS
    from flwr.app import ArrayRecord, RecordDict

    prompt_floats = EMBED + 10 * 3 * EMBED + VISION_WIDTH * EMBED + VISION_WIDTH
    assert content_nbytes(RecordDict({"arrays": ArrayRecord(after)})) == 4 * prompt_floats


def test_code_mask_moves_every_row(tiny_clip: tuple) -> None:
    """The code masks after the step: weight decay (and nothing else) moves the absent classes' rows too."""
    model, before, _ = train_two_classes(tiny_clip[1], "code")
    after = model.travelling_state()[KEYS[1]]
    assert all(not torch.equal(after[c], before[KEYS[1]][c]) for c in range(10))


def test_client_reports_counts_and_hits_of_the_received_model(tiny_clip: tuple) -> None:
    model = build("capt", tiny_clip[1], "fmnist", 10)
    cfg = clip_config("capt", tiny_clip[1], dataset="fmnist")
    images = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    labels = torch.tensor([0, 0, 4, 4, 4, 9])
    client = CAPTClient(cfg, 10, {})
    client.begin(model, images, labels, torch.Generator())
    with torch.no_grad():
        guess = model(images.float() / 255).argmax(dim=1)
    report = client.report()
    assert report[COUNTS_KEY].tolist() == [2, 0, 0, 0, 3, 0, 0, 0, 0, 1]
    assert report[VAL_PREDICTED].tolist() == np.bincount(guess.numpy(), minlength=10).tolist()
    assert report[VAL_CORRECT].sum() == int((guess == labels).sum())
    off = CAPTClient(clip_config("capt", tiny_clip[1], **{"capt-share-histogram": False}), 10, {})
    off.begin(model, images, labels, torch.Generator())
    assert off.report() == {}


# ---------------------------------------------------------------- server arithmetic (numpy only)


def test_js_and_complementarity() -> None:
    p = np.array([[0.7, 0.2, 0.1, 0.0], [0.0, 0.1, 0.2, 0.7], [0.25, 0.25, 0.25, 0.25]])
    js = js_divergence(p)
    assert np.allclose(js, js.T) and np.allclose(np.diag(js), 0.0, atol=1e-9)
    m = (p[0] + p[2]) / 2
    kl = lambda a, b: float(np.sum(np.clip(a, 1e-10, None) * np.log(np.clip(a, 1e-10, None) / b)))  # noqa: E731
    assert js[0, 2] == pytest.approx(0.5 * kl(p[0], m) + 0.5 * kl(p[2], m))
    assert np.allclose(complementarity(p), 1.0 - p @ p.T)  # the head/tail split cancels (the code's formula)


def constructed_federation() -> np.ndarray:
    """Eight clients' class shares over 6 classes: four hold the head (0, 1, 2), four the tail (3, 4, 5)."""
    head = [[0.6, 0.3, 0.1, 0, 0, 0], [0.5, 0.4, 0.1, 0, 0, 0], [0.7, 0.2, 0.1, 0, 0, 0], [0.6, 0.2, 0.2, 0, 0, 0]]
    tail = [[0, 0, 0, 0.6, 0.3, 0.1], [0, 0, 0, 0.5, 0.4, 0.1], [0, 0, 0, 0.7, 0.2, 0.1], [0, 0, 0, 0.6, 0.2, 0.2]]
    return np.array(head + tail, dtype=np.float64)


def test_clustering_on_a_constructed_federation() -> None:
    """Similarity puts like with like; complementarity pairs head clients with tail clients; seeded."""
    p = constructed_federation()
    similar = similarity_clusters(p, 2, np.random.default_rng(0))
    assert len(set(similar[:4])) == 1 and len(set(similar[4:])) == 1 and similar[0] != similar[4]
    assert np.array_equal(similar, similarity_clusters(p, 2, np.random.default_rng(0)))
    complementary = complementarity_clusters(p, 4)
    for label in set(complementary):
        members = np.flatnonzero(complementary == label)
        assert (members < 4).any() and (members >= 4).any()  # every cluster covers head and tail


def test_kmeans_and_complete_linkage_on_hand_cases() -> None:
    points = np.array([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0], [10.0, 0.0]])
    labels = kmeans(points, 3, np.random.default_rng(1))
    assert labels[0] == labels[1] and labels[2] == labels[3] and len(set(labels)) == 3
    # complete linkage: {0,1} (d 1), then {2,3} (d 2); {0,1}+{2} would cost max(3, 9) = 9 > {2,3}'s 2
    d = np.array([[0, 1, 3, 9], [1, 0, 9, 9], [3, 9, 0, 2], [9, 9, 2, 0]], dtype=np.float64)
    assert complete_linkage(d, 2).tolist() == [0, 0, 1, 1]
    assert complete_linkage(d, 4).tolist() == [0, 1, 2, 3]


def test_per_class_rule_takes_qualifying_clients_and_falls_back() -> None:
    a = np.arange(3 * 3 * 1 * 2, dtype=np.float64).reshape(3, 3, 1, 2)  # (clients, classes, tokens, D)
    shares = np.array([[0.8, 0.2, 0.0], [0.5, 0.05, 0.45], [0.05, 0.05, 0.9]])
    previous = np.full((3, 1, 2), -1.0)
    out, qualified = per_class_aggregate(a, shares, 0.1, previous)
    assert np.allclose(out[0], (a[0, 0] + a[1, 0]) / 2)  # client 2 holds 5 % of class 0: left out
    assert np.allclose(out[1], a[0, 1])
    assert np.allclose(out[2], (a[1, 2] + a[2, 2]) / 2)
    _, none = per_class_aggregate(a, shares, 0.95, previous)
    assert none == 0 and qualified == 3
    assert np.allclose(per_class_aggregate(a, shares, 0.95, previous)[0], previous)


def test_bandit_formulas_and_reward() -> None:
    bandit = Bandit((1, 2, 3), epsilon=0.0)
    bandit.values[:] = [0.5, 0.2, 0.0]
    bandit.pulls[:] = [1, 1, 0]  # the unpulled arm's bonus dominates
    assert bandit.select(np.random.default_rng(0)) == 2
    bandit.update(2, 1.0, step=3)
    assert bandit.pulls[2] == 1 and bandit.values[2] == pytest.approx(0.1 * 0.95**3)
    assert Bandit((1, 2), epsilon=1.0).select(np.random.default_rng(0)) in (0, 1)
    correct, predicted, counts = np.array([3, 0, 1]), np.array([4, 1, 1]), np.array([4, 1, 2])
    # F1: class 0 2·3/(6+1+1) = 0.75; class 1: 0; class 2: 2/(2+0+1) = 2/3
    assert macro_f1(correct, predicted, counts) == pytest.approx((0.75 + 0 + 2 / 3) / 3)
    assert bandit_reward(0.5, 0.4, [0.1, 0.2]) == pytest.approx(0.6 * 0.5 + 0.3 * 0.4)
    assert bandit_reward(0.5, 0.4, [0.0, 0.1, 0.2, 0.3, 0.4]) == pytest.approx(0.42 + 0.1 * 0.5 / 5)


# ---------------------------------------------------------------- the server method on hand-built reports


def fake_model(num_classes: int = 6, tokens: int = 3, width: int = 2):
    state = {GENERAL: torch.zeros(1, width), CLASS_AWARE: torch.zeros(num_classes, tokens, width),
             "prompts.coupling.weight": torch.zeros(width, width), "prompts.coupling.bias": torch.zeros(width)}
    return SimpleNamespace(num_classes=num_classes, travelling_state=lambda: state,
                           parameters=lambda: iter([torch.zeros(1)]))


class NoTestLabels:
    """A federation whose test split cannot be read: the bandit must never need it."""

    def __getattr__(self, name: str):
        raise AssertionError(f"CAPT's server read data.{name}")


def reports_for(p: np.ndarray, seed: int, hits: bool = True) -> list[ClientReport]:
    rng = np.random.default_rng(seed)
    reports = []
    for k, shares in enumerate(p):
        counts = np.round(shares * 20).astype(np.int64)
        payload = {COUNTS_KEY: counts}
        if hits:
            payload[VAL_CORRECT] = counts // 2
            payload[VAL_PREDICTED] = counts
        model = {GENERAL: rng.normal(size=(1, 2)).astype(np.float32),
                 CLASS_AWARE: rng.normal(size=(6, 3, 2)).astype(np.float32),
                 "prompts.coupling.weight": rng.normal(size=(2, 2)).astype(np.float32),
                 "prompts.coupling.bias": rng.normal(size=2).astype(np.float32)}
        reports.append(ClientReport(k, int(counts.sum()) + k, payload, model))
    return reports


def capt_server(**keys: object) -> CAPTServer:
    cfg = resolve({"method": "capt", "clip-weights": "/tiny.pt", "precision": "fp32", **keys})
    return CAPTServer(cfg, fake_model(), NoTestLabels())


def test_server_aggregates_per_class_and_resets_every_node() -> None:
    p = constructed_federation()
    server = capt_server(**{"capt-mab-arms": "1", "capt-sim-clusters": 2, "capt-comp-clusters": 4})
    reports = reports_for(p, 0)
    server.absorb(1, reports)
    shares = np.stack([r.payload[COUNTS_KEY] / r.payload[COUNTS_KEY].sum() for r in reports])
    similar = similarity_clusters(shares, 2, np.random.default_rng([0, 1, 0x63617074]))
    a = np.stack([r.model[CLASS_AWARE] for r in reports]).astype(np.float64)
    clustered_a = np.stack([a[similar == similar[k]].mean(axis=0) for k in range(8)])
    expected_a, _ = per_class_aggregate(clustered_a, shares, 0.1, np.zeros((6, 3, 2)))
    glob = server.global_model_overrides(1)
    np.testing.assert_allclose(glob[CLASS_AWARE], expected_a, rtol=1e-6)
    complementary = complementarity_clusters(shares, 4)
    g = np.stack([r.model[GENERAL] for r in reports]).astype(np.float64)
    clustered_g = np.stack([g[complementary == complementary[k]].mean(axis=0) for k in range(8)])
    n = np.array([r.num_examples for r in reports], dtype=np.float64)
    np.testing.assert_allclose(glob[GENERAL], (n[:, None, None] * clustered_g).sum(0) / n.sum(), rtol=1e-6)
    weight = np.stack([r.model["prompts.coupling.weight"] for r in reports]).astype(np.float64)
    np.testing.assert_allclose(glob["prompts.coupling.weight"], (n[:, None, None] * weight).sum(0) / n.sum(),
                               rtol=1e-5)
    assert all(server.client_model_overrides(2, k) == {} for k in range(8))
    assert server.round_metrics()["capt_global_aggregation"] == 1
    assert server.broadcast(2, None)[PRIOR_KEY] == pytest.approx(
        np.sum([r.payload[COUNTS_KEY] for r in reports], axis=0) / sum(r.payload[COUNTS_KEY].sum() for r in reports))


def test_server_delivers_cluster_prompts_between_aggregations() -> None:
    p = constructed_federation()
    server = capt_server(**{"capt-mab-arms": "2", "capt-sim-clusters": 2, "capt-comp-clusters": 4})
    server.absorb(1, reports_for(p, 0))  # round 1: (1 − 1) % 2 == 0, aggregates
    glob = server.global_model_overrides(1)
    reports = reports_for(p, 1)
    server.absorb(2, reports)  # round 2: no aggregation, the cluster prompts become each member's start
    assert server.round_metrics()["capt_global_aggregation"] == 0
    assert all(np.array_equal(v, server.global_model_overrides(2)[k]) for k, v in glob.items())
    starts = [server.client_model_overrides(3, k) for k in range(8)]
    similar = server.round_metrics()["capt_similarity_clusters"]
    assert similar == 2
    assert np.allclose(starts[0][CLASS_AWARE], np.mean([r.model[CLASS_AWARE] for r in reports[:4]], axis=0))
    assert not np.allclose(starts[0][CLASS_AWARE], starts[4][CLASS_AWARE])
    assert np.array_equal(starts[3]["prompts.coupling.bias"], reports[3].model["prompts.coupling.bias"])
    own = capt_server(**{"capt-mab-arms": "2", "capt-deliver-clusters": False})
    own.absorb(1, reports_for(p, 0))
    own.absorb(2, reports)
    assert np.array_equal(own.client_model_overrides(3, 5)[CLASS_AWARE], reports[5].model[CLASS_AWARE])


def test_bandit_reward_comes_from_the_clients_hits_not_test_labels() -> None:
    """The server never touches the federation (NoTestLabels raises); the reward is the formula on the sums
    of the clients' reported hits, and it updates the arm drawn the round before."""
    p = constructed_federation()
    server = capt_server(**{"capt-mab-epsilon": 0.0})
    server.absorb(1, reports_for(p, 0))
    arm, step = server.pending
    assert step == 0 and server.round_metrics()["capt_val_accuracy"] > 0
    reports = reports_for(p, 1)
    server.absorb(2, reports)
    counts = np.sum([r.payload[COUNTS_KEY] for r in reports], axis=0)
    correct = counts // 2
    accuracy = correct.sum() / counts.sum()
    expected = 0.6 * accuracy + 0.3 * macro_f1(correct, counts, counts)
    assert server.round_metrics()["capt_reward"] == pytest.approx(expected)
    assert server.bandit.pulls[arm] == 1 and server.bandit.values[arm] == pytest.approx(0.1 * expected)
    state = server.state_dict()
    again = capt_server(**{"capt-mab-epsilon": 0.0})
    again.load_state_dict(state)
    assert again.pending == server.pending and np.array_equal(again.bandit.values, server.bandit.values)


def test_without_histograms_the_server_averages_everything() -> None:
    server = capt_server(**{"capt-share-histogram": False})
    replies = reports_for(constructed_federation(), 2)
    reports = [ClientReport(k, r.num_examples, {}, r.model) for k, r in enumerate(replies)]
    server.absorb(1, reports)
    n = np.array([r.num_examples for r in reports], dtype=np.float64)
    a = np.stack([r.model[CLASS_AWARE] for r in reports]).astype(np.float64)
    np.testing.assert_allclose(server.global_model_overrides(1)[CLASS_AWARE],
                               np.tensordot(n / n.sum(), a, axes=1), rtol=1e-5)
    assert server.broadcast(2, None) == {}


def test_personalised_message_changes_only_its_own_copy(task_identity) -> None:
    """Flower's FedAvg hands every message one shared RecordDict: an override must copy, never write through."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

    from fedlt_app.strategy import personalised_message

    shared = RecordDict({"arrays": ArrayRecord({"a": Array(np.zeros(3, np.float32)),
                                                "b": Array(np.ones(2, np.float32))}),
                         "config": ConfigRecord({"server-round": 2})})
    first, second = (Message(content=shared, dst_node_id=node, message_type="train") for node in (11, 12))
    changed = personalised_message(first, {"a": np.array([1.0, 2.0, 3.0])})
    assert changed.metadata.dst_node_id == 11 and changed.content["config"]["server-round"] == 2
    assert changed.content["arrays"]["a"].numpy().tolist() == [1.0, 2.0, 3.0]
    assert changed.content["arrays"]["a"].numpy().dtype == np.float32
    assert np.array_equal(changed.content["arrays"]["b"].numpy(), np.ones(2))
    assert second.content["arrays"]["a"].numpy().tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(KeyError, match="client_model_overrides"):
        personalised_message(first, {"c": np.zeros(1)})


# ---------------------------------------------------------------- config


def test_config_fails_fast_naming_the_key() -> None:
    base = {"method": "capt", "clip-weights": "/x.pt"}
    with pytest.raises(ConfigError, match="capt-n-general"):
        resolve({**base, "capt-n-ctx": 2, "capt-n-general": 2})
    with pytest.raises(ConfigError, match="capt-mab-arms"):
        resolve({**base, "capt-mab-arms": "1,0"})
    with pytest.raises(ConfigError, match="capt-mask"):
        resolve({**base, "capt-mask": "after"})
    with pytest.raises(ConfigError, match="server-opt"):
        resolve({**base, "server-opt": "fedadam"})
    with pytest.raises(ConfigError, match="secure-aggregation"):
        resolve({**base, "secure-aggregation": "secagg"})
    with pytest.raises(ConfigError, match="clip-weights"):
        resolve({"method": "capt"})
    for preset in ("capt-cifar10-lt", "capt-cifar100-lt", "capt-fmnist-lt", "capt-cifar10-lt-a005"):
        cfg = resolve({**base, "preset": preset})
        assert cfg.method == "capt" and cfg.batch_size == 16 and cfg.local_lr == 0.001


# ---------------------------------------------------------------- end to end through the real apps (in process)


def test_capt_end_to_end_sends_only_prompts_and_alternates_aggregation(
    tiny_clip: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """4 clients, 3 rounds, aggregation every 2nd round (round 2 delivers per-node cluster prompts)."""
    code = run_in_process(tmp_path, monkeypatch,
                          f"method='capt' clip-weights='{tiny_clip[1]}' num-server-rounds=3 samples-per-class=8 "
                          f"imbalance-ratio=2.0 local-lr=0.01 batch-size=16 grad-clip=0.0 capt-mab-arms='2' "
                          f"capt-sim-clusters=2 capt-comp-clusters=2 output-dir='{tmp_path / 'out'}' run-name='capt'",
                          num_clients=4)
    assert code == 0
    rows = metrics_rows(tmp_path / "out" / "capt")
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert [r["capt_global_aggregation"] for r in rows] == [1, 0, 1]
    prompt_bytes = 4 * (EMBED + 10 * 3 * EMBED + VISION_WIDTH * EMBED + VISION_WIDTH)  # float32, nothing of CLIP
    report_bytes = 3 * 10 * 8  # counts, hits, predictions: int64 per class
    prior_bytes = 10 * 8  # the global prior, float64, from round 2 on
    for row in rows:
        assert row["clients"] == [0, 1, 2, 3] and row["failed_clients"] == []
        assert row["bytes_up"] == 4 * (prompt_bytes + report_bytes)
        assert row["bytes_down"] == 4 * (prompt_bytes + (prior_bytes if row["round"] > 1 else 0))
        assert np.isfinite(row["train_loss"]) and 0.0 <= row["accuracy"] <= 1.0
        assert 0.0 <= row["capt_val_accuracy"] <= 1.0
    assert "capt_reward" in rows[1] and "capt_classes_aggregated" in rows[2]
