"""Speed and memory of fedlt, measured in one run on one machine.

1. The app's round through Flower's simulation engine against the plain
   single-process loop doing exactly the same local training (same model,
   data, batch size, steps, clients, seeds): the floor.
2. RedGrape's round against FedAvg's, at 1 and at 5 local epochs.
3. Peak memory (all processes of the run) and round time with 10, 100 and
   1,000 virtual clients at 10 clients per round.

Round times are the median over rounds 2.. (round 1 pays for Ray workers
starting and decoding the data). Writes results/speed/speed.json and
results/speed/speed.md.

    python benchmarks/speed.py                 # the full protocol, 4 rounds a run (--rounds 3 took 17 min on 2 cores)
    python benchmarks/speed.py --rounds 3 --quick
"""

from __future__ import annotations

import argparse
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

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import plain_loop  # noqa: E402

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
                    try:
                        total += proc.memory_info().rss
                    except psutil.Error:
                        pass
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
            "wall_seconds": time.perf_counter() - started}


def steady(seconds: list[float]) -> float:
    return statistics.median(seconds[1:] if len(seconds) > 1 else seconds)


def plain_run(run_config: str, num_clients: int) -> dict:
    rows = plain_loop.run(plain_loop.parse_overrides(run_config), num_clients)
    return {"round_seconds": [r["round_seconds"] for r in rows]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="rounds per measured run")
    parser.add_argument("--quick", action="store_true", help="skip the 5-epoch and 1,000-client runs")
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "speed")
    args = parser.parse_args()
    base = f"num-server-rounds={args.rounds}"
    report: dict = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "cuda": torch.cuda.is_available()},
        "rounds": args.rounds,
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # 1. app vs plain loop, default setting (10 clients, 1 local epoch, FedAvg and RedGrape)
        for method in ("fedavg", "redgrape"):
            app = app_run(f"{base} method='{method}'", 10, work, f"app-{method}")
            plain = plain_run(f"{base} method='{method}'", 10)
            report[f"app_vs_plain_{method}"] = {
                "app_round_s": steady(app["round_seconds"]), "plain_round_s": steady(plain["round_seconds"]),
                "ratio": steady(app["round_seconds"]) / steady(plain["round_seconds"]),
                "app": app, "plain": plain,
            }
        # 2. RedGrape vs FedAvg at 1 and 5 local epochs (through the app)
        epochs_list = (1,) if args.quick else (1, 5)
        for epochs in epochs_list:
            times = {}
            for method in ("fedavg", "redgrape"):
                key = f"app_vs_plain_{method}"
                if epochs == 1:
                    times[method] = report[key]["app_round_s"]
                else:
                    run = app_run(f"{base} method='{method}' local-epochs={epochs}", 10, work, f"e{epochs}-{method}")
                    times[method] = steady(run["round_seconds"])
            report[f"redgrape_vs_fedavg_{epochs}_epochs"] = {**times, "ratio": times["redgrape"] / times["fedavg"]}
        # 3. scale: 10 / 100 / 1,000 virtual clients, 10 per round
        scale = {}
        for clients in (10, 100) if args.quick else (10, 100, 1000):
            run = app_run(f"{base} method='redgrape' clients-per-round=10", clients, work, f"scale-{clients}")
            scale[clients] = {"round_s": steady(run["round_seconds"]), "peak_rss_gib": run["peak_rss_bytes"] / 2**30}
        report["scale"] = scale
        largest = max(scale)
        report["memory_ratio_largest_vs_10"] = scale[largest]["peak_rss_gib"] / scale[10]["peak_rss_gib"]

    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "speed.json").write_text(json.dumps(report, indent=2))
    (args.output / "speed.md").write_text(render(report))
    print(render(report))


def render(report: dict) -> str:
    lines = ["# fedlt speed and memory", "",
             f"Machine: {report['machine']['cpus']} CPUs, {report['machine']['platform']}, "
             f"torch {report['machine']['torch']}, CUDA {report['machine']['cuda']}. "
             f"{report['rounds']} rounds per run; round time = median over rounds 2..", "",
             "| setting | app round (s) | plain loop round (s) | app / plain |", "|---|---|---|---|"]
    for method in ("fedavg", "redgrape"):
        r = report[f"app_vs_plain_{method}"]
        lines.append(f"| {method}, 10 clients, 1 epoch | {r['app_round_s']:.1f} | {r['plain_round_s']:.1f} | "
                     f"{r['ratio']:.2f} |")
    lines += ["", "| local epochs | FedAvg round (s) | RedGrape round (s) | RedGrape / FedAvg |", "|---|---|---|---|"]
    for key, value in report.items():
        if key.startswith("redgrape_vs_fedavg_"):
            epochs = key.split("_")[3]
            lines.append(f"| {epochs} | {value['fedavg']:.1f} | {value['redgrape']:.1f} | {value['ratio']:.2f} |")
    lines += ["", "| virtual clients (10 per round) | round (s) | peak RSS, all processes (GiB) |", "|---|---|---|"]
    for clients, value in report["scale"].items():
        lines.append(f"| {clients} | {value['round_s']:.1f} | {value['peak_rss_gib']:.2f} |")
    lines += ["", f"Peak memory, largest federation vs 10 clients: {report['memory_ratio_largest_vs_10']:.2f}x", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
