"""What the active-learning server and clients must agree on: message names, keys, seeds, weights.

Messages (all ``query.<action>``, answered by ``@app.query`` handlers):

=================  ==============================================  ====================================
action             down (server → client)                          up (client → server), scalars only
=================  ==============================================  ====================================
``al_init``        config: initial                                  num-labeled, selection-digest
``fairfal_stats``  arrays: global model; config: cycle              r, d
``al_select``      arrays: global model (not for random);           num-labeled, num-queried,
                   config: cycle, budget, r-bar                     selection-digest
=================  ==============================================  ====================================

``queried-per-class`` (a list of ints, a label histogram) is added to the
``al_init`` and ``al_select`` replies only when ``al-report-query-counts`` is on.
The selection digest is a 48-bit hash of the client's labeled positions: it
lets a run be checked for reproducibility without revealing which samples,
let alone which labels, a client holds.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from fedlt_app.config import RunConfig
from fedlt_app.data import FederatedData
from fedlt_app.models import EncoderClassifier
from fedlt_app.task import method_model

INIT = "al_init"
STATS = "fairfal_stats"
SELECT = "al_select"

# context.state records of a client
LABELED_STATE = "al-labeled"  # ArrayRecord {"positions": int64 positions into the client's partition}
LOCAL_MODEL_STATE = "al-local-model"  # ArrayRecord: the local-only model of the current query
STATS_STATE = "al-stats"  # MetricRecord {"d", "cycle"}: pass 1's divergence, kept for pass 2

# train ConfigRecord key set by the driver: train on the labeled set only
TRAIN_ON_LABELED = "al-labeled-only"

_STREAMS = {"init": 1, "local-only": 2, "random": 3, "cycle-init": 4, "cohorts": 5, "local-init": 6}


def stream_seed(seed: int, purpose: str, *keys: int) -> int:
    """An independent, reproducible seed per (run seed, purpose, keys...)."""
    entropy = [int(seed) & 0xFFFFFFFF, _STREAMS[purpose], *(int(k) for k in keys)]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def _fresh_model(cfg: RunConfig, data: FederatedData, seed: int) -> EncoderClassifier:
    with torch.random.fork_rng(devices=[]):  # leaves the global torch RNG as it was
        torch.manual_seed(seed)
        return method_model(cfg, data)


def cycle_initial_model(cfg: RunConfig, data: FederatedData, cycle: int) -> EncoderClassifier:
    """The freshly initialised network of cycle ``cycle`` (0-based).

    Cycle 0 is fedlt's usual round-0 model (``torch.manual_seed(seed)``); a
    re-initialised later cycle draws from its own seed.
    """
    return _fresh_model(cfg, data, cfg.seed if cycle == 0 else stream_seed(cfg.seed, "cycle-init", cycle))


def local_only_initial_model(cfg: RunConfig, data: FederatedData, cycle: int) -> EncoderClassifier:
    """The initial random weights the local-only models of the query before cycle ``cycle`` start from.

    As in the code (``args.raw_ckpt``, a fresh ``get_model`` captured when the
    query net is built): a new random initialisation per query, the same for
    every client of that query, never the global model.
    """
    return _fresh_model(cfg, data, stream_seed(cfg.seed, "local-init", cycle))


def selection_digest(positions: np.ndarray) -> int:
    """A 48-bit fingerprint of a set of positions (exact in JSON and in a MetricRecord)."""
    data = np.unique(np.asarray(positions, dtype=np.int64)).astype("<i8").tobytes()
    return int.from_bytes(hashlib.sha256(data).digest()[:6], "big")
