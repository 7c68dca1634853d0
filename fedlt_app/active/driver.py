"""The ServerApp's active-learning loop (``al-method`` fairfal, random or entropy).

Per cycle (FairFAL's main.py l.179-207), with cycle 0 labeled at random::

    cycle 0:   query.al_init      each client labels `initial` random samples
    cycle c≥1: query.fairfal_stats (fairfal only) → r_k, d_k; r̄ = mean r_k (frozen after the first query)
               query.al_select    each client labels `budget` more
    every cycle: a fresh model (al-reset-per-cycle), fl-rounds-per-cycle rounds of fedlt's
               federated training (any `method`, Flower's strategy via FedLTStrategy) on
               the labeled sets only, then the test accuracy of the final global model.

The query uses the global model at the end of the previous cycle. With
``checkpoint-every`` above 0 a checkpoint follows every cycle, and
``resume-from`` continues an interrupted run after its last finished cycle (see
:class:`CycleCheckpoint`). One line of metrics.jsonl per cycle: ``round`` is the cycle number (1-based). With
``al-cycle-curve`` the line also holds the cycle's curve (``cycle_accuracy``,
``cycle_tail_accuracy``: the global model's test accuracy after each of its
rounds), the measurement that shows whether ``fl-rounds-per-cycle`` lets every
cycle's model converge.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedlt_app.active import protocol
from fedlt_app.active.budget import BudgetPlan, budget_plan, capacity_problems
from fedlt_app.active.query import choose_models
from fedlt_app.checkpoint import check_resumable, load_checkpoint, save_checkpoint, save_final_model
from fedlt_app.config import ConfigError, RunConfig
from fedlt_app.configured_data import federated_data
from fedlt_app.data import FederatedData, tail_classes
from fedlt_app.discovery import discover_clients
from fedlt_app.methods import get_method
from fedlt_app.metrics import Evaluation, evaluate
from fedlt_app.models import EncoderClassifier
from fedlt_app.precision import precision_for
from fedlt_app.records import content_nbytes
from fedlt_app.results import RunRecorder, federation_info, pictures_line, run_directory
from fedlt_app.strategy import FedLTStrategy, server_optimizer
from fedlt_app.task import resolve_device

QUERY_TIMEOUT = 3600.0  # seconds per query pass, as Strategy.start's per-round timeout


class CycleStrategy(FedLTStrategy):
    """FedLTStrategy for one cycle: labeled-only training, run-wide round numbers, traffic totals.

    Rounds restart at 1 each cycle (so method hooks see a fresh start), but
    the clients get ``server-round`` = rounds of earlier cycles + round, so
    their shuffling and augmentation seeds never repeat across cycles.
    """

    def __init__(self, *args: Any, rounds_before: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rounds_before = rounds_before
        self.bytes_up = self.bytes_down = 0
        self.failed: list[int] = []

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        for message in messages:
            message.content["config"]["server-round"] = self.rounds_before + server_round
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        result = super().aggregate_train(server_round, replies)
        if self.current is not None:
            self.bytes_up += self.current.bytes_up
            self.bytes_down += self.current.bytes_down
            self.failed += [p for p in self.current.failed if p not in self.failed]
        return result


class Federation:
    """The clients by partition id, and round trips of custom query messages to all of them."""

    def __init__(self, grid: Grid, node_of_partition: Mapping[int, int]) -> None:
        self.grid = grid
        self.node_of_partition = dict(sorted(node_of_partition.items()))
        self.partition_of_node = {node: part for part, node in self.node_of_partition.items()}
        self.bytes_down = 0

    def ask(self, action: str, content: RecordDict) -> dict[int, MetricRecord]:
        """Send ``query.<action>`` with ``content`` to every client; their metrics by partition id."""
        messages = [
            Message(content, dst_node_id=node, message_type=f"{MessageType.QUERY}.{action}")
            for node in self.node_of_partition.values()
        ]
        self.bytes_down += content_nbytes(content) * len(messages)
        replies = list(self.grid.send_and_receive(messages, timeout=QUERY_TIMEOUT))
        answers: dict[int, MetricRecord] = {}
        for reply in replies:
            partition_id = self.partition_of_node[reply.metadata.src_node_id]
            if reply.has_error():
                raise RuntimeError(f"query.{action}: client {partition_id} failed: {reply.error.reason}")
            if reply.content.array_records:
                raise RuntimeError(f"query.{action}: client {partition_id} sent arrays; only scalars may leave")
            answers[partition_id] = reply.content["metrics"]
        missing = sorted(set(self.node_of_partition) - set(answers))
        if missing:
            raise RuntimeError(f"query.{action}: no reply from client(s) {missing} within {QUERY_TIMEOUT:.0f} s")
        return dict(sorted(answers.items()))


def _check_labeled(answers: dict[int, MetricRecord], expected: int, action: str) -> list[int]:
    sizes = [int(m["num-labeled"]) for m in answers.values()]
    wrong = [p for p, n in zip(answers, sizes, strict=True) if n != expected]
    if wrong:
        raise RuntimeError(f"query.{action}: client(s) {wrong} hold {sizes} labeled samples, expected {expected}")
    return sizes


def _class_counts(answers: dict[int, MetricRecord]) -> list[int] | None:
    reported = [m["queried-per-class"] for m in answers.values() if "queried-per-class" in m]
    if not reported:
        return None
    return [int(n) for n in np.sum(np.asarray(reported, dtype=np.int64), axis=0)]


@dataclass
class CycleCheckpoint:
    """What continuing an active-learning run after ``cycles_done`` finished cycles needs.

    The labeled sets live on the clients, and a resumed run is a new Flower run whose clients start
    with none; they never leave the clients either. So the server keeps what the queries were given
    (each finished cycle's global model) and replays the queries: every client redraws its initial
    set and re-runs each query on the same model with the same seeds, which rebuilds its labeled set
    without any index crossing the wire. Each replayed selection must match the digest the client
    reported the first time (``selection_digests``), so a replay that would label other samples (a
    different machine or library version) stops the run instead of continuing it on other data.
    Training is not replayed: the next cycle starts from the stored models, rounds and server RNG.
    """

    cycles_done: int
    rounds_done: int
    final_arrays: list[dict[str, np.ndarray]]  # the global model after each finished cycle
    digests: list[list[int]]  # the clients' selection digests of each finished cycle
    torch_rng: torch.Tensor

    KIND = "active-learning"

    def state(self, cfg: RunConfig) -> dict[str, Any]:
        return {"kind": self.KIND, "round": self.cycles_done, "run_config": cfg.as_dict(),
                "rounds_done": self.rounds_done, "final_arrays": self.final_arrays, "digests": self.digests,
                "torch_rng": self.torch_rng}

    @classmethod
    def load(cls, run_dir: Path, cfg: RunConfig) -> CycleCheckpoint:
        state = load_checkpoint(run_dir)
        if state.get("kind") != cls.KIND:
            raise ConfigError(f"resume-from: {run_dir} holds a federated run's checkpoint, not an active-learning one")
        check_resumable(state["run_config"], cfg.as_dict())
        return cls(int(state["round"]), int(state["rounds_done"]), state["final_arrays"], state["digests"],
                   state["torch_rng"])

    def arrays(self, cycle: int) -> ArrayRecord:
        return ArrayRecord({key: Array(value) for key, value in self.final_arrays[cycle].items()})


def _plan(cfg: RunConfig, data: FederatedData, num_clients: int) -> BudgetPlan:
    try:
        plan = budget_plan(len(data.train_indices), num_clients, cfg.al_query_ratio, cfg.al_end_ratio)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    problems = capacity_problems([len(part) for part in data.client_indices], plan)
    if problems:
        raise ConfigError(f"al-end-ratio: {problems[0]} ({len(problems)} client(s) too small); "
                          "use a smaller al-end-ratio or a partition with larger clients")
    return plan


def run_active_learning(grid: Grid, context: Context, cfg: RunConfig) -> None:
    """The ServerApp's main for ``al-method`` other than "none"."""
    device = resolve_device(cfg.device)
    precision = precision_for(cfg.precision, device)
    federation = Federation(grid, discover_clients(grid))
    num_clients = len(federation.node_of_partition)
    if cfg.clients_per_round > num_clients:
        raise ConfigError(f"clients-per-round: {cfg.clients_per_round} is more than the {num_clients} clients")
    data = federated_data(cfg, num_clients)
    plan = _plan(cfg, data, num_clients)
    tail = tail_classes(data.class_counts)
    test_images, test_labels = data.test_data()
    info = {**federation_info(num_clients, data.class_counts, data.client_indices, data.dataset.train_labels.numpy(),
                              tail, context.run_id),
            "active_learning": plan.as_dict(), "server_precision": precision.name}
    resumed: CycleCheckpoint | None = None
    if cfg.resume_from:
        run_dir = Path(cfg.resume_from).expanduser()
        resumed = CycleCheckpoint.load(run_dir, cfg)
        log(INFO, "[fedlt-al] resuming %s after cycle %d: replaying its queries", run_dir, resumed.cycles_done)
    else:
        default_name = f"{cfg.al_method}-{cfg.method}-{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}-{context.run_id}"
        run_dir = run_directory(cfg if cfg.run_name else replace(cfg, run_name=default_name), context.run_id)
    log(INFO, "[fedlt-al] %s: %d cycles, %d labels per client per cycle (N_train %d, %d clients) -> %s",
        cfg.al_method, plan.num_cycles, plan.per_client, plan.n_train, num_clients, run_dir)

    def evaluate_global(model: EncoderClassifier, strategy: CycleStrategy) -> Evaluation:
        return evaluate(strategy.server_method.evaluation_model(model), test_images, test_labels, cfg.dataset, tail,
                        data.class_counts, precision=precision)

    with RunRecorder(cfg, run_dir, info, resume_after=resumed.cycles_done if resumed else None,
                     pictures=cfg.pictures) as recorder:
        started = time.perf_counter()
        answers = federation.ask(protocol.INIT, RecordDict({"config": ConfigRecord({"initial": plan.initial})}))
        sizes = _check_labeled(answers, plan.initial, protocol.INIT)
        queried = {"num_queried": sum(sizes), "queried_per_class": _class_counts(answers)}
        labeled_per_class = queried["queried_per_class"]
        previous: ArrayRecord | None = None
        r_bar: float | None = None
        rounds_done = 0
        finished = CycleCheckpoint(0, 0, [], [], torch.get_rng_state())
        for cycle, target_ratio in enumerate(plan.ratios):
            query: dict[str, Any] = {}
            if cycle > 0:
                assert previous is not None
                query_started = time.perf_counter()
                query, r_bar, answers = _query(federation, cfg, plan, cycle, previous, r_bar)
                sizes = _check_labeled(answers, plan.labeled_after(cycle), protocol.SELECT)
                queried = {"num_queried": sum(int(m["num-queried"]) for m in answers.values()),
                           "queried_per_class": _class_counts(answers)}
                if labeled_per_class is not None and queried["queried_per_class"] is not None:
                    labeled_per_class = [a + b for a, b in zip(labeled_per_class, queried["queried_per_class"],
                                                               strict=True)]
                query["query_seconds"] = time.perf_counter() - query_started
            digests = [int(m["selection-digest"]) for m in answers.values()]
            if resumed is not None and cycle < resumed.cycles_done:  # a replayed query: same labels, no training
                if digests != resumed.digests[cycle]:
                    raise RuntimeError(
                        f"resume-from: the clients' replayed selections of cycle {cycle + 1} differ from the "
                        f"checkpointed run's (digests {digests} != {resumed.digests[cycle]}); it cannot be "
                        "continued on this machine or software")
                previous = resumed.arrays(cycle)
                rounds_done += cfg.fl_rounds_per_cycle
                if cycle == resumed.cycles_done - 1:
                    assert rounds_done == resumed.rounds_done
                    torch.set_rng_state(resumed.torch_rng)
                    finished = resumed
                    replayed = "cycle 1" if cycle == 0 else f"cycles 1-{cycle + 1}"
                    log(INFO, "[fedlt-al] replayed the queries of %s; training cycle %d", replayed, cycle + 2)
                started = time.perf_counter()
                continue

            model, strategy, previous, curve = _train_cycle(grid, cfg, data, federation, cycle, rounds_done, previous,
                                                            device, evaluate_global if cfg.al_cycle_curve else None)
            rounds_done += cfg.fl_rounds_per_cycle
            evaluation = evaluate_global(model, strategy)
            record = {
                "round": cycle + 1,
                "cycle": cycle + 1,
                "target_ratio": round(target_ratio, 6),
                "labeled_ratio": sum(sizes) / plan.n_train,
                "num_labeled": sum(sizes),
                **queried,
                "labeled_per_class": labeled_per_class,
                **evaluation.as_dict(),
                "train_loss": strategy.current.train_loss if strategy.current else None,
                "fl_rounds": rounds_done,
                "round_seconds": time.perf_counter() - started,
                "bytes_up": strategy.bytes_up,
                "bytes_down": strategy.bytes_down,
                "clients": list(federation.node_of_partition),
                "failed_clients": strategy.failed,
                "selection_digests": digests,
                **query,
                **curve,
            }
            recorder.log_round(record)
            log(INFO, "[fedlt-al] cycle %d/%d  labeled %.3f  accuracy %.4f  tail %.4f  (%.1f s)", cycle + 1,
                plan.num_cycles, record["labeled_ratio"], evaluation.accuracy, evaluation.tail_accuracy,
                record["round_seconds"])
            started = time.perf_counter()
            finished = CycleCheckpoint(cycle + 1, rounds_done,
                                       [*finished.final_arrays, {k: a.numpy() for k, a in previous.items()}],
                                       [*finished.digests, digests], torch.get_rng_state())
            if cfg.checkpoint_every:
                save_checkpoint(run_dir, finished.state(cfg), pause_after=cfg.debug_pause_after_checkpoint)
            if cycle == plan.num_cycles - 1:  # the last cycle's model, as the federated runs keep theirs
                save_final_model(run_dir, strategy.server_method.evaluation_model(model).travelling_state(),
                                 cfg.as_dict(), num_clients, rounds_done)
    summary = recorder.summary
    log(INFO, "[fedlt-al] done: final accuracy %.4f, mean over cycles %.4f -> %s",
        summary["final_accuracy"], summary["last10_accuracy"], run_dir)
    if recorder.pictures:
        log(INFO, "[fedlt-al] pictures: %s", pictures_line(recorder.pictures))


def _train_cycle(
    grid: Grid,
    cfg: RunConfig,
    data: FederatedData,
    federation: Federation,
    cycle: int,
    rounds_before: int,
    previous: ArrayRecord | None,
    device: torch.device,
    evaluate_round: Callable[[EncoderClassifier, CycleStrategy], Evaluation] | None = None,
) -> tuple[EncoderClassifier, CycleStrategy, ArrayRecord, dict[str, list[float]]]:
    """One cycle's federated training on the labeled sets; (global model, strategy, its arrays, its curve).

    With ``evaluate_round`` the global model is evaluated after every round and the curve holds its
    accuracy and tail accuracy per round (else the curve is empty).
    """
    model = protocol.cycle_initial_model(cfg, data, cycle if cfg.al_reset_per_cycle else 0).to(device)
    if previous is not None and not cfg.al_reset_per_cycle:
        model.load_state_dict(previous.to_torch_state_dict())
    strategy = CycleStrategy(
        inner=server_optimizer(cfg.server_opt, cfg.server_lr, cfg.server_momentum, cfg.local_lr),
        server_method=get_method(cfg.method).server(cfg, model, data),
        global_model=model,
        node_of_partition=federation.node_of_partition,
        clients_per_round=cfg.clients_per_round,
        seed=cfg.seed if cycle == 0 else protocol.stream_seed(cfg.seed, "cohorts", cycle),
        max_failure_fraction=cfg.max_failure_fraction,
        rounds_before=rounds_before,
    )
    curve: dict[str, list[float]] = {"cycle_accuracy": [], "cycle_tail_accuracy": []} if evaluate_round else {}

    def evaluate_fn(_: int, arrays: ArrayRecord) -> MetricRecord | None:
        if evaluate_round is None or strategy.current is None:  # Flower's round-0 call: the initial model
            return None
        model.load_state_dict(arrays.to_torch_state_dict())
        result = evaluate_round(model, strategy)
        curve["cycle_accuracy"].append(result.accuracy)
        curve["cycle_tail_accuracy"].append(result.tail_accuracy)
        return MetricRecord({"accuracy": result.accuracy, "tail-accuracy": result.tail_accuracy})

    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=cfg.fl_rounds_per_cycle,
        timeout=cfg.round_timeout,
        train_config=ConfigRecord({protocol.TRAIN_ON_LABELED: True}),
        evaluate_fn=evaluate_fn if evaluate_round else None,
    )
    model.load_state_dict(result.arrays.to_torch_state_dict())
    return model, strategy, result.arrays, curve


