"""Mixed precision: which arithmetic the forward passes use, and nothing else.

``precision`` picks the autocast dtype of every forward pass (local training,
the methods' extra passes, server evaluation).  Everything that is *state*
stays float32 whatever the choice: master weights, optimizer state, what
travels over the wire, gradient prototypes, aggregates, and losses (the
logits are cast to float32 before any loss).  That is standard automatic
mixed precision; its point here is that this machine's CPU runs bfloat16
matrix products natively (AVX-512 BF16), about twice as fast as float32.

* ``fp32``  — no autocast.
* ``bf16``  — ``torch.autocast(dtype=bfloat16)`` on CPU or CUDA; refused where
  the device has no native bfloat16 (it would be emulated, slower than fp32).
* ``fp16``  — CUDA only, with a gradient scaler (fp16's range is too narrow
  for gradients without one).
* ``auto``  — bf16 where the device runs it natively, otherwise fp32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from fedlt_app.config import PRECISIONS, ConfigError

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# /proc/cpuinfo flags that mean native bfloat16 dot products.
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bfloat16 dot products in hardware (AVX-512 BF16 or AMX).

    Read from /proc/cpuinfo: PyTorch 2.14 exposes no public probe, and its
    ``mkldnn._is_mkldnn_bf16_supported`` is also true where oneDNN merely
    emulates bf16 with AVX-512 (slower than fp32).  Elsewhere: False, so
    ``auto`` stays fp32.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return any(flag in flags for flag in _CPU_BF16_FLAGS)


def native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


def resolve_precision_name(name: str, device: torch.device) -> str:
    """The concrete precision (fp32/bf16/fp16) ``name`` means on ``device``; fails naming the key."""
    if name not in PRECISIONS:
        raise ConfigError(f"precision: must be one of {', '.join(PRECISIONS)} (got {name!r})")
    if name == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise ConfigError(f"precision: 'fp16' needs a CUDA device (this run computes on {device.type}); "
                         "use 'bf16' or 'auto' on CPUs")
    if name == "bf16" and not native_bf16(device):
        what = "this CPU has neither AVX-512 BF16 nor AMX" if device.type == "cpu" else "this GPU has no native bf16"
        raise ConfigError(f"precision: 'bf16' is not native here ({what}); use 'fp32' or 'auto'")
    return name


@dataclass(frozen=True)
class Precision:
    """A resolved precision on one device type; build it with :func:`precision_for`."""

    name: str  # fp32, bf16 or fp16
    device_type: str

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.name]

    @property
    def enabled(self) -> bool:
        return self.name != "fp32"

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Forward passes inside run in this precision (a no-op for fp32)."""
        if not self.enabled:
            yield
            return
        with torch.autocast(self.device_type, dtype=self.dtype):
            yield

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """fp16 needs loss scaling so that small gradients survive; bf16 and fp32 do not."""
        return torch.amp.GradScaler(self.device_type) if self.name == "fp16" else None


FP32 = Precision("fp32", "cpu")


def precision_for(name: str, device: torch.device) -> Precision:
    return Precision(resolve_precision_name(name, device), device.type)


@contextlib.contextmanager
def full_precision(device_type: str) -> Iterator[None]:
    """Switch autocast off: for the small, accuracy-critical sums (prototypes, losses' inputs)."""
    with torch.autocast(device_type, enabled=False):
        yield
