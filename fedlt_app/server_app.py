"""fedlt ServerApp: discover clients, run the strategy, evaluate, record."""

from __future__ import annotations

import dataclasses
import time
from functools import partial
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedlt_app.active.driver import run_active_learning
from fedlt_app.checkpoint import (
    FINAL_MODEL_FILE,
    check_resumable,
    check_schedule_kept,
    load_checkpoint,
    optimizer_state,
    restore_optimizer_state,
    save_checkpoint,
    save_final_model,
)
from fedlt_app.client_state import persisted_state_config
from fedlt_app.config import ConfigError, RunConfig, resolve
from fedlt_app.configured_data import federated_data
from fedlt_app.data import tail_classes
from fedlt_app.discovery import discover_clients
from fedlt_app.generative.phase import generate_on_clients
from fedlt_app.methods import get_method
from fedlt_app.methods.base import ServerMethod
from fedlt_app.metrics import Evaluation, evaluate
from fedlt_app.models import EncoderClassifier
from fedlt_app.precision import precision_for
from fedlt_app.results import RunRecorder, federation_info, pictures_line, run_directory
from fedlt_app.secagg.flower_server import SecureRounds
from fedlt_app.strategy import FedLTStrategy, masked_metrics, server_optimizer
from fedlt_app.swa import WeightAverage
from fedlt_app.task import initial_model, resolve_device

app = ServerApp()


def checkpoint_state(strategy: FedLTStrategy, cfg: RunConfig, server_round: int, arrays: ArrayRecord,
                     weight_average: WeightAverage) -> dict:
    return {
        "round": server_round,
        "run_config": cfg.as_dict(),
        "arrays": {key: array.numpy() for key, array in arrays.items()},
        "optimizer": optimizer_state(strategy.inner),
        "method": strategy.server_method.state_dict(),
        "swa": weight_average.state_dict(),
        "torch_rng": torch.get_rng_state(),
    }


def round_plan(server: type[ServerMethod], cfg: RunConfig, server_round: int) -> dict[str, Any]:
    """What round ``server_round`` does that depends on ``num-server-rounds``: the shared loop's learning rate
    and the method's own (:meth:`ServerMethod.round_plan`)."""
    return {"local learning rate (lr-decay, lr-decay-after)": cfg.local_lr_at(server_round),
            **server.round_plan(cfg, server_round)}


