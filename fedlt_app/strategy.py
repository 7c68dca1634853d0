"""FedLTStrategy: seeded cohorts and method payloads around a Flower strategy.

The model update itself is Flower's: the wrapped strategy (``FedAvgM`` with
zero momentum gives Eq. 14, ``θ ← θ + η_s·Σ_k (n_k/n)(θ_k − θ)``) averages the
single "arrays" record of each reply.  This wrapper adds what Flower's
strategies cannot carry:

* cohorts drawn by *partition id* from ``(seed, round)``, so the same seed
  gives the same clients every run (Flower samples random node ids);
* the method's server part: its broadcast (e.g. RedGrape's prototype store)
  goes out as an extra "method" record, and the clients' "method" records are
  popped before the wrapped strategy sees a reply (it accepts exactly one
  ArrayRecord per reply);
* per-round bookkeeping (cohort, failures, bytes and parameters each way,
  timing) for the results writer.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, Strategy

from fedlt_app.methods import ClientMethod, ClientReport, Payload, ServerMethod
from fedlt_app.models import EncoderClassifier
from fedlt_app.records import (
    content_nbytes,
    content_parameters,
    is_buffer,
    payload_to_record,
    record_to_payload,
)
from fedlt_app.secagg.errors import SecAggError
from fedlt_app.secagg.flower_server import SecureRounds, masked_values

METHOD_KEY = "method"
STATISTICS_QUERY = "method_statistics"  # ServerMethod.wants_statistics -> ClientMethod.statistics
PERSONALISED_METRIC = "personalised-accuracy"  # the train reply's metric (ClientMethod.personalised_model)


def masked_metrics(client: type[ClientMethod]) -> tuple[str, ...]:
    """The train-reply metrics that secure aggregation carries inside the masked sum, so the server learns only
    their cohort mean (``SecureRounds.metrics``): the personalised accuracy, for a method whose clients have
    personalised models (they override ``ClientMethod.personalised_model``). Other per-client metrics are
    dropped under secure aggregation."""
    return (PERSONALISED_METRIC,) if client.personalised_model is not ClientMethod.personalised_model else ()


ADAM_BETAS = (0.9, 0.999)
ADAM_EPSILON = 1e-8


class TextbookFedAdam(FedAdam):
    """Flower's FedAdam with Adam's bias correction at step t = server_round.

    flwr 1.42 corrects with (1 − β^(round+1)), one step ahead of Kingma & Ba;
    handing it ``round − 1`` gives the textbook
    x ← x + η·√(1 − β₂ᵗ)/(1 − β₁ᵗ) · m/(√v + ε).
    """

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return super().aggregate_train(server_round - 1, replies)


def server_optimizer(name: str, server_lr: float, momentum: float, local_lr: float) -> FedAvg:
    """Flower's strategy that turns the averaged update into the new model."""
    sampling = {"fraction_train": 1.0, "fraction_evaluate": 0.0, "min_train_nodes": 1, "min_available_nodes": 1}
    if name == "fedavg":
        return FedAvgM(server_learning_rate=server_lr, server_momentum=0.0, **sampling)
    if name == "fedavgm":
        return FedAvgM(server_learning_rate=server_lr, server_momentum=momentum, **sampling)
    if name == "fedadam":
        return TextbookFedAdam(eta=server_lr, eta_l=local_lr, beta_1=ADAM_BETAS[0], beta_2=ADAM_BETAS[1],
                               tau=ADAM_EPSILON, **sampling)
    raise ValueError(f"server-opt: unknown server optimizer {name!r}; allowed: fedavg, fedavgm, fedadam")


def sample_cohort(num_clients: int, clients_per_round: int, seed: int, server_round: int) -> list[int]:
    """Partition ids of one round's cohort, a pure function of (seed, round)."""
    if clients_per_round <= 0 or clients_per_round >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([seed, server_round])
    return sorted(int(p) for p in rng.choice(num_clients, size=clients_per_round, replace=False))


class _CohortGrid:
    """A view of the grid whose only nodes are this round's cohort.

    Lets the wrapped Flower strategy run its own ``configure_train`` (and keep
    its own state, e.g. FedAvgM's current arrays) on the cohort we chose.
    """

    def __init__(self, grid: Grid, node_ids: list[int]) -> None:
        self._grid = grid
        self._node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self._grid, name)


