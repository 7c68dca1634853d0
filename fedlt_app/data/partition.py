"""Split the long-tailed training set over the federation's clients.

"dirichlet" is the scheme the authors' code uses (label skew without quantity
skew); "dirichlet-per-class" is the classic per-class Dirichlet split, taken
from flwr-datasets so that it is the community's implementation and not ours.
"dir-balance" is FairFAL's split: Dirichlet label mixes with equal client sizes.
"writers" (FEMNIST) keeps the data's natural clients: see :func:`partition_writers`.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

PARTITIONS = ("dirichlet", "dirichlet-per-class", "iid", "dir-balance")  # label-based, for :func:`partition_indices`
WRITER_PARTITION = "writers"  # natural clients, for :func:`partition_writers`


def partition_indices(labels: np.ndarray, scheme: str, num_clients: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Positions into ``labels`` for each client; every sample goes to exactly one.

    The result depends only on the arguments (no global RNG state), so every
    process computes the same split for the same seed. Each client's positions
    are sorted: order carries no information, and the loaders shuffle anyway.
    """
    labels = _validate(labels, scheme, num_clients, alpha)
    if scheme == "iid":
        parts = _iid(labels.size, num_clients, np.random.default_rng(seed))
    elif scheme == "dirichlet":
        parts = _quota_dirichlet(labels, num_clients, float(alpha), np.random.default_rng(seed))
    elif scheme == "dir-balance":  # FairFAL's class-mix split with equal client sizes
        parts = dir_balance(labels, num_clients, float(alpha), seed)
    else:
        parts = _per_class_dirichlet(labels, num_clients, float(alpha), seed)
    return [np.sort(part.astype(np.int64)) for part in parts]


def _validate(labels: np.ndarray, scheme: str, num_clients: int, alpha: float) -> np.ndarray:
    if scheme not in PARTITIONS:
        raise ValueError(f"partition: unknown scheme {scheme!r}; allowed values are {', '.join(PARTITIONS)}")
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if labels.size and labels.min() < 0:
        raise ValueError("labels must be non-negative class indices")
    if int(num_clients) != num_clients or num_clients < 1:
        raise ValueError(f"num-partitions: the number of clients must be an integer >= 1, got {num_clients!r}")
    if num_clients > labels.size:
        raise ValueError(
            f"num-partitions: {num_clients} clients but only {labels.size} training samples; "
            f"allowed is 1..{labels.size} so that no client is empty"
        )
    if scheme != "iid" and not (math.isfinite(float(alpha)) and alpha > 0):
        raise ValueError(f"dirichlet-alpha: the Dirichlet concentration must be a finite number > 0, got {alpha!r}")
    return labels.astype(np.int64, copy=False)


