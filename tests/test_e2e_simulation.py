"""End to end through Flower's real simulation engine (SuperLink + Ray), small; every method through the apps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from app_runs import run_app
from in_process import run_in_process
from wandb_reader import logged_history

from fedlt_app.precision import cpu_has_native_bf16

ROUNDS = 3


@pytest.fixture(scope="module")
def redgrape_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("e2e")
    with pytest.MonkeyPatch.context() as monkeypatch:
        code = run_app(
            tmp,
            monkeypatch,
            f"method='redgrape' num-server-rounds={ROUNDS} samples-per-class=150 imbalance-ratio=10.0 "
            f"local-epochs=2 local-lr=0.05 output-dir='{tmp / 'out'}' run-name='e2e' wandb-mode='offline' "
            "pictures=true",
        )
    assert code == 0
    return tmp / "out" / "e2e"


@pytest.mark.e2e
def test_metrics_written_every_round(redgrape_run: Path) -> None:
    rows = [json.loads(line) for line in (redgrape_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    for row in rows:
        assert {"accuracy", "tail_accuracy", "per_class_accuracy", "loss", "round_seconds", "bytes_up",
                "bytes_down"} <= row.keys()
        assert len(row["per_class_accuracy"]) == 10
        assert row["clients"] == [0, 1, 2] and row["failed_clients"] == []
        assert row["bytes_up"] > 0 and row["bytes_down"] > 0
        assert row["evaluate_seconds"] > 0 and len(row["client_train_seconds"]) == 3
    # every class has a global prototype once round 1 is aggregated
    assert all(r["classes_with_prototype"] == 10 for r in rows)
    # prototypes travel down from round 2 on: more than the model alone
    assert rows[1]["parameters_down"] > rows[0]["parameters_down"]
    assert rows[-1]["accuracy"] > 0.2  # chance is 0.1
    for picture in ("curves.png", "per_class.png", "partition.png"):  # drawn when the run ends (pictures=true)
        assert (redgrape_run / picture).stat().st_size > 0


@pytest.mark.e2e
def test_summary_holds_config_and_last10(redgrape_run: Path) -> None:
    summary = json.loads((redgrape_run / "summary.json").read_text())
    rows = [json.loads(line) for line in (redgrape_run / "metrics.jsonl").read_text().splitlines()]
    assert summary["status"] == "completed"
    assert summary["config"]["run_config"]["method"] == "redgrape"
    assert summary["final_accuracy"] == rows[-1]["accuracy"]
    assert summary["last10_accuracy"] == pytest.approx(sum(r["accuracy"] for r in rows) / len(rows))
    assert summary["last10_tail_accuracy"] == pytest.approx(sum(r["tail_accuracy"] for r in rows) / len(rows))


@pytest.mark.e2e
def test_offline_wandb_history_holds_per_round_accuracy(redgrape_run: Path) -> None:
    run_files = list((redgrape_run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    history = logged_history(run_files[0])
    rows = [json.loads(line) for line in (redgrape_run / "metrics.jsonl").read_text().splitlines()]
    assert [h["_step"] for h in history] == [r["round"] for r in rows]
    assert [h["accuracy"] for h in history] == pytest.approx([r["accuracy"] for r in rows])


@pytest.mark.e2e
def test_failed_run_is_a_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """flwr run exits 0 on a failed run; the launcher must not.

    The launcher's own config check is off, so the ServerApp's validation fails the run.
    """
    code = run_app(
        tmp_path, monkeypatch, f"dirichlet-alpha=-1.0 output-dir='{tmp_path / 'out'}'", num_clients=2, validate=False
    )
    assert code == 1
    assert not (tmp_path / "out").exists()


# The methods without a run test of their own, through the real ServerApp and ClientApp in process
# (tests/in_process.py): the apps' code is the engine's, minus Ray and the SuperLink, which the runs above and
# tests/test_e2e_reliability.py exercise. Every other method's test file runs it the same way (the CLIP methods
# on the tiny CLIP there); test_every_method_has_a_run_test below keeps the list complete.
METHOD_RUNS = [
    ("fedavg", ""),
    ("fedprox", "prox-mu=0.01"),
    ("focal", ""),
    ("fedlc", ""),
    ("ratio-loss", "ratio-aux-per-class=8"),
    ("climb", "climb-dual-lr=0.5"),
    ("creff", "creff-features-per-class=10 creff-match-steps=5 creff-retrain-epochs=5"),
    ("redgrape", "server-opt='fedadam' server-lr=0.01"),
    ("redgrape", "server-opt='fedavgm' server-lr=0.5"),
]


@pytest.mark.parametrize(("method", "extra"), METHOD_RUNS)
def test_every_method_runs_through_the_apps(
    method: str, extra: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = run_in_process(
        tmp_path,
        monkeypatch,
        f"method='{method}' {extra} num-server-rounds=2 samples-per-class=60 imbalance-ratio=10.0 "
        f"output-dir='{tmp_path / 'out'}' run-name='m'",
        num_clients=2,
    )
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "m" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    assert all(r["few_shot_accuracy"] is not None and "many_shot_accuracy" in r for r in rows)
    summary = json.loads((tmp_path / "out" / "m" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["config"]["run_config"]["method"] == method
    # where it computed: `device` (auto) resolved, beside the machine whose kernels decided its rounding
    assert summary["config"]["server_device"] == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.e2e
@pytest.mark.skipif(not cpu_has_native_bf16(),
                    reason="precision='bf16' needs a CPU with AVX-512 BF16 or AMX; this one would only emulate it")
def test_bf16_run_through_the_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A short RedGrape run in bf16: it trains (above chance) and records its precision."""
    code = run_app(
        tmp_path,
        monkeypatch,
        f"method='redgrape' precision='bf16' rebalance-step='combined' num-server-rounds=2 samples-per-class=150 "
        f"imbalance-ratio=10.0 local-epochs=2 output-dir='{tmp_path / 'out'}' run-name='bf16'",
        num_clients=2,
    )
    assert code == 0
    run_dir = tmp_path / "out" / "bf16"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # the plain loop reaches 0.26 in this setting by round 2 (chance: 0.10)
    assert [r["round"] for r in rows] == [1, 2] and rows[-1]["accuracy"] > 0.18
    config = json.loads((run_dir / "config.json").read_text())
    assert config["run_config"]["precision"] == "bf16" and config["server_precision"] == "bf16"


def test_every_method_has_a_run_test() -> None:
    """Each method value runs through the apps somewhere in the suite: in the list above or in its own file."""
    import ast

    from fedlt_app.methods import METHODS

    here = Path(__file__).parent
    listed = {method for method, _ in METHOD_RUNS}
    in_files = set()
    for path in here.glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("method='"):
                in_files.add(node.value.split("'")[1])
    assert set(METHODS) <= listed | in_files, sorted(set(METHODS) - listed - in_files)
