"""Conversions between Flower records and the plain arrays methods use."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

# BatchNorm running statistics travel with the model (they are averaged like
# the rest) but are not parameters, which is what the paper's Table 5 counts.
_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def is_buffer(key: str) -> bool:
    return key.endswith(_BUFFER_SUFFIXES)


def payload_to_record(payload: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in payload.items()})


def record_to_payload(record: ArrayRecord | None) -> dict[str, np.ndarray]:
    if record is None:
        return {}
    return {key: array.numpy() for key, array in record.items()}


def content_nbytes(content: RecordDict) -> int:
    """Bytes of every array a message carries (configs and metrics are noise)."""
    return sum(array.numpy().nbytes for record in content.array_records.values() for array in record.values())


def content_parameters(content: RecordDict) -> int:
    """Floating-point values a message carries, BatchNorm statistics aside."""
    total = 0
    for record in content.array_records.values():
        for key, array in record.items():
            values = array.numpy()
            if np.issubdtype(values.dtype, np.floating) and not is_buffer(key):
                total += values.size
    return total
