"""The compute floor of a round, and what the arithmetic options buy on this machine.

Three measurements, each in fp32 and bf16:

1. ``matmul_rate``: dense matrix-product throughput of this CPU (all cores),
   the best the hardware does in that precision.
2. ``round_flops``: the FLOPs one round of a run needs, counted from the
   model (``torch.utils.flop_counter`` on one batch, forward and backward)
   and the run's data: Σ_k n_k · epochs · F_train + N_test · F_forward, plus,
   for RedGrape, the prototype pass (n_k · F_forward) and the balanced-set
   encoder pass every step.  ``floor = round_flops / matmul_rate`` is the
   round time if every FLOP ran at matmul speed; round time / floor says how
   far a round is from what the hardware can do.
3. ``step_variants``: milliseconds per local training step of the model
   (batch 64, one thread, as one virtual client computes) for fp32, bf16, and
   each with ``channels_last`` and with ``torch.compile``.

    python benchmarks/floor.py            # prints a JSON report (speed.py includes it)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections.abc import Iterator

import torch
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from fedlt_app.config import RunConfig, resolve
from fedlt_app.configured_data import federated_data
from fedlt_app.models import build_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@contextlib.contextmanager
def threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def matmul_rate(precision: str, size: int = 2048, seconds: float = 3.0, num_threads: int = 0) -> float:
    """FLOP/s of a square matrix product in ``precision`` (best of repeated timings)."""
    dtype = DTYPES[precision]
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    best = float("inf")
    with threads(num_threads or os.cpu_count() or 1):
        torch.matmul(a, b)  # warm-up (oneDNN picks its kernel)
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            torch.matmul(a, b)
            best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def per_sample_flops(cfg: RunConfig, channels: int, side: int, num_classes: int) -> dict[str, float]:
    """Forward FLOPs (whole model, encoder only) and forward+backward FLOPs, per sample."""
    model = build_model(cfg.model, num_classes, channels, side)
    batch = 64
    x = torch.randn(batch, channels, side, side)
    y = torch.randint(0, num_classes, (batch,))
    counts = {}
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    counts["forward"] = counter.get_total_flops() / batch
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.encoder(x)
    counts["encoder_forward"] = counter.get_total_flops() / batch
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    counts["train"] = counter.get_total_flops() / batch
    return counts


def round_flops(run_config: dict, num_clients: int) -> dict[str, float]:
    """FLOPs of one full round (every client trains; the server evaluates) of ``run_config``."""
    cfg = resolve(run_config)
    data = federated_data(cfg, num_clients)
    _, channels, side, _ = data.dataset.train_images.shape
    per_sample = per_sample_flops(cfg, channels, side, data.num_classes)
    sizes = [len(indices) for indices in data.client_indices]
    if cfg.clients_per_round and cfg.clients_per_round < num_clients:
        raise ValueError("round_flops counts full participation (clients-per-round=0)")
    training = sum(sizes) * cfg.local_epochs * per_sample["train"]
    evaluation = len(data.test_data()[1]) * per_sample["forward"]
    extra = 0.0
    if cfg.method == "redgrape":
        labels = data.dataset.train_labels
        for indices, n in zip(data.client_indices, sizes, strict=True):
            counts = torch.bincount(labels[torch.as_tensor(indices)], minlength=data.num_classes)
            balanced = int((counts >= cfg.balance_threshold).sum()) * cfg.balance_threshold
            steps = cfg.local_epochs * -(-n // cfg.batch_size)
            extra += n * per_sample["forward"] + steps * balanced * per_sample["encoder_forward"]
    return {"train": training, "evaluate": evaluation, "method_extra": extra,
            "total": training + evaluation + extra, "per_sample": per_sample, "samples": sum(sizes)}


def step_variants(run_config: dict, steps: int = 30, warmup: int = 8) -> dict[str, float]:
    """ms per local step (batch 64, one thread) for each precision x {eager, channels_last, compile}."""
    cfg = resolve(run_config)
    results = {}
    with threads(1):
        for precision in DTYPES:
            for variant in ("eager", "channels_last", "compile"):
                torch.manual_seed(0)
                model = build_model(cfg.model, 10, 1, 28)
                x = torch.rand(cfg.batch_size, 1, 28, 28)
                y = torch.randint(0, 10, (cfg.batch_size,))
                if variant == "channels_last":
                    model = model.to(memory_format=torch.channels_last)
                    x = x.contiguous(memory_format=torch.channels_last)
                forward = torch.compile(model) if variant == "compile" else model
                optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
                compile_started = time.perf_counter()
                for i in range(warmup + steps):
                    if i == warmup:
                        started = time.perf_counter()
                        if variant == "compile":
                            results[f"{precision}_compile_warmup_s"] = started - compile_started
                    optimizer.zero_grad(set_to_none=True)
                    with torch.autocast("cpu", dtype=DTYPES[precision], enabled=precision != "fp32"):
                        loss = F.cross_entropy(forward(x).float(), y)
                    loss.backward()
                    optimizer.step()
                results[f"{precision}_{variant}_ms"] = 1000 * (time.perf_counter() - started) / steps
    return results


def report(run_configs: dict[str, dict], num_clients: int = 10) -> dict:
    rates = {p: matmul_rate(p) for p in DTYPES}
    out: dict = {"matmul_flops_per_s": rates, "threads": os.cpu_count(), "rounds": {}}
    for name, run_config in run_configs.items():
        flops = round_flops(run_config, num_clients)
        out["rounds"][name] = {"flops": flops, "floor_s": {p: flops["total"] / rate for p, rate in rates.items()}}
    out["step_variants"] = step_variants(next(iter(run_configs.values())))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-clients", type=int, default=10)
    args = parser.parse_args()
    configs = {f"{m}_{e}_epochs": {"method": m, "local-epochs": e} for m in ("fedavg", "redgrape") for e in (1, 5)}
    print(json.dumps(report(configs, args.num_clients), indent=2))


if __name__ == "__main__":
    main()
