"""Secure aggregation (Bonawitz et al. 2017, as in Flower's SecAgg+) built for fedlt's Message API.

The server learns only the sum of the clients' vectors: each client adds a self-mask and, for every
other client of the cohort, a pairwise mask that cancels in the sum; Shamir shares of the self-mask
seed and of the pairwise key let the server remove the masks of survivors and of dropouts while at
least `threshold` clients answer.  Modules, lowest first (none imports a later one):

* ``fixedpoint`` — floats <-> Z_{2^64} with seeded stochastic rounding (unbiased), the overflow bound.
* ``layout``     — named segments (fixed point or exact integers) packed into one dense vector.
* ``prg``        — AES-256-CTR mask generator: 32-byte secret -> uniform vector in Z_{2^64}.
* ``keys``       — X25519 key agreement + HKDF-SHA256, bound to the round's context.
* ``shamir``     — t-of-n secret sharing over the prime field GF(2^521 - 1).
* ``aead``       — AES-256-GCM for the share messages routed through the server (tampering refused).
* ``messages``   — the protocol's stage messages and their checks (one node never in both unmask lists).
* ``client``     — a client's state machine; ``server`` — the server's; ``grid`` — both, in process.
* ``update``     — the FedAvg-shaped vector (n, clipped count, n * loss, w * model delta with w = n or 1, the
  method's sums, masked metrics) and its decoding.
* ``wire``       — messages and client snapshots <-> Flower ArrayRecords.
* ``flower_server`` / ``flower_client`` — the query rounds on Flower's Message API (the strategy and the
  ClientApp call these when ``secure-aggregation=secagg``).
"""
