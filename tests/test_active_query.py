"""FairFAL's query math on hand-computed and constructed cases (fedlt_app/active/query.py, kcenter.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from fedlt_app.active import query as q
from fedlt_app.active.kcenter import kcenter_greedy, pairwise_distances

# ------------------------------------------------------------- d_k and r_k


def test_divergence_and_indicator_by_hand() -> None:
    g = np.array([0.5, 0.3, 0.2, 0.0])
    l = np.array([0.7, 0.3, 0.0, 0.0])  # noqa: E741
    # |0.5-0.7|/1.2 = 1/6, 0, |0.2-0|/0.2 = 1, and a class both give 0 mass adds 0: (1/6 + 1) / 4
    assert q.divergence(g, l) == pytest.approx(7 / 24)
    assert q.imbalance_indicator(g, [0, 1, 2]) == pytest.approx(0.2 / 0.5)
    assert q.divergence(g, g) == 0.0


def test_the_codes_half_form_is_the_same_divergence() -> None:
    rng = np.random.default_rng(0)
    g, l = rng.dirichlet(np.ones(10)), rng.dirichlet(np.ones(10))  # noqa: E741
    code = 0.5 * (np.abs(g - l) / (0.5 * g + 0.5 * l)).mean()  # fairfal_sampling.py l.64
    assert q.divergence(g, l) == pytest.approx(code)
    assert 0.0 <= q.divergence(g, l) < 1.0


def test_absent_classes_raise_d_but_not_r() -> None:
    g = np.array([0.4, 0.3, 0.2, 0.1])
    # the local model puts (almost) nothing on the classes it never saw (2 and 3)
    l = np.array([0.6, 0.4 - 2e-6, 1e-6, 1e-6])  # noqa: E741
    d_missing = q.divergence(g, l)
    assert d_missing > 0.5  # classes 2 and 3 add close to 1 each (out of 4)
    assert q.divergence(g, np.array([0.45, 0.3, 0.15, 0.1])) < d_missing
    # r only looks at the labeled classes: the absent ones do not matter
    assert q.imbalance_indicator(g, [0, 1]) == pytest.approx(0.3 / 0.4)
    g_other_tail = np.array([0.4, 0.3, 0.0001, 0.2999])
    assert q.imbalance_indicator(g_other_tail, [0, 1]) == q.imbalance_indicator(g, [0, 1])


def test_balanced_resample_gives_equal_class_counts() -> None:
    labels = np.array([0] * 7 + [2] * 3 + [5] * 1)
    balanced = q.balanced_indices(labels)
    counts = np.bincount(labels[balanced], minlength=6)
    assert counts.tolist() == [7, 0, 7, 0, 0, 7]
    for cls in (0, 2, 5):  # every sample of every class is in it
        assert set(np.flatnonzero(labels == cls)) <= set(balanced.tolist())
    assert np.array_equal(balanced, q.balanced_indices(labels))  # the fixed seed 42


def test_statistics_of_a_balanced_mean() -> None:
    logits = torch.log(torch.tensor([[0.9, 0.1], [0.2, 0.8]]))
    balanced = np.array([0, 0, 1, 1, 1, 1])  # class 0 once oversampled, class 1 twice
    mean = q.balanced_mean_probabilities(logits, balanced)
    assert mean == pytest.approx([(0.9 * 2 + 0.2 * 4) / 6, (0.1 * 2 + 0.8 * 4) / 6], abs=1e-6)


# ----------------------------------------------------------- the model rule


@pytest.mark.parametrize(
    ("d", "r_bar", "uncertainty_global", "gradient_global"),
    [
        (0.1, 0.2, True, True),  # score 0.85 > 0.75: global; r̄ < 0.5: global
        (0.25, 0.25, False, True),  # d + r̄ = 0.5: score exactly 0.75, not above: local
        (0.2, 0.25, True, True),  # score 0.775
        (0.3, 0.25, False, True),  # score 0.725
        (0.0, 0.5, False, False),  # r̄ = 0.5 is not below 0.5: local for the gradient model too
        (0.0, 0.49, True, True),  # score 0.755
        (0.0, 0.51, False, False),
        (0.9, 0.05, False, True),  # a client far from the global mix keeps its local model
    ],
)
def test_model_choice_on_both_sides_of_each_threshold(
    d: float, r_bar: float, uncertainty_global: bool, gradient_global: bool
) -> None:
    assert q.choose_models(d, r_bar) == q.QueryModels(uncertainty_global, gradient_global)


@pytest.mark.parametrize(
    ("d", "r_bar", "t", "expected"),
    [
        (0.3, 0.4, 0.5, 1 - 0.35),
        (0.3, 0.4, 0.2, 1 - 0.8 * 0.7 + 0.6 * 0.12),
        (0.3, 0.4, 1.0, 1 - 0.12),  # t = 1: 1 − d·r̄
        (0.3, 0.4, 0.0, 1 - 0.7 + 0.12),  # t = 0: 1 − (d + r̄) + d·r̄ = (1 − d)(1 − r̄)
    ],
)
def test_general_t_score(d: float, r_bar: float, t: float, expected: float) -> None:
    assert q.query_score(d, r_bar, t) == pytest.approx(expected)


def test_thresholds_are_parameters() -> None:
    assert q.choose_models(0.25, 0.25, global_threshold=0.7).uncertainty_global
    assert not q.choose_models(0.0, 0.4, gradient_threshold=0.4).gradient_global


class _StubFederation:
    """Replies of query.fairfal_stats / query.al_select for the driver's query step."""

    def __init__(self, r: list[float], d: list[float]) -> None:
        self.r, self.d, self.bytes_down = r, d, 0
        self.asked: list[tuple[str, object]] = []

    def ask(self, action: str, content):  # type: ignore[no-untyped-def]
        self.asked.append((action, content))
        if action == "fairfal_stats":
            return {k: {"r": r, "d": d} for k, (r, d) in enumerate(zip(self.r, self.d, strict=True))}
        return {k: {"num-labeled": 10, "num-queried": 5, "selection-digest": k} for k in range(len(self.r))}


