"""Labeled-ratio cycles and the labeling budget, as FairFAL's code computes them.

* The labeled ratio starts at ``query_ratio`` and grows by ``query_ratio`` per
  cycle while ``round(ratio, 2) <= end_ratio`` (main.py l.179): the rounding
  keeps 0.05 + ... + 0.05 = 0.45000000000000007 inside 0.45, so the defaults
  (0.05 up to 0.45) give 9 cycles, one random initial labeling and 8 queries.
* ``n_query = round(N_train, -2) * query_ratio`` labels per cycle for the whole
  federation, ``int(n_query / K)`` per client (main.py l.99-100,
  query_strategies/__init__.py l.37, l.108); the initial random set has the
  same size, since the first cycle's ratio is ``query_ratio``.

Python's ``round`` on an int rounds half to even (``round(17050, -2) == 17000``),
as in the authors' code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass


def cycle_ratios(query_ratio: float, end_ratio: float) -> list[float]:
    """The labeled ratio of every cycle, accumulated as the authors' loop does."""
    if not 0.0 < query_ratio <= 1.0:
        raise ValueError(f"al-query-ratio: must be in (0, 1], got {query_ratio!r}")
    ratios: list[float] = []
    current = query_ratio
    while round(current, 2) <= end_ratio:
        ratios.append(current)
        current += query_ratio
    return ratios


@dataclass(frozen=True)
class BudgetPlan:
    """How many labels each client gets, and when."""

    n_train: int  # size of the whole (long-tailed) training pool
    num_clients: int
    n_query: float  # labels per cycle for the whole federation (a float, as in the code)
    per_client: int  # labels each client queries per cycle
    ratios: tuple[float, ...]  # nominal labeled ratio of each cycle

    @property
    def initial(self) -> int:
        """Each client's random initial labeled set: ``int(n_data / K)`` with n_data = n_query."""
        return self.per_client

    @property
    def num_cycles(self) -> int:
        return len(self.ratios)

    def labeled_after(self, cycle: int) -> int:
        """Labeled samples per client once cycle ``cycle`` (0-based) has its labels."""
        return self.initial + cycle * self.per_client

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "ratios": list(self.ratios), "initial": self.initial, "num_cycles": self.num_cycles}


def budget_plan(n_train: int, num_clients: int, query_ratio: float, end_ratio: float) -> BudgetPlan:
    """The budget arithmetic of FairFAL's main.py for N_train samples and K clients."""
    if num_clients < 1:
        raise ValueError(f"num-partitions: need at least one client, got {num_clients}")
    ratios = cycle_ratios(query_ratio, end_ratio)
    if not ratios:
        raise ValueError(
            f"al-end-ratio: {end_ratio} is below the first labeled ratio {query_ratio}; no cycle would run"
        )
    n_query = round(int(n_train), -2) * query_ratio
    per_client = int(n_query / num_clients)
    if per_client < 1:
        raise ValueError(
            f"al-query-ratio: round({n_train}, -2) * {query_ratio} = {n_query:g} labels per cycle is less than "
            f"one per client for {num_clients} clients; use more data, a larger ratio or fewer clients"
        )
    return BudgetPlan(int(n_train), int(num_clients), n_query, per_client, tuple(ratios))


def capacity_problems(client_sizes: Sequence[int], plan: BudgetPlan) -> list[str]:
    """Clients whose partition cannot supply every cycle's labels (empty: all can)."""
    needed = plan.labeled_after(plan.num_cycles - 1)
    return [
        f"client {k} holds {size} samples but needs {needed} labeled by the last cycle"
        for k, size in enumerate(client_sizes)
        if size < needed
    ]