def _iid(num_samples: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    return list(np.array_split(rng.permutation(num_samples), num_clients))


# ------------------------------------------------------------------ quota scheme


def sample_dirichlet(concentration: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Dirichlet sample that stays valid for concentrations down to ~1e-300.

    With alpha * p_c, tail classes get concentrations of order 1e-4, where
    gamma draws underflow to 0 and the normalisation can become 0/0 = NaN.
    Working in log space avoids that: Gamma(a) equals Gamma(a + 1) * U^(1/a)
    in distribution, so log G = log Gamma(a + 1) + log(U) / a is finite for
    any a > 0, and a softmax of the log-gammas is an exact Dirichlet draw.
    """
    conc = np.asarray(concentration, dtype=np.float64)
    if conc.ndim != 1 or conc.size == 0 or not np.all(conc > 0):
        raise ValueError(f"Dirichlet concentrations must be a non-empty vector of positives, got {conc}")
    uniform = 1.0 - rng.random(conc.size)  # in (0, 1], so its log is finite
    log_gamma = np.log(rng.standard_gamma(conc + 1.0)) + np.log(uniform) / conc
    weights = np.exp(log_gamma - log_gamma.max())
    return weights / weights.sum()


def _target_counts(shares: np.ndarray, quota: int) -> np.ndarray:
    """round(q_c * quota) per class, the last class taking what is left of the quota."""
    counts = np.rint(shares * quota).astype(np.int64)
    counts[-1] = quota - counts[:-1].sum()
    # Rounding up several classes can overshoot the quota; trim the overshoot
    # from the largest requests so the client still gets exactly its quota.
    while counts[-1] < 0:
        largest = int(np.argmax(counts[:-1]))
        counts[largest] -= 1
        counts[-1] += 1
    return counts


def _refill(taken: np.ndarray, left: np.ndarray, shortfall: int) -> np.ndarray:
    """Top up a client from classes that still have samples, in proportion to what they have left."""
    taken = taken.copy()
    left = left - taken
    while shortfall > 0:
        extra = np.floor(shortfall * left / left.sum()).astype(np.int64)
        if extra.sum() == 0:
            # Proportional shares all round to zero: give one each to the
            # fullest classes so the loop always makes progress.
            order = np.argsort(-left, kind="stable")[:shortfall]
            extra = np.zeros_like(left)
            extra[order[left[order] > 0]] = 1
        extra = np.minimum(extra, left)
        taken += extra
        left -= extra
        shortfall -= int(extra.sum())
    return taken


def _quota_dirichlet(labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Split as the authors do: equal quotas, each client's label mix ~ Dir(alpha * p)."""
    classes = np.unique(labels)
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    left = np.array([pool.size for pool in pools], dtype=np.int64)
    used = np.zeros_like(left)
    proportions = left / left.sum()
    quota = labels.size // num_clients
    parts: list[np.ndarray] = []
    for _ in range(num_clients - 1):
        wanted = _target_counts(sample_dirichlet(alpha * proportions, rng), quota)
        taken = np.minimum(wanted, left)
        taken = _refill(taken, left, quota - int(taken.sum()))
        parts.append(np.concatenate([pool[u : u + t] for pool, u, t in zip(pools, used, taken, strict=True)]))
        used += taken
        left -= taken
    # The last client takes the remainder of N / K along with its quota.
    parts.append(np.concatenate([pool[u:] for pool, u in zip(pools, used, strict=True)]))
    return parts


# ------------------------------------------------------------- per-class scheme


def _per_class_dirichlet(labels: np.ndarray, num_clients: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Delegate to flwr-datasets' DirichletPartitioner on an in-memory data set.

    Imported lazily: `datasets` is heavy and only this scheme needs it. The
    minimum size keeps its retry loop from failing on small, skewed sets.
    """
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner

    min_size = min(10, labels.size // (2 * num_clients))
    partitioner = DirichletPartitioner(
        num_partitions=num_clients,
        partition_by="label",
        alpha=alpha,
        min_partition_size=min_size,
        self_balancing=False,
        shuffle=True,
        seed=seed,
    )
    partitioner.dataset = Dataset.from_dict(
        {"label": labels.tolist(), "idx": np.arange(labels.size, dtype=np.int64).tolist()}
    )
    try:
        # Its retries warn once per attempt; if they all fail we raise below,
        # so the warnings add nothing but noise in every simulation worker.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module="flwr_datasets")
            parts = [
                np.asarray(partitioner.load_partition(pid).with_format("numpy")[:]["idx"]) for pid in range(num_clients)
            ]
    except ValueError as err:
        raise ValueError(
            f"dirichlet-alpha / num-partitions: flwr-datasets could not give each of "
            f"{num_clients} clients at least {min_size} samples with alpha={alpha} "
            f"({err}); use a larger alpha or fewer clients"
        ) from err
    return parts


# ---------------------------------------------------------- dir-balance scheme

# FairFAL's ``dir_balance`` split: Dirichlet label mixes, equal client sizes.
#
# From util/data_simulator.py (l.52-220) of the authors' code:
#
# 1. one Dirichlet(β·1_C) row of class proportions per client;
# 2. five alternating row and column normalisations (Sinkhorn-like), so each
#    column says how class c is shared among the clients;
# 3. each class split across the clients in proportion to its column, by
#    largest-remainder rounding (column sums are the class totals);
# 4. samples moved greedily, class by class, from clients above their quota to
#    clients below it until every client holds ⌊N/K⌋ samples, the first
#    ``N mod K`` clients one more.
#
# So the quantity is balanced and only the label mix differs. Unlike the code,
# which hard-seeds numpy, python and torch to 0, the split here is a pure
# function of ``seed`` (the run seed) and touches no global RNG.

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


# ------------------------------------------------------------ natural clients


def partition_writers(writers: np.ndarray, num_clients: int) -> list[np.ndarray]:
    """Positions into ``writers`` for each client, keeping every writer's samples together.

    ``writers`` holds one writer index per sample (sorted-name order). With W
    distinct writers present and K clients: K == W gives each client one
    writer, in writer order; K < W deals writer w (its rank among the present
    writers) to client w mod K. No randomness, so every process agrees.
    """
    writers = np.asarray(writers)
    if writers.ndim != 1 or not np.issubdtype(writers.dtype, np.integer):
        raise ValueError(f"writers must be a 1-D integer array, got {writers.dtype} {writers.shape}")
    if int(num_clients) != num_clients or num_clients < 1:
        raise ValueError(f"num-partitions: the number of clients must be an integer >= 1, got {num_clients!r}")
    present, rank = np.unique(writers, return_inverse=True)
    if num_clients > present.size:
        raise ValueError(
            f"num-partitions: {num_clients} clients but the training set has only {present.size} writers; "
            f"partition 'writers' allows 1..{present.size} clients ({present.size} = one client per writer)"
        )
    client = rank.reshape(-1) % int(num_clients)
    order = np.argsort(client, kind="stable")  # stable: each client's positions stay sorted
    sizes = np.bincount(client, minlength=int(num_clients))
    return [part.astype(np.int64) for part in np.split(order, np.cumsum(sizes)[:-1])]
