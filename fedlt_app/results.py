"""Where a run's results go: metrics.jsonl as rounds finish, summary.json, W&B.

Every round is appended and flushed to disk the moment it is evaluated, so a
run killed in round 90 still leaves 89 valid lines.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedlt_app.config import ConfigError, RunConfig

LAST_ROUNDS = 10  # the paper reports the mean over the last 10 rounds
# metrics.jsonl fields that are wall-clock measurements: the only ones two runs of one seed may differ in.
TIMING_FIELDS = ("round_seconds", "evaluate_seconds", "client_train_seconds")
# A list of numbers as json.dumps indents it: its line breaks cannot be inside a string (those are escaped).
_FLAT_LIST = re.compile(r"\[\n([^\[\]{}\"]*)\n\s*\]")


def json_text(obj: Any) -> str:
    """Indented JSON with each list of numbers on one line.

    ``client_class_counts`` holds clients × classes numbers; one per line
    would make config.json thousands of lines long, one client per line reads
    like the matrix it is.
    """
    return _FLAT_LIST.sub(lambda m: "[" + " ".join(m.group(1).split()) + "]", json.dumps(obj, indent=2))


def run_directory(cfg: RunConfig, run_id: int) -> Path:
    name = cfg.run_name or f"{cfg.method}-{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}-{run_id}"
    run_dir = Path(cfg.output_dir).expanduser() / name
    if (run_dir / "metrics.jsonl").exists():
        raise ConfigError(f"run-name: {run_dir} already holds results; choose another run-name or output-dir")
    return run_dir


def federation_info(num_clients: int, class_counts: Sequence[int], client_indices: Sequence[np.ndarray],
                    labels: np.ndarray, tail: list[int], run_id: int) -> dict[str, Any]:
    """The facts of a run's federation that config.json keeps next to the run config.

    Recorded so a result can be read without re-deriving the long-tail cut and the partition.
    ``labels`` are the data set's training labels, which ``client_indices`` index.
    """
    return {
        "num_clients": num_clients,
        "class_counts": list(class_counts),
        "client_sizes": [len(idx) for idx in client_indices],
        "client_class_counts": client_class_counts(client_indices, labels, len(class_counts)),
        "tail_classes": tail,
        "flower_run_id": run_id,
        "server_machine": machine_info(),
    }


def machine_history(run_dir: Path, resume_after: int, machine: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Which machine computed which rounds (cycles), for a run continued with ``resume-from``: the written
    ``config.json``'s history (or its one machine, from round 1) cut at ``resume_after``, then ``machine`` from
    the next round. A resumed run may compute on another CPU than it started on (a later session's machine),
    and its digits after the resume then carry that machine's rounding; empty when nothing was recorded."""
    try:
        written = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return []
    history = written.get("machine_history") or (
        [{"from_round": 1, "server_machine": written["server_machine"]}] if written.get("server_machine") else [])
    history = [h for h in history if h["from_round"] <= resume_after]
    if machine is not None and (not history or history[-1]["server_machine"] != machine):
        history.append({"from_round": resume_after + 1, "server_machine": machine})
    return history


def machine_info() -> dict[str, Any]:
    """The server process's machine: what decides float rounding, so two runs' digits can be compared.

    fp32 runs replay to the digit on machines whose CPUs pick the same kernels; on another CPU the first
    round's loss can differ in the 7th digit, and training amplifies that (README "Converged results").
    In a simulation every client runs on this machine too.
    """
    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the kernels torch dispatches to: AVX2, AVX512...
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def client_class_counts(client_indices: Sequence[np.ndarray], labels: np.ndarray, num_classes: int) -> list[list[int]]:
    """Training samples of each class per client (clients × classes), the matrix a split's figure shows.

    Every partition gives each sample of the long-tailed set to exactly one
    client, so the columns sum to ``class_counts``. For a node training on its
    own files (``local-data``) it is, like ``client_sizes``, the partition the
    run config describes, not the node's files.
    """
    return [np.bincount(labels[np.asarray(idx, dtype=np.int64)], minlength=num_classes).tolist()
            for idx in client_indices]


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Final and last-10-round mean accuracy and tail accuracy."""
    if not rounds:
        return {"rounds": 0}
    last = rounds[-LAST_ROUNDS:]
    personal = {"final_personalised_accuracy": rounds[-1]["personalised_accuracy"]} \
        if "personalised_accuracy" in rounds[-1] else {}  # methods with personal parts (FedETF: fine-tuned)
    return {
        "rounds": len(rounds),
        "final_accuracy": rounds[-1]["accuracy"],
        "final_tail_accuracy": rounds[-1]["tail_accuracy"],
        "last10_accuracy": sum(r["accuracy"] for r in last) / len(last),
        "last10_tail_accuracy": sum(r["tail_accuracy"] for r in last) / len(last),
        **personal,
        "total_seconds": sum(r["round_seconds"] for r in rounds),
    }


def draw_pictures(run_dir: Path, log: Callable[[str], None] = print) -> list[Path]:
    """The run's pictures (see :mod:`fedlt_app.run_plots`); never raises.

    A finished run's results are on disk before this is called, so a plotting
    error must not turn a completed run into a failed one: it is logged instead.
    """
    try:
        from fedlt_app.run_plots import draw_run  # matplotlib only when a run ends

        return draw_run(run_dir, log=log)
    except Exception as err:  # noqa: BLE001 - any plotting error: the results stand without pictures
        log(f"[fedlt] pictures skipped: {type(err).__name__}: {err}")
        return []


def pictures_line(paths: Sequence[Path]) -> str:
    """'<run_dir>/curves.png, per_class.png, partition.png': where a run's pictures are, in one line."""
    return ", ".join([str(paths[0]), *(p.name for p in paths[1:])]) if paths else "none"


