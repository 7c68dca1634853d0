"""Speed and memory of fedlt, measured in one run on one machine.

1. ``precision``: the app's round through Flower's simulation engine against
   the plain single-process loop doing exactly the same local training (same
   model, data, batch size, steps, clients, seeds), FedAvg and RedGrape, in
   fp32 and bf16.
2. ``epochs``: RedGrape's round against FedAvg's at 5 local epochs, fp32 and
   bf16 (1 epoch comes from part 1).
3. ``scale``: peak memory (all processes of the run) and round time with 10,
   100 and 1,000 virtual clients at 10 clients per round.
4. ``floor``: the FLOPs of each setting's round over this CPU's dense-matmul
   rate in the same precision (see benchmarks/floor.py), and one local step
   with channels_last and torch.compile.
5. ``secagg``: secure aggregation's overhead. FedAvg with every client in the
   cohort, 10 and 100 clients (``--secagg-clients``), plain against
   ``secure-aggregation=secagg`` through the app (round time, bytes up and
   down per round), and the protocol alone on the in-process grid with a
   vector of the same length (keys, shares, masking and unmasking, no
   training): what the O(K²) pairwise masks cost as the cohort grows.

Round times are the median over rounds 2.. (round 1 pays for Ray workers
starting and decoding the data). Writes results/speed/speed.json and
results/speed/speed.md after every part; ``--parts`` re-measures some parts
and keeps the others from the existing speed.json.

    python benchmarks/speed.py                          # every part, 3 rounds a run
    python benchmarks/speed.py --parts precision,floor  # ~25 min on 2 cores
    python benchmarks/speed.py --parts secagg --rounds 1 --secagg-clients 3 --output /tmp/smoke  # smoke check
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import floor
import plain_loop

from fedlt_app.precision import cpu_has_native_bf16
from fedlt_app.secagg.grid import run_round
from fedlt_app.secagg.messages import default_threshold

PRECISIONS = ("fp32", "bf16")

ROOT = Path(__file__).resolve().parent.parent


class PeakMemory:
    """Samples the summed RSS of a process and all its descendants."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
                total = 0
                for proc in procs:
                    with contextlib.suppress(psutil.Error):  # a child that exited meanwhile
                        total += proc.memory_info().rss
                self.peak = max(self.peak, total)
            except psutil.Error:
                pass
            self._stop.wait(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def app_run(run_config: str, num_clients: int, work: Path, name: str) -> dict:
    """One run through ``fedlt-run`` (a subprocess, so its whole tree is measured)."""
    env = {**os.environ, "FLWR_HOME": str(work / "flwr-home")}
    command = [sys.executable, "-m", "fedlt_app.launch", str(ROOT), "--num-clients", str(num_clients),
               "--run-config", f"{run_config} output-dir='{work}' run-name='{name}' checkpoint-every=0"]
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    memory = PeakMemory(process.pid)
    code = process.wait()
    peak = memory.stop()
    if code != 0:
        raise RuntimeError(f"benchmark run {name} failed (exit {code}); rerun it with fedlt-run to see why")
    rows = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
    return {"round_seconds": [r["round_seconds"] for r in rows], "peak_rss_bytes": peak,
            "wall_seconds": time.perf_counter() - started, "bytes_up": [r["bytes_up"] for r in rows],
            "bytes_down": [r["bytes_down"] for r in rows], "parameters_up": [r["parameters_up"] for r in rows]}


def steady(seconds: list[float]) -> float:
    return statistics.median(seconds[1:] if len(seconds) > 1 else seconds)


def plain_run(run_config: str, num_clients: int) -> dict:
    rows = plain_loop.run(plain_loop.parse_overrides(run_config), num_clients)
    return {"round_seconds": [r["round_seconds"] for r in rows]}


PARTS = ("precision", "epochs", "scale", "floor", "secagg")
LEGACY_KEYS = ("app_vs_plain_fedavg", "app_vs_plain_redgrape", "redgrape_vs_fedavg_1_epochs",
               "redgrape_vs_fedavg_5_epochs")


def measure_precision(report: dict, base: str, work: Path) -> None:
    """1. app vs plain loop, default setting (10 clients, 1 local epoch), FedAvg and RedGrape, fp32 and bf16."""
    for precision in PRECISIONS:
        for method in ("fedavg", "redgrape"):
            config = f"{base} method='{method}' precision='{precision}'"
            app = app_run(config, 10, work, f"app-{method}-{precision}")
            plain = plain_run(config, 10)
            report[f"app_vs_plain_{method}_{precision}"] = {
                "app_round_s": steady(app["round_seconds"]), "plain_round_s": steady(plain["round_seconds"]),
                "ratio": steady(app["round_seconds"]) / steady(plain["round_seconds"]),
                "app": app, "plain": plain,
            }


def measure_epochs(report: dict, base: str, work: Path) -> None:
    """2. RedGrape vs FedAvg at 5 local epochs through the app, fp32 and bf16 (1 epoch: part 1)."""
    for precision in PRECISIONS:
        times = {}
        for method in ("fedavg", "redgrape"):
            config = f"{base} method='{method}' local-epochs=5 precision='{precision}'"
            times[method] = steady(app_run(config, 10, work, f"e5-{method}-{precision}")["round_seconds"])
        report[f"redgrape_vs_fedavg_5_epochs_{precision}"] = {**times, "ratio": times["redgrape"] / times["fedavg"]}


def measure_scale(report: dict, base: str, work: Path, quick: bool) -> None:
    """3. 10 / 100 / 1,000 virtual clients, 10 per round (RedGrape, fp32): round time and peak memory."""
    scale = {}
    for clients in (10, 100) if quick else (10, 100, 1000):
        run = app_run(f"{base} method='redgrape' clients-per-round=10", clients, work, f"scale-{clients}")
        scale[str(clients)] = {"round_s": steady(run["round_seconds"]), "peak_rss_gib": run["peak_rss_bytes"] / 2**30}
    report["scale"] = scale
    report["memory_ratio_largest_vs_10"] = scale[max(scale, key=int)]["peak_rss_gib"] / scale["10"]["peak_rss_gib"]


def measure_floor(report: dict) -> None:
    """4. The compute floor of each measured setting, and the step variants (channels_last, compile)."""
    configs = {f"{m}_{e}_epochs": {"method": m, "local-epochs": e} for m in ("fedavg", "redgrape") for e in (1, 5)}
    report["floor"] = floor.report(configs)


def measure_secagg(report: dict, base: str, work: Path, cohorts: list[int]) -> None:
    """5. FedAvg, every client in the cohort: plain vs secagg through the app, and the protocol alone."""
    entries = {}
    for clients in cohorts:
        entry: dict = {}
        for mode in ("off", "secagg"):
            run = app_run(f"{base} method='fedavg' clients-per-round=0 secure-aggregation='{mode}'", clients, work,
                          f"secagg-{mode}-{clients}")
            entry[mode] = {"round_s": steady(run["round_seconds"]), "bytes_up": statistics.median(run["bytes_up"]),
                           "bytes_down": statistics.median(run["bytes_down"]),
                           "peak_rss_gib": run["peak_rss_bytes"] / 2**30}
        entry["ratio"] = entry["secagg"]["round_s"] / entry["off"]["round_s"]
        entry["vector_length"] = int(run["parameters_up"][0]) // clients  # masked values per client (last run: secagg)
        entry["protocol_s"] = protocol_seconds(clients, entry["vector_length"])
        entries[str(clients)] = entry
    report["secagg"] = entries


def protocol_seconds(clients: int, length: int) -> float:
    """One round of the protocol alone (both sides, one process, no dropouts) on random vectors."""
    rng = np.random.default_rng(0)
    inputs = {node: rng.integers(0, 2**63, length, dtype=np.uint64) for node in range(1, clients + 1)}
    started = time.perf_counter()
    run_round(inputs, default_threshold(clients))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per measured run")
    parser.add_argument("--quick", action="store_true", help="skip the 1,000-client run")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated parts to (re)measure, of {', '.join(PARTS)}; the others are kept "
                             "from an existing speed.json")
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "speed")
    parser.add_argument("--secagg-clients", default="10,100",
                        help="comma-separated federation sizes (= cohorts) for the secagg part")
    args = parser.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown part(s) {', '.join(unknown)}; known: {', '.join(PARTS)}")
    path = args.output / "speed.json"
    report: dict = json.loads(path.read_text()) if path.is_file() else {}
    for key in LEGACY_KEYS:  # fp32-only figures of earlier versions of this script
        report.pop(key, None)
    report["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                         "cuda": torch.cuda.is_available(), "native_bf16": cpu_has_native_bf16()}
    report["rounds"] = args.rounds
    base = f"num-server-rounds={args.rounds}"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for part in parts:
            started = time.perf_counter()
            if part == "precision":
                measure_precision(report, base, work)
            elif part == "epochs":
                measure_epochs(report, base, work)
            elif part == "scale":
                measure_scale(report, base, work, args.quick)
            elif part == "secagg":
                measure_secagg(report, base, work, [int(c) for c in args.secagg_clients.split(",")])
            else:
                measure_floor(report)
            report.setdefault("measured", {})[part] = {"date": time.strftime("%Y-%m-%d %H:%M"),
                                                       "seconds": time.perf_counter() - started}
            args.output.mkdir(parents=True, exist_ok=True)  # written after every part: nothing measured is lost
            path.write_text(json.dumps(report, indent=2))
            (args.output / "speed.md").write_text(render(report))
    print(render(report))


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def render(report: dict) -> str:
    lines = ["# fedlt speed and memory", "",
             f"Machine: {report['machine']['cpus']} CPUs, {report['machine']['platform']}, "
             f"torch {report['machine']['torch']}, CUDA {report['machine']['cuda']}, "
             f"native bf16 {report['machine'].get('native_bf16')}. "
             f"{report['rounds']} rounds per run; round time = median over rounds 2.. "
             "Setting: Fashion-MNIST-LT IR 100, 10 clients, CNN, batch 64, SGD lr 0.05 momentum 0.9, clip 1.0.", ""]
    measured = report.get("measured", {})
    if measured:
        lines += ["Measured: " + ", ".join(f"{k} {v['date']} ({v['seconds'] / 60:.0f} min)"
                                           for k, v in measured.items()), ""]
    if any(f"app_vs_plain_fedavg_{p}" in report for p in PRECISIONS):
        lines += ["## Round time by precision (1 local epoch)", "",
                  "| method | precision | app round (s) | plain loop round (s) | app / plain | fp32 / this |",
                  "|---|---|---|---|---|---|"]
        for method in ("fedavg", "redgrape"):
            reference = report.get(f"app_vs_plain_{method}_fp32")
            for precision in PRECISIONS:
                r = report.get(f"app_vs_plain_{method}_{precision}")
                if r is None:
                    continue
                speedup = f"{reference['app_round_s'] / r['app_round_s']:.2f}x" if reference else "—"
                lines.append(_row([method, precision, f"{r['app_round_s']:.1f}", f"{r['plain_round_s']:.1f}",
                                   f"{r['ratio']:.2f}", speedup]))
        lines.append("")
    epoch_rows = []
    for precision in PRECISIONS:
        one = [report.get(f"app_vs_plain_{m}_{precision}") for m in ("fedavg", "redgrape")]
        if all(one):
            f1, r1 = one[0]["app_round_s"], one[1]["app_round_s"]
            epoch_rows.append(_row([precision, "1", f"{f1:.1f}", f"{r1:.1f}", f"{r1 / f1:.2f}"]))
        five = report.get(f"redgrape_vs_fedavg_5_epochs_{precision}")
        if five:
            epoch_rows.append(_row([precision, "5", f"{five['fedavg']:.1f}", f"{five['redgrape']:.1f}",
                                    f"{five['ratio']:.2f}"]))
    if epoch_rows:
        lines += ["## RedGrape vs FedAvg", "",
                  "| precision | local epochs | FedAvg round (s) | RedGrape round (s) | RedGrape / FedAvg |",
                  "|---|---|---|---|---|", *epoch_rows, ""]
    if "floor" in report:
        fl = report["floor"]
        rates = fl["matmul_flops_per_s"]
        lines += ["## Compute floor", "",
                  f"Dense matmul on all {fl['threads']} cores: fp32 {rates['fp32'] / 1e9:.0f} GFLOP/s, "
                  f"bf16 {rates['bf16'] / 1e9:.0f} GFLOP/s. A round's FLOPs are counted from the model "
                  "(forward + backward per training sample, forward per test sample, RedGrape's prototype and "
                  "balanced-set passes); floor = FLOPs / matmul rate; measured round / floor says how far a "
                  "round is from the hardware's best.", "",
                  "| setting | TFLOP per round | precision | floor (s) | measured round (s) | measured / floor |",
                  "|---|---|---|---|---|---|"]
        for name, value in fl["rounds"].items():
            method, epochs = name.split("_")[0], int(name.split("_")[1])
            for precision in PRECISIONS:
                measured_s = _measured_round(report, method, epochs, precision)
                ratio = f"{measured_s / value['floor_s'][precision]:.1f}" if measured_s else "—"
                lines.append(_row([f"{method}, {epochs} epoch(s)", f"{value['flops']['total'] / 1e12:.2f}", precision,
                                   f"{value['floor_s'][precision]:.1f}",
                                   f"{measured_s:.1f}" if measured_s else "—", ratio]))
        steps = fl["step_variants"]
        lines += ["", "One local step (batch 64, one thread, as one virtual client computes), ms:", "",
                  "| precision | eager | channels_last | torch.compile (after warm-up) |", "|---|---|---|---|"]
        for precision in PRECISIONS:
            lines.append(_row([precision, f"{steps[f'{precision}_eager_ms']:.1f}",
                               f"{steps[f'{precision}_channels_last_ms']:.1f}",
                               f"{steps[f'{precision}_compile_ms']:.1f} "
                               f"(warm-up {steps[f'{precision}_compile_warmup_s']:.0f} s)"]))
        lines.append("")
    if "scale" in report:
        lines += ["## Scale (RedGrape, fp32, 10 clients per round)", "",
                  "| virtual clients | round (s) | peak RSS, all processes (GiB) |", "|---|---|---|"]
        for clients, value in report["scale"].items():
            lines.append(f"| {clients} | {value['round_s']:.1f} | {value['peak_rss_gib']:.2f} |")
        lines += ["", f"Peak memory, largest federation vs 10 clients: {report['memory_ratio_largest_vs_10']:.2f}x", ""]
    if "secagg" in report:
        lines += ["## Secure aggregation (FedAvg, fp32, every client in the cohort)", "",
                  "| clients | plain round (s) | secagg round (s) | secagg / plain "
                  "| up per round, plain → secagg (MB) | down per round, plain → secagg (MB) | protocol alone (s) |",
                  "|---|---|---|---|---|---|---|"]
        for clients, e in report["secagg"].items():
            off, on = e["off"], e["secagg"]
            lines.append(_row([clients, f"{off['round_s']:.1f}", f"{on['round_s']:.1f}", f"{e['ratio']:.2f}",
                               f"{off['bytes_up'] / 1e6:.1f} → {on['bytes_up'] / 1e6:.1f}",
                               f"{off['bytes_down'] / 1e6:.1f} → {on['bytes_down'] / 1e6:.1f}",
                               f"{e['protocol_s']:.1f}"]))
        lines.append("")
    return "\n".join(lines)


def _measured_round(report: dict, method: str, epochs: int, precision: str) -> float | None:
    if epochs == 1:
        entry = report.get(f"app_vs_plain_{method}_{precision}")
        return entry["app_round_s"] if entry else None
    entry = report.get(f"redgrape_vs_fedavg_{epochs}_epochs_{precision}")
    return entry[method] if entry else None


if __name__ == "__main__":
    main()
