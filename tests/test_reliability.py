"""Failure policy, reply-order independence and checkpoint round trips, without Ray."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from test_strategy import (  # the strategy tests' message builders
    error_reply,
    make_grid,
    make_strategy,
    model_arrays,
    random_protos,
    reply,
    to_record,
)

from fedlt_app.checkpoint import (
    check_resumable,
    check_schedule_kept,
    load_checkpoint,
    optimizer_state,
    restore_optimizer_state,
    save_checkpoint,
)
from fedlt_app.config import resolve
from fedlt_app.methods import get_method
from fedlt_app.results import RunRecorder
from fedlt_app.server_app import checkpoint_state, restore, round_plan
from fedlt_app.strategy import ClientFailures
from fedlt_app.swa import WeightAverage

pytestmark = pytest.mark.usefixtures("task_identity")  # tests/conftest.py: Messages need a run identity


def start_round(strategy, server_round: int, theta: dict) -> list[int]:  # type: ignore[no-untyped-def]
    strategy.configure_train(server_round, to_record(theta), ConfigRecord(), make_grid())
    return strategy.current.cohort


def test_a_client_that_never_answers_counts_as_failed() -> None:
    strategy = make_strategy(method="fedavg", clients_per_round=4, max_failure_fraction=0.5)
    theta = model_arrays(np.random.default_rng(0))
    cohort = start_round(strategy, 1, theta)
    replies = [reply(p, theta, 10, 1.0) for p in cohort[:3]]  # the fourth timed out
    strategy.aggregate_train(1, replies)
    assert strategy.current.failed == [cohort[3]]


def test_failures_above_the_threshold_stop_the_run() -> None:
    strategy = make_strategy(method="fedavg", clients_per_round=4, max_failure_fraction=0.5)
    theta = model_arrays(np.random.default_rng(0))
    cohort = start_round(strategy, 1, theta)
    replies = [reply(cohort[0], theta, 10, 1.0), error_reply(cohort[1]), error_reply(cohort[2])]
    with pytest.raises(ClientFailures, match=r"3 of 4 clients failed .*max-failure-fraction=0.5"):
        strategy.aggregate_train(1, replies)


def test_failures_at_the_threshold_are_tolerated_and_prototypes_come_from_the_others() -> None:
    rng = np.random.default_rng(1)
    strategy = make_strategy(clients_per_round=4, max_failure_fraction=0.5)
    theta = model_arrays(rng)
    cohort = start_round(strategy, 1, theta)
    protos = [random_protos(rng, [0, 1]) for _ in range(2)]
    replies = [reply(cohort[0], theta, 10, 1.0, protos[0]), reply(cohort[1], theta, 30, 1.0, protos[1]),
               error_reply(cohort[2])]
    strategy.aggregate_train(1, replies)
    assert strategy.current.failed == [cohort[2], cohort[3]]
    np.testing.assert_allclose(strategy.server_method.weight[:2], (protos[0][1] + protos[1][1]) / 2, rtol=1e-6)


def test_aggregation_does_not_depend_on_reply_arrival_order() -> None:
    rng = np.random.default_rng(2)
    thetas = [model_arrays(rng) for _ in range(5)]
    protos = [random_protos(rng, [0, 1, 2, 3]) for _ in range(5)]
    results = []
    for order in ([0, 1, 2, 3, 4], [4, 2, 0, 3, 1]):
        strategy = make_strategy(clients_per_round=5)
        cohort = start_round(strategy, 1, thetas[0])
        replies = [reply(cohort[i], thetas[i], 7 + 13 * i, 1.0, protos[i]) for i in order]
        arrays, _ = strategy.aggregate_train(1, replies)
        results.append(({k: a.numpy() for k, a in arrays.items()}, strategy.server_method.weight.copy()))
    for key in results[0][0]:
        assert np.array_equal(results[0][0][key], results[1][0][key])  # bitwise
    assert np.array_equal(results[0][1], results[1][1])


@pytest.mark.parametrize("server_opt", ["fedavgm", "fedadam"])
def test_server_optimizer_state_round_trips_through_a_checkpoint(server_opt: str, tmp_path: Path) -> None:
    """Two rounds, checkpoint, a fresh strategy restored from it: round 3 is identical."""
    rng = np.random.default_rng(3)
    thetas = [model_arrays(rng) for _ in range(3 * 3)]
    protos = [random_protos(rng, [0, 2]) for _ in range(9)]

    def play(strategy, rounds, arrays):  # type: ignore[no-untyped-def]
        for r in rounds:
            cohort = start_round(strategy, r, arrays)
            replies = [reply(p, thetas[3 * (r - 1) + i], 5 + i, 1.0, protos[3 * (r - 1) + i])
                       for i, p in enumerate(cohort)]
            out, _ = strategy.aggregate_train(r, replies)
            arrays = {k: a.numpy() for k, a in out.items()}
        return arrays

    straight = make_strategy(clients_per_round=3, server_opt=server_opt, server_lr=0.1)
    reference = play(straight, [1, 2, 3], thetas[0])

    first = make_strategy(clients_per_round=3, server_opt=server_opt, server_lr=0.1)
    after_two = play(first, [1, 2], thetas[0])
    save_checkpoint(tmp_path, {"optimizer": optimizer_state(first.inner), "method": first.server_method.state_dict()})
    state = load_checkpoint(tmp_path)
    second = make_strategy(clients_per_round=3, server_opt=server_opt, server_lr=0.1)
    restore_optimizer_state(second.inner, state["optimizer"])
    second.server_method.load_state_dict(state["method"])
    resumed = play(second, [3], after_two)
    for key in reference:
        np.testing.assert_array_equal(resumed[key], reference[key])


def test_resume_refuses_a_different_config() -> None:
    saved = resolve({}).as_dict()
    check_resumable(saved, resolve({"num-server-rounds": 40, "resume-from": "x"}).as_dict())  # allowed changes
    with pytest.raises(ValueError, match="resume-from: .*local-lr"):
        check_resumable(saved, resolve({"local-lr": 0.5}).as_dict())


def test_resume_refuses_a_new_round_count_that_moves_a_finished_rounds_schedule() -> None:
    """Growing num-server-rounds is allowed only while every finished round keeps what it did."""
    plan = partial(round_plan, get_method("fedavg").server)
    decayed = {"lr-decay": 0.1, "lr-decay-after": 0.75}
    saved, longer = resolve({**decayed, "num-server-rounds": 100}), resolve({**decayed, "num-server-rounds": 150})
    check_schedule_kept(saved, longer, 76, plan)  # the 100-round run decays from round 77: 1-76 as in a 150-round run
    with pytest.raises(ValueError, match=r"100 -> 150 changes round 77, .*\(lr-decay, lr-decay-after\) 0.005 -> 0.05"):
        check_schedule_kept(saved, longer, 77, plan)
    check_schedule_kept(resolve({"num-server-rounds": 100}), resolve({"num-server-rounds": 150}), 100, plan)  # no decay

    rucr = {"method": "rucr", "rucr-crt-rounds": 4}  # rectifies rounds 96-100 of 100 and asks no class means after 100
    plan = partial(round_plan, get_method("rucr").server)
    saved, longer = resolve({**rucr, "num-server-rounds": 100}), resolve({**rucr, "num-server-rounds": 150})
    check_schedule_kept(saved, longer, 95, plan)
    with pytest.raises(ValueError, match=r"round 96, .*rectification \(rucr-crt-rounds\) True -> False"):
        check_schedule_kept(saved, longer, 100, plan)

    ccvr = {"method": "ccvr", "ccvr-calibrate": "final"}
    plan = partial(round_plan, get_method("ccvr").server)
    saved, longer = resolve({**ccvr, "num-server-rounds": 100}), resolve({**ccvr, "num-server-rounds": 150})
    check_schedule_kept(saved, longer, 99, plan)
    with pytest.raises(ValueError, match=r"round 100, .*calibration \(ccvr-calibrate\) True -> False"):
        check_schedule_kept(saved, longer, 100, plan)


def test_restore_checks_the_schedule_of_the_finished_rounds(tmp_path: Path) -> None:
    """server_app.restore applies the check: a grown run is resumed only where no finished round moves."""
    decayed = {"method": "redgrape", "lr-decay": 0.1, "lr-decay-after": 0.5}
    strategy = make_strategy()
    saved = resolve({**decayed, "num-server-rounds": 4})
    arrays = ArrayRecord(strategy.global_model.travelling_state())
    # finished; round 4 (past 2 of 4) decayed
    save_checkpoint(tmp_path, checkpoint_state(strategy, saved, 4, arrays, WeightAverage(0)))
    with pytest.raises(ValueError, match="num-server-rounds 4 -> 8 changes round 4"):  # decays past 4 of 8
        restore(make_strategy(), resolve({**decayed, "num-server-rounds": 8}), tmp_path, WeightAverage(0))
    done, _ = restore(make_strategy(), resolve({**decayed, "num-server-rounds": 5}), tmp_path, WeightAverage(0))
    assert done == 4  # past 2 of 5


def test_checkpoint_write_is_atomic(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, {"round": 1, "x": torch.ones(3)})
    save_checkpoint(tmp_path, {"round": 2, "x": torch.zeros(3)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    assert load_checkpoint(tmp_path)["round"] == 2
    with pytest.raises(FileNotFoundError, match="resume-from"):
        load_checkpoint(tmp_path / "missing")


def test_a_resumed_run_records_which_machine_computed_which_rounds(tmp_path: Path) -> None:
    """A run continued in a later session may compute on another CPU: config.json keeps the machine it started
    on with the rounds it computed, and each resume's machine from the round it took over."""
    cfg = resolve({})
    first, second = {"cpu": "A", "cpu_capability": "AVX2"}, {"cpu": "A", "cpu_capability": "AVX512"}
    with RunRecorder(cfg, tmp_path, {"server_machine": first}) as recorder:
        for r in (1, 2, 3):
            recorder.log_round({"round": r, "accuracy": 0.1, "tail_accuracy": 0.0, "round_seconds": 1.0,
                                "per_class_accuracy": [0.0]})
    assert "machine_history" not in json.loads((tmp_path / "config.json").read_text())  # never resumed
    with RunRecorder(cfg, tmp_path, {"server_machine": second}, resume_after=2):
        pass
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["server_machine"] == second
    assert config["machine_history"] == [{"from_round": 1, "server_machine": first},
                                         {"from_round": 3, "server_machine": second}]
    with RunRecorder(cfg, tmp_path, {"server_machine": first}, resume_after=1):  # from round 1 on: all on `first`
        pass
    assert json.loads((tmp_path / "config.json").read_text())["machine_history"] == [
        {"from_round": 1, "server_machine": first}]


def test_recorder_resume_keeps_checkpointed_rounds_and_drops_a_torn_line(tmp_path: Path) -> None:
    cfg = resolve({})
    rows = [{"round": r, "accuracy": r / 10, "tail_accuracy": 0.0, "round_seconds": 1.0,
             "per_class_accuracy": [0.0]} for r in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"round": 4, "acc')
    with RunRecorder(cfg, tmp_path, {}, resume_after=2) as recorder:
        recorder.log_round({**rows[2], "accuracy": 0.9})
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2, 3] and lines[2]["accuracy"] == 0.9
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final_accuracy"] == 0.9 and summary["rounds"] == 3