@pytest.mark.parametrize("freeze", [True, False])
def test_r_bar_is_frozen_after_the_first_query_when_asked(freeze: bool) -> None:
    from flwr.app import ArrayRecord

    from fedlt_app.active.budget import budget_plan
    from fedlt_app.active.driver import _query
    from fedlt_app.config import resolve

    cfg = resolve({"al-method": "fairfal", "fairfal-freeze-global-ratio": freeze})
    plan = budget_plan(1000, 2, 0.05, 0.45)
    first = _StubFederation(r=[0.2, 0.4], d=[0.1, 0.6])
    record, r_bar, _ = _query(first, cfg, plan, 1, ArrayRecord(), None)  # type: ignore[arg-type]
    assert r_bar == pytest.approx(0.3)
    assert record["fairfal_global_uncertainty_clients"] == [0]  # 1 − (0.1+0.3)/2 = 0.8 > 0.75; client 1: 0.55
    assert record["fairfal_global_gradient_model"] is True
    config = first.asked[1][1]["config"]
    assert first.asked[1][0] == "al_select" and config["r-bar"] == pytest.approx(0.3) and config["budget"] == 25
    later = _StubFederation(r=[0.8, 0.9], d=[0.1, 0.6])
    _, r_bar, _ = _query(later, cfg, plan, 2, ArrayRecord(), r_bar)  # type: ignore[arg-type]
    assert r_bar == pytest.approx(0.3 if freeze else 0.85)


# ------------------------------------------------------------ pseudo-labels


def _directions(dim: int, axis: int, count: int, noise: float, rng: np.random.Generator) -> torch.Tensor:
    base = np.zeros(dim)
    base[axis] = 1.0
    return torch.tensor(base + noise * rng.standard_normal((count, dim)), dtype=torch.float32)


def test_prototype_pseudo_labels_recover_three_orthogonal_classes() -> None:
    rng = np.random.default_rng(0)
    labeled = torch.cat([_directions(4, axis, 5, 0.05, rng) for axis in range(3)]) * 3.0  # norms do not matter
    labels = torch.arange(3).repeat_interleave(5)
    prototypes, counts = q.class_prototypes(labeled, labels, num_classes=4)
    assert counts.tolist() == [5, 5, 5, 0]
    unlabeled = torch.cat([_directions(4, axis, 10, 0.2, rng) for axis in range(3)])
    pseudo, probs = q.prototype_pseudo_labels(unlabeled, prototypes, counts)
    assert pseudo.tolist() == torch.arange(3).repeat_interleave(10).tolist()
    assert torch.allclose(probs.sum(dim=1), torch.ones(30))


