"""Federated active learning under global class imbalance (FairFAL, Zong & Huang).

An outer active-learning loop around fedlt's ordinary federated training:
each cycle trains a model on the clients' labeled sets only, then every client
queries more labels from its own unlabeled pool. Modules:

* ``budget``: labeled-ratio cycles and the per-client budget (pure);
* ``pool``: a client's partition whose unlabeled part exposes images only;
* ``query``, ``kcenter``, ``local_only``: FairFAL's query and the random /
  entropy baselines (torch, no Flower);
* ``client``, ``driver``: the Flower glue (custom query messages, the
  ServerApp's cycle loop);
* ``plot``, ``compare``: the accuracy-vs-labeled-ratio figure and a runner.

FairFAL's class-balanced ``dir-balance`` split is a partition scheme like the
others, in :mod:`fedlt_app.data.partition`. This file imports nothing, so a
pure module (``budget``) loads without Flower.
"""
