"""lr-decay: the clients' learning rate per round (FairFAL's code: x0.1 after 3/4 of each cycle's rounds), from
the config, through the ClientApp's optimizer and method steps, into metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from in_process import run_in_process

from fedlt_app import client_app
from fedlt_app.config import ConfigError, resolve


def test_the_decay_starts_after_the_fraction_of_the_rounds_as_fairfals_code() -> None:
    cfg = resolve({"local-lr": 0.01, "lr-decay": 0.1, "num-server-rounds": 100})
    lrs = [cfg.local_lr_at(r) for r in range(1, 101)]
    # the code: for round in range(100): lr x 0.1 once round > int(0.75 * 100), i.e. rounds 77..100 from 1
    assert lrs[:76] == [0.01] * 76 and lrs[76:] == pytest.approx([0.001] * 24)
    assert resolve({"local-lr": 0.01}).local_lr_at(100) == 0.01  # lr-decay 1: constant


def test_in_active_learning_each_cycle_restarts_the_schedule() -> None:
    cfg = resolve({"preset": "fairfal-fmnist-lt-cnn4conv"})  # 60 rounds per cycle, lr 0.01, decay 0.1
    assert cfg.lr_decay == 0.1 and cfg.fl_rounds_per_cycle == 60
    for cycle in range(3):  # the clients get the run-wide round: earlier cycles' rounds + this cycle's
        first = cycle * 60
        assert cfg.local_lr_at(first + 1) == cfg.local_lr_at(first + 46) == 0.01
        assert cfg.local_lr_at(first + 47) == cfg.local_lr_at(first + 60) == pytest.approx(0.001)


@pytest.mark.parametrize(("key", "value"), [("lr-decay", 0.0), ("lr-decay", 1.5), ("lr-decay-after", 1.2)])
def test_bad_values_name_the_key(key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=key):
        resolve({key: value})


def test_the_clients_train_and_the_server_logs_at_the_rounds_lr(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    used: list[tuple[float, float]] = []  # (optimizer lr, the lr RedGrape's step reads), per client and round
    real = client_app.train_locally

    def spy(model, images, labels, method, setup, generator):
        used.append((setup.lr, method.cfg.local_lr))
        return real(model, images, labels, method, setup, generator)

    monkeypatch.setattr(client_app, "train_locally", spy)
    code = run_in_process(
        tmp_path, monkeypatch,
        "method='redgrape' num-server-rounds=3 local-lr=0.04 lr-decay=0.25 lr-decay-after=0.34 samples-per-class=20 "
        f"imbalance-ratio=5.0 output-dir='{tmp_path / 'out'}' run-name='lr'",
        num_clients=2,
    )
    assert code == 0
    # 3 rounds, fraction 0.34: floor(1.02) = 1, so rounds 1 and 2 at 0.04 and round 3 at 0.01, on both clients
    assert [lr for pair in used for lr in pair] == pytest.approx([0.04] * 8 + [0.01] * 4)
    rows = [json.loads(line) for line in (tmp_path / "out" / "lr" / "metrics.jsonl").read_text().splitlines()]
    assert [r["local_lr"] for r in rows] == pytest.approx([0.04, 0.04, 0.01])
