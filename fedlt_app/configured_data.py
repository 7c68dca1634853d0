"""The run's long-tailed, partitioned data as its RunConfig describes it.

The one place that maps run-config keys to :func:`fedlt_app.data.load_federated_data`'s
arguments, shared by the apps (:mod:`fedlt_app.task`, the ServerApp, the
active-learning driver) and by ``python -m fedlt_app.data.local export``, so
it sits below all of them.
"""

from __future__ import annotations

from fedlt_app.config import RunConfig
from fedlt_app.data import FederatedData, load_federated_data


def federated_data(cfg: RunConfig, num_clients: int) -> FederatedData:
    """The run's long-tailed, partitioned data (decoded once per process)."""
    return load_federated_data(
        dataset=cfg.dataset,
        data_dir=cfg.data_dir or None,
        imbalance_profile=cfg.imbalance_profile,
        imbalance_ratio=cfg.imbalance_ratio,
        minority_classes=cfg.minority_class_tuple,
        partition=cfg.partition,
        dirichlet_alpha=cfg.dirichlet_alpha,
        num_clients=num_clients,
        seed=cfg.seed,
        samples_per_class=cfg.samples_per_class,
    )