def restore(strategy: FedLTStrategy, cfg: RunConfig, run_dir: Path,
            weight_average: WeightAverage) -> tuple[int, ArrayRecord]:
    """Load a checkpoint into the strategy; returns the last finished round and the arrays it ended with.

    Those arrays, not the model's copy, start the resumed run: a server optimizer's output may be
    float64 (FedAdam's), and FedAdam restarts its step from what it sends, so restarting from the
    model's float32 copy would move every later round off the uninterrupted run's.
    """
    state = load_checkpoint(run_dir)
    check_resumable(state["run_config"], cfg.as_dict())
    saved = dataclasses.replace(cfg, num_server_rounds=int(state["run_config"]["num-server-rounds"]))
    check_schedule_kept(saved, cfg, int(state["round"]), partial(round_plan, type(strategy.server_method)))
    arrays = ArrayRecord({k: Array(v) for k, v in state["arrays"].items()})
    strategy.global_model.load_travelling_state(arrays.to_torch_state_dict())
    restore_optimizer_state(strategy.inner, state["optimizer"])
    strategy.server_method.load_state_dict(state["method"])
    if "swa" in state:  # checkpoints from before swa-start existed hold none (and ran without it)
        weight_average.load_state_dict(state["swa"], next(strategy.global_model.parameters()).device)
    torch.set_rng_state(state["torch_rng"])
    return int(state["round"]), arrays


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = resolve(context.run_config)
    if cfg.al_method != "none":
        return run_active_learning(grid, context, cfg)
    device = resolve_device(cfg.device)
    precision = precision_for(cfg.precision, device)
    method = get_method(cfg.method)
    node_of_partition = discover_clients(grid)
    num_clients = len(node_of_partition)
    if cfg.clients_per_round > num_clients:
        raise ConfigError(f"clients-per-round: {cfg.clients_per_round} is more than the {num_clients} clients")
    data = federated_data(cfg, num_clients)
    model = initial_model(cfg, data).to(device)
    tail = tail_classes(data.class_counts)
    test_images, test_labels = data.test_data()

    strategy = FedLTStrategy(
        inner=server_optimizer(cfg.server_opt, cfg.server_lr, cfg.server_momentum, cfg.local_lr),
        server_method=method.server(cfg, model, data),
        global_model=model,
        node_of_partition=node_of_partition,
        clients_per_round=cfg.clients_per_round,
        seed=cfg.seed,
        max_failure_fraction=cfg.max_failure_fraction,
        secure=(SecureRounds(cfg.secagg_min_cohort, cfg.round_timeout, masked_metrics(method.client))
                if cfg.secure_aggregation == "secagg" else None),
        query_timeout=cfg.round_timeout,
    )
    weight_average = WeightAverage(cfg.swa_start)
    done = 0
    initial_arrays = ArrayRecord(model.travelling_state())
    if cfg.resume_from:
        run_dir = Path(cfg.resume_from).expanduser()
        done, initial_arrays = restore(strategy, cfg, run_dir, weight_average)
        strategy.round_offset = done
        log(INFO, "[fedlt] resuming %s after round %d", run_dir, done)
    else:
        run_dir = run_directory(cfg, context.run_id)
    info = federation_info(num_clients, data.class_counts, data.client_indices, data.dataset.train_labels.numpy(),
                           tail, context.run_id)
    info["server_precision"] = precision.name  # what `precision` (e.g. auto) resolved to on the server's device
    info["server_device"] = device.type  # what `device` (e.g. auto) resolved to: cpu or cuda
    if cfg.synthetic_data == "regl":  # ReGL: every client generates (or finds cached) its images before round 1
        info["synthetic"] = generate_on_clients(grid, node_of_partition, cfg.regl_generate_timeout)
    log(INFO, "[fedlt] results -> %s", run_dir)

    with RunRecorder(cfg, run_dir, info, resume_after=done if cfg.resume_from else None,
                     pictures=cfg.pictures) as recorder:

        def evaluate_on_test(network: EncoderClassifier) -> Evaluation:
            return evaluate(network, test_images, test_labels, cfg.dataset, tail, data.class_counts,
                            precision=precision)

        def evaluate_global(_: int, arrays: ArrayRecord) -> MetricRecord | None:
            current = strategy.current
            if current is None:  # Flower's round-0 call: the initial (or resumed) model, not a round
                return None
            model.load_travelling_state(arrays.to_torch_state_dict())
            if strategy.server_method.wants_statistics(current.server_round):  # e.g. CCVR's calibration
                strategy.query_statistics(grid, arrays, model, cfg.round_timeout)
            evaluation_started = time.perf_counter()
            evaluated = strategy.server_method.evaluation_model(model)
            unaveraged = {}
            if weight_average.active(current.server_round):  # swa-start: evaluate the mean, log the latest too
                latest = evaluate_on_test(evaluated)
                unaveraged = {"unaveraged_accuracy": latest.accuracy, "unaveraged_tail_accuracy": latest.tail_accuracy}
                evaluated = weight_average.update(evaluated)
            adjusted = strategy.server_method.adjusted_evaluation_model(
                current.server_round, evaluated,
                lambda network: strategy.query_statistics(grid, ArrayRecord(network.travelling_state()), network,
                                                          cfg.round_timeout))
            unadjusted = {}
            if adjusted is not evaluated:  # e.g. fedavg-la-posthoc: evaluate the adjusted network, log both
                before = evaluate_on_test(evaluated)
                unadjusted = {"unadjusted_accuracy": before.accuracy, "unadjusted_tail_accuracy": before.tail_accuracy}
                evaluated = adjusted
            result = evaluate_on_test(evaluated)
            record = {
                "round": current.server_round,
                **result.as_dict(),
                "train_loss": current.train_loss,
                "local_lr": cfg.local_lr_at(current.server_round),
                "round_seconds": time.perf_counter() - current.started,
                "evaluate_seconds": time.perf_counter() - evaluation_started,
                "client_train_seconds": current.client_train_seconds,
                "bytes_up": current.bytes_up,
                "bytes_down": current.bytes_down,
                "parameters_up": current.parameters_up,
                "parameters_down": current.parameters_down,
                "clients": current.cohort,
                "failed_clients": current.failed,
                **current.personalised_metrics(),  # methods with personal parts (FedETF, FedNH, FedLoGe)
                **strategy.server_method.round_metrics(),
                **weight_average.round_metrics(),
                **unaveraged,
                **unadjusted,
            }
            recorder.log_round(record)
            log(INFO, "[fedlt] round %d/%d  accuracy %.4f  tail %.4f  loss %.4f  (%.1f s)", current.server_round,
                cfg.num_server_rounds, result.accuracy, result.tail_accuracy, result.loss, record["round_seconds"])
            last = current.server_round == cfg.num_server_rounds
            if last:
                save_final_model(run_dir, evaluated.travelling_state(), cfg.as_dict(), num_clients,
                                 current.server_round)
            if cfg.checkpoint_every and (current.server_round % cfg.checkpoint_every == 0 or last):
                save_checkpoint(run_dir, checkpoint_state(strategy, cfg, current.server_round, arrays, weight_average),
                                pause_after=cfg.debug_pause_after_checkpoint)
            return MetricRecord({"accuracy": result.accuracy, "tail-accuracy": result.tail_accuracy,
                                 "loss": result.loss})

        if cfg.num_server_rounds > done:
            strategy.start(
                grid=grid,
                initial_arrays=initial_arrays,
                num_rounds=cfg.num_server_rounds - done,
                timeout=cfg.round_timeout,
                # clients that keep state write it to the run folder, so that a resume replays them too
                train_config=(persisted_state_config(run_dir, done) if cfg.checkpoint_every and
                              cfg.persist_client_state else ConfigRecord()),
                evaluate_fn=evaluate_global,
            )
    summary = recorder.summary
    log(INFO, "[fedlt] done: final accuracy %.4f, last-10 %.4f, tail last-10 %.4f -> %s",
        summary.get("final_accuracy", float("nan")), summary.get("last10_accuracy", float("nan")),
        summary.get("last10_tail_accuracy", float("nan")), run_dir)
    if recorder.pictures:
        log(INFO, "[fedlt] pictures: %s", pictures_line(recorder.pictures))
    if (run_dir / FINAL_MODEL_FILE).is_file():
        log(INFO, "[fedlt] final model: %s (fedlt_app.task.trained_model)", run_dir / FINAL_MODEL_FILE)