def test_a_class_without_labeled_samples_is_never_predicted() -> None:
    rng = np.random.default_rng(1)
    labeled = torch.cat([_directions(4, axis, 5, 0.05, rng) for axis in range(3)])
    prototypes, counts = q.class_prototypes(labeled, torch.arange(3).repeat_interleave(5), num_classes=4)
    on_the_missing_axis = _directions(4, 3, 20, 0.01, rng)  # exactly what class 3 would look like
    pseudo, probs = q.prototype_pseudo_labels(on_the_missing_axis, prototypes, counts)
    assert (pseudo != 3).all()
    assert (probs[:, 3] == 0).all()


def test_pseudo_labels_do_not_depend_on_the_temperature() -> None:
    rng = np.random.default_rng(2)
    labeled = torch.tensor(rng.standard_normal((30, 8)), dtype=torch.float32)
    labels = torch.tensor(rng.integers(0, 5, 30))
    prototypes, counts = q.class_prototypes(labeled, labels, num_classes=6)
    unlabeled = torch.tensor(rng.standard_normal((50, 8)), dtype=torch.float32)
    reference = q.prototype_pseudo_labels(unlabeled, prototypes, counts, temperature=1.5)[0]
    for temperature in (0.01, 1.0, 100.0):
        assert torch.equal(q.prototype_pseudo_labels(unlabeled, prototypes, counts, temperature)[0], reference)


# ------------------------------------------------------ gradient embeddings


def test_gradient_embeddings_equal_autograd_of_the_last_layer() -> None:
    torch.manual_seed(0)
    num, dim, classes = 6, 5, 4
    features = torch.randn(num, dim)
    head = torch.nn.Linear(dim, classes)
    targets = torch.tensor([0, 3, 1, 1, 2, 0])
    probs = torch.softmax(head(features), dim=1).detach()
    embeddings = q.gradient_embeddings(features, probs, targets)
    assert embeddings.shape == (num, classes * dim) and embeddings.dtype == torch.float32
    for i in range(num):
        head.zero_grad()
        F.cross_entropy(head(features[i : i + 1]), targets[i : i + 1]).backward()
        # block c of the embedding is −∂CE/∂W_c
        assert torch.allclose(embeddings[i].view(classes, dim), -head.weight.grad, atol=1e-6)


