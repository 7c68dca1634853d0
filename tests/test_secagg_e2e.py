"""secure-aggregation=secagg end to end: one client failing in training through Flower's real simulation engine;
RedGrape, GRAPE-LA, CReFF, FedNH (unweighted mean, per-class sums, the masked personalised accuracy) and MOON
(client state across masked rounds) through the real apps in process (tests/in_process.py)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
from app_runs import metrics_rows, run_app
from in_process import run_in_process


def secure_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_config: str, num_clients: int,
                engine: Callable[..., int] = run_in_process) -> list[dict]:
    """A tiny 2-round secagg run, which must complete; its metrics rows."""
    code = engine(
        tmp_path, monkeypatch,
        f"secure-aggregation='secagg' num-server-rounds=2 samples-per-class=60 imbalance-ratio=10.0 {run_config} "
        f"output-dir='{tmp_path}' run-name='s'",
        num_clients=num_clients,
    )
    assert code == 0
    rows = metrics_rows(tmp_path / "s")
    assert [r["round"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["train_loss"]) for r in rows)
    return rows


@pytest.mark.e2e
def test_secagg_run_with_a_failing_client_completes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = secure_rows(tmp_path, monkeypatch, "method='fedavg' debug-fail-partitions='1'", num_clients=4,
                       engine=run_app)
    assert all(r["failed_clients"] == [1] and r["accuracy"] > 0 for r in rows)


def test_secagg_redgrape_run_sums_prototypes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """RedGrape's prototypes travel as masked per-class sums and holder counts; round 2 broadcasts the store."""
    rows = secure_rows(tmp_path, monkeypatch, "method='redgrape'", num_clients=3)
    assert all(r["failed_clients"] == [] for r in rows)
    assert rows[-1]["classes_with_prototype"] == 10
    assert rows[1]["parameters_down"] > rows[0]["parameters_down"]  # the global prototypes go down in round 2
    assert all(r["parameters_up"] > 0 for r in rows)  # the masked values that went up, not 0


def test_secagg_grape_la_run_sums_prototypes_and_class_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GRAPE-LA: RedGrape's masked prototype sums plus the cohort's summed class counts (its global prior)."""
    rows = secure_rows(tmp_path, monkeypatch, "method='grape-la'", num_clients=3)
    assert all(r["failed_clients"] == [] for r in rows)
    assert rows[-1]["classes_with_prototype"] == 10
    assert rows[1]["parameters_down"] > rows[0]["parameters_down"]  # the store and the prior go down in round 2
    assert all(r["accuracy"] > 0 for r in rows)


def test_secagg_creff_run_matches_the_summed_real_gradients(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CReFF: the per-class real gradients travel as masked sums and holder counts; the server's features match
    their means every round."""
    rows = secure_rows(tmp_path, monkeypatch,
                       "method='creff' creff-features-per-class=10 creff-match-steps=10 creff-retrain-epochs=5",
                       num_clients=3)
    assert all(r["failed_clients"] == [] for r in rows)
    assert all(math.isfinite(r["creff_match_loss"]) for r in rows)
    assert all(r["accuracy"] > 0 for r in rows)


def test_secagg_fednh_run_reveals_only_the_mean_personalised_accuracy(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """FedNH: weight 1 per client, the per-class semantics summed, the personalised accuracy as a masked sum
    (its cohort mean; no per-client values)."""
    rows = secure_rows(tmp_path, monkeypatch, "method='fednh'", num_clients=3)
    assert all(r["failed_clients"] == [] for r in rows)
    assert all(r["fednh_updated_classes"] == 10 for r in rows)
    assert all(0 <= r["personalised_accuracy"] <= 1 for r in rows)
    assert all("personalised_accuracy_per_client" not in r for r in rows)


def test_secagg_moon_run_keeps_previous_models_and_sums_the_term(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """MOON: each node's previous local model persists across masked rounds (its own context.state), so every
    client contrasts in round 2; the server learns only how many did and the sum of their terms."""
    rows = secure_rows(tmp_path, monkeypatch, "method='moon'", num_clients=3)
    assert all(r["failed_clients"] == [] for r in rows)
    assert [r["moon_clients_with_previous"] for r in rows] == [0, 3]
    assert rows[0]["moon_contrastive_loss"] == 0.0 and rows[1]["moon_contrastive_loss"] > 0