def _query(
    federation: Federation, cfg: RunConfig, plan: BudgetPlan, cycle: int, arrays: ArrayRecord, r_bar: float | None
) -> tuple[dict[str, Any], float | None, dict[int, MetricRecord]]:
    """One query step; returns its record fields, r̄, and the select replies."""
    bytes_before = federation.bytes_down
    record: dict[str, Any] = {}
    if cfg.al_method == "fairfal":
        stats = federation.ask(protocol.STATS, RecordDict({"arrays": arrays, "config": ConfigRecord({"cycle": cycle})}))
        r = [float(m["r"]) for m in stats.values()]
        d = [float(m["d"]) for m in stats.values()]
        if r_bar is None or not cfg.fairfal_freeze_global_ratio:
            r_bar = float(np.mean(r))
        choices = [choose_models(dk, r_bar, cfg.fairfal_t, cfg.fairfal_global_threshold,
                                 cfg.fairfal_gradnet_threshold) for dk in d]
        record = {
            "fairfal_r": r,
            "fairfal_d": d,
            "fairfal_r_bar": r_bar,
            "fairfal_global_uncertainty_clients": [p for p, c in zip(stats, choices, strict=True)
                                                   if c.uncertainty_global],
            "fairfal_global_gradient_model": bool(choices[0].gradient_global),
        }
    config = ConfigRecord({"cycle": cycle, "budget": plan.per_client, "r-bar": float(r_bar or 0.0)})
    content = RecordDict({"config": config} if cfg.al_method == "random" else {"arrays": arrays, "config": config})
    answers = federation.ask(protocol.SELECT, content)
    record["query_bytes_down"] = federation.bytes_down - bytes_before
    return record, r_bar, answers
