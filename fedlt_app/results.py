"""Where a run's results go: metrics.jsonl as rounds finish, summary.json, W&B.

Every round is appended and flushed to disk the moment it is evaluated, so a
run killed in round 90 still leaves 89 valid lines.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from fedlt_app.config import ConfigError, RunConfig

LAST_ROUNDS = 10  # the paper reports the mean over the last 10 rounds


def run_directory(cfg: RunConfig, run_id: int) -> Path:
    name = cfg.run_name or f"{cfg.method}-{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}-{run_id}"
    run_dir = Path(cfg.output_dir).expanduser() / name
    if (run_dir / "metrics.jsonl").exists():
        raise ConfigError(f"run-name: {run_dir} already holds results; choose another run-name or output-dir")
    return run_dir


def federation_info(num_clients: int, class_counts: list[int], client_indices: list, tail: list[int],
                    run_id: int) -> dict[str, Any]:
    """The facts of a run's federation that config.json keeps next to the run config.

    Recorded so a result can be read without re-deriving the long-tail cut and the partition.
    """
    return {
        "num_clients": num_clients,
        "class_counts": list(class_counts),
        "client_sizes": [len(idx) for idx in client_indices],
        "tail_classes": tail,
        "flower_run_id": run_id,
    }


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Final and last-10-round mean accuracy and tail accuracy."""
    if not rounds:
        return {"rounds": 0}
    last = rounds[-LAST_ROUNDS:]
    return {
        "rounds": len(rounds),
        "final_accuracy": rounds[-1]["accuracy"],
        "final_tail_accuracy": rounds[-1]["tail_accuracy"],
        "last10_accuracy": sum(r["accuracy"] for r in last) / len(last),
        "last10_tail_accuracy": sum(r["tail_accuracy"] for r in last) / len(last),
        "total_seconds": sum(r["round_seconds"] for r in rounds),
    }


class RunRecorder:
    """Writes one run's results; a context manager so W&B is always closed."""

    def __init__(self, cfg: RunConfig, run_dir: Path, info: dict[str, Any], resume_after: int | None = None) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.rounds: list[dict[str, Any]] = []
        self.status = "running"
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_after is not None:
            self.rounds = self._rounds_up_to(resume_after)
        self.config = {"run_config": cfg.as_dict(), **info}
        (run_dir / "config.json").write_text(json.dumps(self.config, indent=2))
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
            config=self.config,
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
        tmp.write_text(json.dumps(self.summary, indent=2))
        tmp.replace(self.run_dir / "summary.json")
        if self._wandb is not None:
            self._wandb.summary.update({k: v for k, v in self.summary.items() if k != "config"})
            self._wandb.finish(exit_code=0 if status == "completed" else 1)
        return self.summary