class RunRecorder:
    """Writes one run's results; a context manager so W&B is always closed.

    ``pictures=False`` skips drawing the run's pictures when it finishes (for
    tests that write many runs; ``fedlt-report`` draws them later).
    """

    def __init__(self, cfg: RunConfig, run_dir: Path, info: dict[str, Any], resume_after: int | None = None,
                 pictures: bool = True) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.rounds: list[dict[str, Any]] = []
        self.status = "running"
        self.draw = pictures
        self.pictures: list[Path] = []  # written by finish()
        run_dir.mkdir(parents=True, exist_ok=True)
        self.config = {"run_config": cfg.as_dict(), **info}
        if resume_after is not None:
            self.rounds = self._rounds_up_to(resume_after)
            history = machine_history(run_dir, resume_after, info.get("server_machine"))
            if history:
                self.config["machine_history"] = history
        (run_dir / "config.json").write_text(json_text(self.config))
        self._metrics = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        self._wandb = self._start_wandb() if cfg.wandb_mode != "disabled" else None

    def _rounds_up_to(self, last_round: int) -> list[dict[str, Any]]:
        """Keep the rounds a checkpoint covers; later ones are recomputed by the resumed run."""
        path = self.run_dir / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        kept = []
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # the line a killed run was writing
                continue
            if row["round"] <= last_round:
                kept.append(row)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
        tmp.replace(path)
        return kept

    def _start_wandb(self):  # type: ignore[no-untyped-def]
        import wandb  # only a run that logs to W&B pays for the import

        return wandb.init(
            project=self.cfg.wandb_project,
            name=self.run_dir.name,
            dir=str(self.run_dir),
            mode=self.cfg.wandb_mode,
            config={k: v for k, v in self.config.items() if k != "client_class_counts"},  # a table, not a setting
        )

    def __enter__(self) -> RunRecorder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:  # type: ignore[no-untyped-def]
        self.finish("completed" if exc_type is None else "failed")

    def log_round(self, record: dict[str, Any]) -> None:
        self.rounds.append(record)
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        os.fsync(self._metrics.fileno())
        if self._wandb is not None:
            scalars = {k: v for k, v in record.items() if isinstance(v, int | float) and k != "round"}
            scalars.update({f"class_accuracy/{c}": a for c, a in enumerate(record["per_class_accuracy"])})
            self._wandb.log(scalars, step=record["round"])

    def finish(self, status: str) -> dict[str, Any]:
        if self.status != "running":
            return self.summary
        self.status = status
        self._metrics.close()
        self.summary = {"status": status, **summarize(self.rounds), "config": self.config}
        tmp = self.run_dir / "summary.json.tmp"
        tmp.write_text(json_text(self.summary))
        tmp.replace(self.run_dir / "summary.json")
        if self._wandb is not None:
            self._wandb.summary.update({k: v for k, v in self.summary.items() if k != "config"})
            self._wandb.finish(exit_code=0 if status == "completed" else 1)
        if self.draw and self.rounds:  # completed or failed: whatever rounds were evaluated
            self.pictures = draw_pictures(self.run_dir)
        return self.summary
