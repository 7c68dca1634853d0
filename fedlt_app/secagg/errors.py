"""The two ways a secure-aggregation round fails: too few clients, or a party breaking the protocol."""

from __future__ import annotations


class SecAggError(RuntimeError):
    """Base class: the round's sum cannot be (or must not be) produced."""


class BelowThreshold(SecAggError):
    """Fewer clients than the threshold answered a stage: the masks can no longer be removed safely."""


class ProtocolViolation(SecAggError):
    """A message breaks the protocol (e.g. asks for both shares of one node); the receiver refuses it."""