def test_the_query_embeds_labeled_samples_with_true_labels_and_unlabeled_with_the_models_argmax(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fedlt_app.active.pool import ClientPool
    from fedlt_app.models import build_model

    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = q.gradient_embeddings

    def spy(features: torch.Tensor, probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        calls.append((probs, targets))
        return original(features, probs, targets)

    monkeypatch.setattr(q, "gradient_embeddings", spy)
    torch.manual_seed(0)
    images = torch.randint(0, 256, (60, 1, 28, 28), dtype=torch.uint8)
    labels = torch.arange(60) % 3
    pool = ClientPool(images, labels, np.arange(0, 60, 4))
    model = build_model("cnn", 3, 1, 28).eval()
    picks = q.fairfal_query(pool, model, model, d=0.0, r_bar=0.1, budget=6, settings=q.FairFALSettings(),
                            dataset="fmnist")
    assert len(picks) == 6
    _, anchor_targets = calls[0]
    assert torch.equal(anchor_targets, labels[torch.from_numpy(pool.labeled)])  # the true labels
    for probs, targets in calls[1:]:
        assert torch.equal(targets, probs.argmax(dim=1))  # the gradient model's own prediction


# ------------------------------------------------------------------ quotas


@pytest.mark.parametrize(
    ("sizes", "budget", "expected"),
    [
        ([5] * 10, 3, [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]),  # b < C: the remainder to the largest (ties: class order)
        ([2, 8, 5], 4, [1, 2, 1]),  # ⌊4/3⌋ each, +1 to the largest bucket
        ([10, 0, 3, 7], 12, [5, 0, 3, 4]),  # empty bucket: its 3 go round-robin to classes 0, 3, 0
        ([0, 0, 0], 5, [0, 0, 0]),  # nothing to label
        ([1, 2, 0], 10, [1, 2, 0]),  # fewer candidates than budget: everything
        ([1, 1, 50, 1], 20, [1, 1, 17, 1]),  # surplus piles onto the only class with room
        ([4, 4, 4, 4], 8, [2, 2, 2, 2]),
    ],
)
def test_class_quotas(sizes: list[int], budget: int, expected: list[int]) -> None:
    assert q.class_quotas(sizes, budget).tolist() == expected


def test_class_quotas_invariants_on_random_cases() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        classes = int(rng.integers(1, 12))
        sizes = rng.integers(0, 30, classes) * (rng.random(classes) < 0.7)
        budget = int(rng.integers(0, 80))
        quota = q.class_quotas(sizes, budget)
        assert quota.sum() == min(budget, sizes.sum())
        assert (quota <= sizes).all() and (quota >= 0).all()


def test_candidates_are_the_most_uncertain_members() -> None:
    scores = np.array([0.1, 0.9, 0.5, 0.7, 0.3, 0.8])
    members = np.array([0, 2, 3, 4])
    assert q.candidates(members, scores, quota=1, oversample=4.0).tolist() == [3, 2, 4, 0]
    assert q.candidates(members, scores, quota=1, oversample=2.0).tolist() == [3, 2]
    assert q.candidates(members, scores, quota=0, oversample=4.0).tolist() == [3]  # max(1, ...)


def test_entropy_is_normalised() -> None:
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]])
    assert q.normalised_entropy(probs).tolist() == pytest.approx([1.0, 0.0], abs=1e-6)


# ------------------------------------------------------------------ k-center


POINTS = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [-1.0, -1.0]])


def test_with_anchors_the_first_pick_is_the_point_farthest_from_them() -> None:
    anchors = np.array([[0.0, 0.0]])
    picks = kcenter_greedy(POINTS, 2, scores=np.array([9.0, 0.0, 0.0, 0.0]), anchors=anchors)
    # squared distances to the anchor: 1, 9, 4, 2 -> (3, 0); then min(4, 13) = 4 beats min(2, 17) and min(1, 4)
    assert picks.tolist() == [1, 2]


def test_without_anchors_the_first_pick_is_the_most_uncertain() -> None:
    picks = kcenter_greedy(POINTS, 2, scores=np.array([0.1, 0.2, 0.9, 0.3]), anchors=None)
    # first (0, 2); then the farthest from it: (3, 0) at 13 beats (-1, -1) at 10 and (1, 0) at 5
    assert picks.tolist() == [2, 1]
    empty_anchors = np.empty((0, 2))
    assert kcenter_greedy(POINTS, 2, scores=np.array([0.1, 0.2, 0.9, 0.3]), anchors=empty_anchors).tolist() == [2, 1]


def test_few_candidates_are_all_taken_and_picks_never_repeat() -> None:
    assert kcenter_greedy(POINTS, 4, scores=None).tolist() == [0, 1, 2, 3]
    assert kcenter_greedy(POINTS, 10, scores=None).tolist() == [0, 1, 2, 3]
    assert kcenter_greedy(POINTS, 0, scores=None).size == 0
    same = np.zeros((6, 3))  # all identical: distances are 0 everywhere
    picks = kcenter_greedy(same, 4, scores=np.arange(6.0), anchors=np.zeros((1, 3)))
    assert len(picks) == 4 and len(set(picks.tolist())) == 4
    rng = np.random.default_rng(0)
    cloud = rng.standard_normal((40, 5))
    picks = kcenter_greedy(cloud, 25, scores=rng.random(40), anchors=rng.standard_normal((3, 5)))
    assert len(set(picks.tolist())) == 25


def test_distance_is_squared_euclidean_or_cosine() -> None:
    a = np.array([[3.0, 4.0]])
    b = np.array([[0.0, 0.0], [6.0, 8.0]])
    assert pairwise_distances(a, b).tolist() == [[25.0, 25.0]]
    assert pairwise_distances(a, b[1:], "cosine")[0, 0] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="fairfal-distance"):
        pairwise_distances(a, b, "manhattan")