@dataclass
class RoundLog:
    """What happened in one round, for metrics.jsonl."""

    server_round: int
    cohort: list[int]
    started: float = field(default_factory=time.perf_counter)
    bytes_down: int = 0
    bytes_up: int = 0
    parameters_down: int = 0
    parameters_up: int = 0
    failed: list[int] = field(default_factory=list)
    train_loss: float | None = None
    client_train_seconds: list[float] = field(default_factory=list)  # local training alone, per client
    # partition id -> its personalised accuracy (ClientMethod.personalised_model; methods with personal parts)
    personalised: dict[int, float] = field(default_factory=dict)
    # secure aggregation: the reporting clients' mean personalised accuracy, unmasked from their sum (no
    # per-client values exist on the server then)
    personalised_mean: float | None = None

    def personalised_metrics(self) -> dict[str, float | list[float | None]]:
        """The cohort's mean personalised accuracy and the per-client values aligned with ``cohort``
        (None: the client failed); empty when no client reported one. Under secure aggregation the mean
        alone (``personalised_accuracy_per_client`` is absent)."""
        if self.personalised_mean is not None:
            return {"personalised_accuracy": self.personalised_mean}
        if not self.personalised:
            return {}
        return {"personalised_accuracy": float(np.mean(list(self.personalised.values()))),
                "personalised_accuracy_per_client": [self.personalised.get(p) for p in self.cohort]}


def average_buffers(arrays: ArrayRecord, replies: list[Message]) -> None:
    """BatchNorm statistics: the weighted average, whatever the server optimizer.

    Running means and variances are statistics, not parameters: a server
    momentum or Adam step on them can even make a variance negative.
    """
    weights = np.array([float(r.content["metrics"]["num-examples"]) for r in replies], dtype=np.float64)
    weights /= weights.sum()
    for key in [k for k in arrays if is_buffer(k)]:
        stacked = [r.content["arrays"][key].numpy() for r in replies]
        mean = sum(w * x.astype(np.float64) for w, x in zip(weights, stacked, strict=True))
        arrays[key] = Array(np.asarray(mean).astype(stacked[0].dtype if stacked[0].dtype.kind == "f" else np.float64))


def override_entries(arrays: ArrayRecord, overrides: dict[str, np.ndarray],
                     hook: str = "global_model_overrides") -> None:
    """Replace entries of the aggregated model by the server method's own (``ServerMethod.global_model_overrides``).

    In place, like ``average_buffers``: FedAvgM keeps the record it returns as its current arrays, so its next
    pseudo-gradient starts from the overridden values.
    """
    for key, value in overrides.items():
        if key not in arrays:
            raise KeyError(f"{hook}: {key!r} is not an entry of the global model")
        old = arrays[key].numpy()
        if tuple(np.shape(value)) != old.shape:
            raise ValueError(f"{hook}: {key!r} has shape {np.shape(value)}, the model's {old.shape}")
        arrays[key] = Array(np.ascontiguousarray(value, dtype=old.dtype))


def personalised_message(message: Message, overrides: dict[str, np.ndarray]) -> Message:
    """A copy of a train message whose model has ``overrides`` (``ServerMethod.client_model_overrides``)."""
    arrays = ArrayRecord({key: array for key, array in message.content["arrays"].items()})
    override_entries(arrays, overrides, "client_model_overrides")
    content = RecordDict({name: record for name, record in message.content.items()})
    content["arrays"] = arrays
    return Message(content=content, dst_node_id=message.metadata.dst_node_id,
                   message_type=message.metadata.message_type)


class ClientFailures(RuntimeError):
    """More of a round's clients failed than ``max-failure-fraction`` allows."""


