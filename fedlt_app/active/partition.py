"""FairFAL's ``dir_balance`` split: Dirichlet label mixes, equal client sizes.

From util/data_simulator.py (l.52-220) of the authors' code:

1. one Dirichlet(β·1_C) row of class proportions per client;
2. five alternating row and column normalisations (Sinkhorn-like), so each
   column says how class c is shared among the clients;
3. each class split across the clients in proportion to its column, by
   largest-remainder rounding (column sums are the class totals);
4. samples moved greedily, class by class, from clients above their quota to
   clients below it until every client holds ⌊N/K⌋ samples, the first
   ``N mod K`` clients one more.

So the quantity is balanced and only the label mix differs. Unlike the code,
which hard-seeds numpy, python and torch to 0, the split here is a pure
function of ``seed`` (the run seed) and touches no global RNG.
"""

from __future__ import annotations

import numpy as np

from fedlt_app.data.partition import sample_dirichlet

SINKHORN_ITERATIONS = 5
_EPS = 1e-12


def dir_balance_counts(class_totals: np.ndarray, num_clients: int, beta: float, rng: np.random.Generator) -> np.ndarray:
    """The K×C matrix of how many samples of class c client k gets."""
    totals = np.asarray(class_totals, dtype=np.int64)
    num_classes = totals.size
    shares = np.stack([sample_dirichlet(np.full(num_classes, float(beta)), rng) for _ in range(num_clients)])
    for _ in range(SINKHORN_ITERATIONS):
        shares = shares / (shares.sum(axis=1, keepdims=True) + _EPS)
        shares = shares / (shares.sum(axis=0, keepdims=True) + _EPS)

    counts = np.zeros((num_clients, num_classes), dtype=np.int64)
    for c in range(num_classes):
        if totals[c] == 0:
            continue
        column = np.clip(shares[:, c], 0.0, None)
        column = column / column.sum() if column.sum() > 0 else np.full(num_clients, 1.0 / num_clients)
        real = column * totals[c]
        base = np.floor(real).astype(np.int64)
        remainder = int(totals[c] - base.sum())
        order = np.argsort(-(real - base), kind="stable")
        base[order[:remainder]] += 1
        counts[:, c] = base

    quota = np.full(num_clients, totals.sum() // num_clients, dtype=np.int64)
    quota[: totals.sum() % num_clients] += 1
    _level(counts, quota)
    return counts


def _level(counts: np.ndarray, quota: np.ndarray) -> None:
    """Move samples from clients above their quota to clients below it (in place).

    Class by class: the clients above quota that hold class c give to the
    neediest clients, largest supply first. Every pass moves at least one
    sample while a client is off quota (one above quota always holds some
    class), so the loop ends with every row at its quota.
    """
    deficit = quota - counts.sum(axis=1)  # > 0: needs samples; < 0: has too many
    while np.any(deficit != 0):
        moved = False
        for c in range(counts.shape[1]):
            receivers = [k for k in np.argsort(-deficit, kind="stable") if deficit[k] > 0]
            supply = {int(k): int(min(counts[k, c], -deficit[k])) for k in np.flatnonzero(deficit < 0)}
            supply = {k: s for k, s in supply.items() if s > 0}
            if not receivers or not supply:
                continue
            for receiver in receivers:
                for donor in sorted(supply, key=lambda k: -supply[k]):
                    take = min(supply[donor], int(deficit[receiver]))
                    if take <= 0:
                        continue
                    counts[donor, c] -= take
                    counts[receiver, c] += take
                    supply[donor] -= take
                    deficit[donor] += take
                    deficit[receiver] -= take
                    moved = True
                    if deficit[receiver] == 0:
                        break
        if not moved:  # unreachable while the sums agree; a guard against an endless loop
            raise RuntimeError("dir-balance: could not level the client sizes")


def dir_balance(labels: np.ndarray, num_clients: int, beta: float, seed: int) -> list[np.ndarray]:
    """Positions into ``labels`` for each client (sorted), a pure function of the arguments."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(int(seed))
    num_classes = int(labels.max()) + 1 if labels.size else 0
    totals = np.bincount(labels, minlength=num_classes)
    counts = dir_balance_counts(totals, num_clients, beta, rng)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in range(num_classes):
        members = rng.permutation(np.flatnonzero(labels == c))
        bounds = np.concatenate([[0], np.cumsum(counts[:, c])])
        for k in range(num_clients):
            parts[k].append(members[bounds[k] : bounds[k + 1]])
    return [np.sort(np.concatenate(p)).astype(np.int64) if p else np.empty(0, np.int64) for p in parts]
