"""FairFAL's budget arithmetic and labeled-ratio cycles (fedlt_app/active/budget.py)."""

from __future__ import annotations

import pytest

from fedlt_app.active.budget import budget_plan, capacity_problems, cycle_ratios
from fedlt_app.data import longtail_counts


@pytest.mark.parametrize(
    ("per_class", "num_classes", "n_train", "per_client"),
    [
        (5000, 10, 17_023, 85),  # CIFAR-10-LT
        (500, 100, 15_907, 79),  # CIFAR-100-LT
        (6000, 10, 20_428, 102),  # FMNIST-LT
    ],
)
def test_the_notes_table_at_imbalance_ratio_20(per_class: int, num_classes: int, n_train: int, per_client: int) -> None:
    counts = longtail_counts([per_class] * num_classes, "exp", 20.0)
    assert sum(counts) == n_train  # fedlt's long-tail cut gives the code's N_train
    plan = budget_plan(n_train, 10, 0.05, 0.45)
    assert plan.per_client == per_client
    assert plan.initial == per_client  # the first cycle's random set has the same size
    assert plan.num_cycles == 9


def test_cifar10_budget_step_by_step() -> None:
    plan = budget_plan(17_023, 10, 0.05, 0.45)
    assert plan.n_query == pytest.approx(850.0)  # round(17023, -2) = 17000, times 0.05
    assert [plan.labeled_after(c) for c in range(9)] == [85 * (c + 1) for c in range(9)]


def test_float_accumulation_at_the_end_ratio() -> None:
    ratios = cycle_ratios(0.05, 0.45)
    assert len(ratios) == 9
    assert ratios[-1] == pytest.approx(0.45)
    assert ratios[-1] != 0.45  # accumulated, not recomputed: 0.44999999999999996
    assert round(ratios[-1] + 0.05, 2) > 0.45  # the tenth (0.4999...) stays out


@pytest.mark.parametrize(("query", "end", "cycles"), [(0.05, 0.15, 3), (0.1, 0.3, 3)])
def test_rounding_keeps_a_last_cycle_that_overshoots_by_float_error(query: float, end: float, cycles: int) -> None:
    ratios = cycle_ratios(query, end)
    assert len(ratios) == cycles
    assert ratios[-1] > end  # 0.15000000000000002, 0.30000000000000004: a plain `<=` would drop it
    naive, current = 0, query
    while current <= end:
        naive += 1
        current += query
    assert naive == cycles - 1


def test_three_small_cycles() -> None:
    assert [round(r, 2) for r in cycle_ratios(0.05, 0.15)] == [0.05, 0.1, 0.15]


def test_client_count_that_does_not_divide_the_query() -> None:
    plan = budget_plan(17_023, 3, 0.05, 0.45)
    assert plan.n_query == pytest.approx(850.0)
    assert plan.per_client == 283  # int(850 / 3); the remainder is never labeled
    assert plan.per_client * 3 < plan.n_query


def test_rounding_to_hundreds_is_python_round_half_even() -> None:
    assert budget_plan(17_050, 10, 0.05, 0.45).per_client == 85  # round(17050, -2) == 17000
    assert budget_plan(17_150, 10, 0.05, 0.45).per_client == 86  # round(17150, -2) == 17200


def test_a_budget_below_one_label_per_client_is_refused() -> None:
    with pytest.raises(ValueError, match="al-query-ratio"):
        budget_plan(140, 10, 0.05, 0.45)  # round(140, -2) * 0.05 = 5 labels for 10 clients


def test_an_end_ratio_below_the_first_cycle_is_refused() -> None:
    with pytest.raises(ValueError, match="al-end-ratio"):
        budget_plan(17_023, 10, 0.05, 0.04)


def test_capacity_names_the_clients_too_small_for_the_last_cycle() -> None:
    plan = budget_plan(17_023, 10, 0.05, 0.45)  # 765 labeled per client by the end
    assert capacity_problems([765] * 10, plan) == []
    problems = capacity_problems([2000, 764, 2000], plan)
    assert len(problems) == 1 and problems[0].startswith("client 1")