class FedLTStrategy(Strategy):
    """Wraps a Flower strategy (FedAvg family) with fedlt's per-round extras.

    Rounds are numbered from ``first_round`` (a resumed run continues its
    count), and the wrapped strategy and the method see the true round.
    """

    def __init__(
        self,
        inner: FedAvg,
        server_method: ServerMethod,
        global_model: EncoderClassifier,
        node_of_partition: dict[int, int],
        clients_per_round: int,
        seed: int,
        max_failure_fraction: float = 0.5,
        first_round: int = 1,
        secure: SecureRounds | None = None,
        query_timeout: float = 3600.0,
    ) -> None:
        self.inner = inner
        self.server_method = server_method
        self.global_model = global_model
        self.node_of_partition = dict(node_of_partition)
        self.partition_of_node = {node: part for part, node in node_of_partition.items()}
        self.clients_per_round = clients_per_round
        self.seed = seed
        self.max_failure_fraction = max_failure_fraction
        self.secure = secure  # secure-aggregation=secagg: the protocol's query rounds around each train round
        self.round_offset = first_round - 1
        self.query_timeout = query_timeout  # a statistics query before training (the run's round-timeout)
        self.current: RoundLog | None = None

    def summary(self) -> None:
        log(INFO, "\t├──> fedlt: method %s, %d clients, %s per round, seed %d",
            type(self.server_method).__name__, len(self.node_of_partition),
            self.clients_per_round or "all", self.seed)
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        cohort = sample_cohort(len(self.node_of_partition), self.clients_per_round, self.seed, server_round)
        if not self.server_method.asks_clients_to_train:  # nothing to train (zero-shot): no messages at all
            self.current = RoundLog(server_round, [])
            return []
        self.current = RoundLog(server_round, cohort)
        view = _CohortGrid(grid, [self.node_of_partition[p] for p in cohort])
        messages = list(self.inner.configure_train(server_round, arrays, config, view))  # type: ignore[arg-type]
        self.global_model.load_travelling_state(arrays.to_torch_state_dict())
        self.server_method.begin_round(server_round, cohort)
        if self.server_method.wants_statistics_before_training(server_round):  # FedYoYo's first phase
            # (under secure aggregation a whole protocol instance of its own, closed before training's opens)
            self.query_statistics(grid, arrays, self.global_model, self.query_timeout, partitions=cohort)
        if self.secure is not None:  # deltas against the model in its own dtypes: what every client starts from
            messages = self._secure_prepare(grid, server_round, messages,
                                            ArrayRecord(self.global_model.travelling_state()))
        payload = self.server_method.broadcast(server_round, self.global_model)
        for index, message in enumerate(messages):
            if payload:
                message.content[METHOD_KEY] = payload_to_record(payload)
            partition_id = self.partition_of_node[message.metadata.dst_node_id]
            overrides = self.server_method.client_model_overrides(server_round, partition_id)
            if overrides:  # a personalised start: this client's own message (Flower's share one RecordDict)
                if self.secure is not None:
                    raise ValueError("client_model_overrides: not with secure aggregation (one common start)")
                messages[index] = message = personalised_message(message, overrides)
            self.current.bytes_down += content_nbytes(message.content)
            self.current.parameters_down += content_parameters(message.content)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        if not self.server_method.asks_clients_to_train:
            return None, None  # the arrays stay as they are; Flower still evaluates the round
        current = self.current or RoundLog(server_round, [])
        # Arrival order varies from run to run; floating-point sums must not.
        replies = sorted(replies, key=lambda r: self.partition_of_node.get(r.metadata.src_node_id, -1))
        succeeded = [r for r in replies if not r.has_error()]
        self._record_failures(server_round, current, replies)
        sums = None  # secure: the method's sums over the round's clients (ServerMethod.sum_segments)
        if self.secure is not None:  # masked vectors in, one reply holding the weighted mean out
            synthetic, sums = self._secure_aggregate(server_round, current, succeeded)
            succeeded = [synthetic]
        reports: list[ClientReport] = []
        for reply in succeeded:
            if self.secure is None:  # (secure: the masked replies were counted as they came)
                current.bytes_up += content_nbytes(reply.content)
                current.parameters_up += content_parameters(reply.content)
            extra = reply.content.pop(METHOD_KEY) if METHOD_KEY in reply.content else None
            partition_id = self.partition_of_node[reply.metadata.src_node_id]
            num_examples = int(reply.content["metrics"]["num-examples"])
            if PERSONALISED_METRIC in reply.content["metrics"]:
                value = float(reply.content["metrics"][PERSONALISED_METRIC])
                if self.secure is None:
                    current.personalised[partition_id] = value
                else:  # the synthetic reply: the cohort's mean from the masked sum, not one client's value
                    current.personalised_mean = value
            model = (record_to_payload(reply.content["arrays"]) if self.server_method.reads_client_models
                     and self.secure is None else {})
            reports.append(ClientReport(partition_id, num_examples, record_to_payload(extra), model))
        losses = [float(r.content["metrics"]["train-loss"]) for r in succeeded]
        current.client_train_seconds = [float(r.content["metrics"].get("train-seconds", float("nan")))
                                        for r in succeeded]
        current.train_loss = float(np.average(losses, weights=[r.num_examples for r in reports]))
        weights = self.server_method.aggregation_weights(server_round, reports)
        if weights is not None:
            for reply, weight in zip(succeeded, weights, strict=True):
                reply.content["metrics"]["num-examples"] = float(weight)
        if sums is None:
            self.server_method.absorb(server_round, reports)
        else:
            self.server_method.absorb_sums(server_round, sums)
        arrays, metrics = self.inner.aggregate_train(server_round, succeeded)
        if arrays is not None:
            average_buffers(arrays, succeeded)
            override_entries(arrays, self.server_method.global_model_overrides(server_round))
        return arrays, metrics

    def query_statistics(self, grid: Grid, arrays: ArrayRecord, model: EncoderClassifier, timeout: float,
                         partitions: list[int] | None = None) -> None:
        """The method's statistics query on ``arrays`` (``model`` holds them) to ``partitions`` (None: every
        client), handed to the server method: each answer plainly, or under secure aggregation only their sum."""
        assert self.current is not None, "statistics are gathered within a round"
        server_round = self.current.server_round
        if self.secure is not None:
            sums = self.collect_statistics_sums(grid, arrays, timeout, partitions)
            self.server_method.absorb_statistics_sums(server_round, model, sums)
        else:
            self.server_method.absorb_statistics(server_round, model,
                                                 self.collect_statistics(grid, arrays, timeout, partitions))

    def collect_statistics(self, grid: Grid, arrays: ArrayRecord, timeout: float,
                           partitions: list[int] | None = None) -> list[ClientReport]:
        """``ClientMethod.statistics`` on ``arrays``, outside training, of ``partitions`` (None: every client).

        After aggregation every client answers on the new global model (CCVR, RUCR); before training, the
        round's cohort on the model it starts from (FedYoYo). The bytes count in this round's log. A client
        that fails is logged and left out; when none answers the run stops.
        """
        current = self.current
        assert current is not None, "statistics are gathered within a round"
        messages = self._statistics_messages(current, arrays, partitions)
        _count_down(current, messages)
        reports = []
        for reply in self._statistics_replies(current, grid, messages, timeout):
            current.bytes_up += content_nbytes(reply.content)
            current.parameters_up += content_parameters(reply.content)
            reports.append(ClientReport(self.partition_of_node[reply.metadata.src_node_id], 0,
                                        record_to_payload(reply.content.get(METHOD_KEY))))
        return reports

    def collect_statistics_sums(self, grid: Grid, arrays: ArrayRecord, timeout: float,
                                partitions: list[int] | None = None) -> Payload:
        """``collect_statistics`` under secure aggregation: every client answers its method's
        ``statistics_summands`` on ``arrays`` inside a second instance of the protocol, and the server
        learns only their sum over the clients of ``partitions`` (None: every client) that answered
        (``ServerMethod.statistics_sum_segments``)."""
        current = self.current
        assert current is not None and self.secure is not None, "secure statistics are gathered within a round"
        messages = self._statistics_messages(current, arrays, partitions)
        self.secure.bytes_up = self.secure.bytes_down = 0  # the protocol's own queries, counted at the end
        try:
            kept = self.secure.prepare_sums(grid, current.server_round, messages,
                                            self.server_method.statistics_sum_segments())
            _count_down(current, kept)  # with their ciphertexts
            answered = self._statistics_replies(current, grid, kept, timeout)
            current.bytes_up += sum(content_nbytes(r.content) for r in answered)
            current.parameters_up += masked_values(answered)
            return self.secure.aggregate_sums(answered)
        except SecAggError as err:
            raise ClientFailures(f"round {current.server_round}: {err} (secure-aggregation=secagg, "
                                 "statistics query)") from err
        finally:
            current.bytes_down += self.secure.bytes_down
            current.bytes_up += self.secure.bytes_up

    def _statistics_messages(self, current: RoundLog, arrays: ArrayRecord,
                             partitions: list[int] | None) -> list[Message]:
        """The statistics query to ``partitions`` (None: every client); the caller counts what it sends."""
        config = ConfigRecord({"server-round": current.server_round})
        content = {"arrays": arrays, "config": config}
        payload = self.server_method.statistics_payload(current.server_round)
        if payload:  # e.g. the prior FedAvg-LA's post-hoc adjustment is measured under
            content[METHOD_KEY] = payload_to_record(payload)
        asked = sorted(self.node_of_partition) if partitions is None else sorted(partitions)
        messages = [Message(RecordDict(content), dst_node_id=self.node_of_partition[p],
                            message_type=f"{MessageType.QUERY}.{STATISTICS_QUERY}")
                    for p in asked]
        return messages

    def _statistics_replies(self, current: RoundLog, grid: Grid, messages: list[Message],
                            timeout: float) -> list[Message]:
        """The replies that succeeded, in partition order; a failing client is logged, none answering stops."""
        replies = sorted(grid.send_and_receive(messages, timeout=timeout),
                         key=lambda r: self.partition_of_node.get(r.metadata.src_node_id, -1))
        answered = []
        for reply in replies:
            if reply.has_error():
                log(WARNING, "Client with partition-id %d failed the statistics query in round %d: %s",
                    self.partition_of_node.get(reply.metadata.src_node_id, -1), current.server_round,
                    reply.error.reason)
                continue
            answered.append(reply)
        if not answered:
            raise ClientFailures(f"round {current.server_round}: no client answered the statistics query")
        return answered

    def _secure_prepare(self, grid: Grid, server_round: int, messages: list[Message],
                        arrays: ArrayRecord) -> list[Message]:
        """The key and share rounds on the cohort; the train messages of the nodes that shared keys."""
        assert self.secure is not None and self.current is not None
        try:
            kept = self.secure.prepare(grid, server_round, messages, arrays, self.server_method.sum_segments(),
                                       self.server_method.client_weighting)
        except SecAggError as err:
            raise ClientFailures(f"round {server_round}: {err} (secure-aggregation=secagg)") from err
        finally:
            self.current.bytes_down += self.secure.bytes_down
            self.current.bytes_up += self.secure.bytes_up
        return kept

    def _secure_aggregate(self, server_round: int, current: RoundLog,
                          succeeded: list[Message]) -> tuple[Message, dict[str, np.ndarray]]:
        """Unmasks the sum of the masked replies: one synthetic reply with the cohort's weighted mean,
        and the method's sums."""
        assert self.secure is not None
        current.bytes_up += sum(content_nbytes(r.content) for r in succeeded)
        current.parameters_up += masked_values(succeeded)  # int64 masked values, not floats: counted here
        up, down = self.secure.bytes_up, self.secure.bytes_down
        try:
            return self.secure.aggregate(succeeded)
        except SecAggError as err:
            raise ClientFailures(f"round {server_round}: {err} (secure-aggregation=secagg)") from err
        finally:
            current.bytes_down += self.secure.bytes_down - down
            current.bytes_up += self.secure.bytes_up - up

    def _record_failures(self, server_round: int, current: RoundLog, replies: list[Message]) -> None:
        """Log every client that raised or did not answer; stop past the threshold.

        Flower itself only logs failures and carries on, even when every
        client failed and the model silently stops changing.
        """
        answered = {self.partition_of_node.get(r.metadata.src_node_id, -1): r for r in replies}
        for partition_id in current.cohort:
            reply = answered.get(partition_id)
            if reply is None:
                log(WARNING, "Client with partition-id %d did not answer in round %d (round-timeout)",
                    partition_id, server_round)
            elif reply.has_error():
                log(WARNING, "Client with partition-id %d failed in round %d: %s",
                    partition_id, server_round, reply.error.reason)
            else:
                continue
            current.failed.append(partition_id)
        cohort = max(len(current.cohort), 1)
        if len(current.failed) == cohort or len(current.failed) / cohort > self.max_failure_fraction:
            raise ClientFailures(
                f"round {server_round}: {len(current.failed)} of {len(current.cohort)} clients failed "
                f"(partition ids {current.failed}), more than max-failure-fraction={self.max_failure_fraction}"
            )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """No federated evaluation: the server tests on the balanced test set."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None


def _count_down(current: RoundLog, messages: list[Message]) -> None:
    """Log the bytes and parameters of ``messages`` as sent down in this round."""
    current.bytes_down += sum(content_nbytes(m.content) for m in messages)
    current.parameters_down += sum(content_parameters(m.content) for m in messages)
