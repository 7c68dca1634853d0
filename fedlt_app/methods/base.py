"""What a method is: a few hooks in the shared local loop and a server part.

Methods never see Flower: they exchange plain ``dict[str, np.ndarray]``
payloads, which the client and server apps turn into ArrayRecords. Adding a
method means writing these hooks, never another training loop.

A client method may also keep arrays *on its client* from one round to the
next (MOON's previous local model; local heads): ``ClientMethod.state`` in,
``ClientMethod.state_to_keep`` out. The client app stores them in the node's
Flower ``context.state`` and, in a run that checkpoints, in the run folder
(``fedlt_app.client_state``), so they never travel and never reach the server.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from fedlt_app.config import RunConfig
from fedlt_app.data import FederatedData
from fedlt_app.models import EncoderClassifier
from fedlt_app.precision import Precision, precision_for

Payload = dict[str, np.ndarray]
ClientState = dict[str, np.ndarray]
"""Arrays a client method keeps on its own node between the rounds it trains in."""


@dataclass(frozen=True)
class SumSpec:
    """One array a method's server needs only as its sum over the round's clients.

    Under secure aggregation (secure-aggregation=secagg) the server sees nothing but such sums, so a
    method runs there only if its ``absorb`` can be written on them (``ServerMethod.sum_segments``).
    ``exact``: integers (holder flags, class counts), summed exactly; otherwise real values, summed in
    fixed point (each coordinate of a sum off by less than 2^-24 per client).
    """

    shape: tuple[int, ...]
    exact: bool = False


class ClientMethod:
    """Plain instance-balanced cross-entropy training (FedAvg+CE).

    Subclasses change the loss or add work around the optimizer step; the
    loop that calls these hooks lives in ``fedlt_app.train``.

    ``payload`` is what the server's ``broadcast`` sent this round. ``state``
    is this node's persistent store: what ``state_to_keep`` returned the last
    time this method trained on this node (a failed round saves nothing), and
    empty the first time it trains. A run continued with ``resume-from`` is a
    new Flower run: there it comes from the file the node wrote after the last
    round it trained in up to the checkpoint (``fedlt_app.client_state``,
    ``persist-client-state``; in a deployment it never leaves the client), so
    the resumed run replays the uninterrupted one. In simulation every node's
    state lives in the simulation process's memory (and one or two files per
    node on disk), so keep it small or expect both to grow with the clients.
    """

    def __init__(self, cfg: RunConfig, num_classes: int, payload: Payload, state: ClientState | None = None) -> None:
        self.cfg = cfg
        self.num_classes = num_classes
        self.payload = payload
        self.state: ClientState = dict(state) if state else {}

    def begin(self, model: EncoderClassifier, images: Tensor, labels: Tensor, generator: torch.Generator) -> None:
        """Run once on the received model before the first local step.

        ``generator`` is the method's own stream (not the batches'), and the
        global RNG (dropout) is the hooks' own too, so what a method draws here
        or in ``before_step`` never changes the batches every method shares.
        This and ``before_step`` run under the run's autocast: never step an
        optimizer inside one (autocast would keep serving the weights' stale
        low-precision copies until the hook returns).
        """

    def batch_input(self, raw: Tensor, augmented: Tensor) -> Tensor:
        """The input ``loss`` gets for one batch, given its uint8 images ``raw`` and the shared augmented view.

        By default the shared view, which every method sees alike (paired runs). A method that needs more
        views of the same images (FedYoYo's strongly augmented copy) returns them stacked along the batch
        dimension after the shared one, drawing only from its own stream (``begin``'s generator; the global
        RNG here is the hooks' own), so the shared view and every other method's batches stay unchanged.
        Runs outside autocast, on the model's device.
        """
        return augmented

    def loss(self, model: EncoderClassifier, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(model(x), y)

    def before_step(self, model: EncoderClassifier) -> None:
        """Called after backward, before clipping and the optimizer step."""

    def after_step(self, model: EncoderClassifier) -> None:
        """Called after the optimizer step."""

    def finish(self, model: EncoderClassifier) -> None:
        """Run once on the trained model after the last local step, before ``state_to_keep``, ``report`` and
        ``summands``: for work on the trained model whose result travels in ``report`` (RUCR's local classifier
        re-training). Outside the run's autocast; never change ``model`` (its state is the reply's model)."""

    def report(self) -> Payload:
        """Arrays sent back to the server beside the model."""
        return {}

    def summands(self) -> Payload:
        """This client's term of each of its server's ``sum_segments``, of exactly the declared shape.

        Under secure aggregation these leave the client (masked) instead of ``report``, and only their
        sum over the round is revealed; dense, so a class the client lacks is a zero row rather than a
        missing one (the vector's shape must not say which classes it holds). Empty: nothing to sum.
        """
        return {}

    def statistics(self, model: EncoderClassifier, images: Tensor, labels: Tensor, precision: Precision,
                   generator: torch.Generator | None = None) -> Payload:
        """Answer the server's statistics query (outside training) about ``model`` on the local data.

        Only methods whose server part asks for it implement it: ``wants_statistics`` (CCVR's per-class
        feature moments, after aggregation) or ``wants_statistics_before_training`` (FedYoYo's feature
        dispersion, on the model a round starts from). ``generator``: the query's own stream (seeded by
        run seed, round and client), for a method whose answer draws (FedYoYo's shuffled batches).
        """
        return {}

    def statistics_summands(self, model: EncoderClassifier, images: Tensor, labels: Tensor,
                            precision: Precision, generator: torch.Generator | None = None) -> Payload:
        """``statistics`` under secure aggregation: this client's term of each of its server's
        ``statistics_sum_segments``, dense and of exactly the declared shape (a class the client lacks is a
        zero row), masked on the way so that the server learns only the sum over the clients.
        ``generator``: the query's own stream, as for ``statistics``."""
        return {}

    def state_to_keep(self, model: EncoderClassifier) -> ClientState:
        """What this node keeps for the next round it trains in: it replaces ``state``.

        Called once, after local training succeeded, with the trained model
        (an empty result stores nothing). By default the state is kept as it
        came, so a method that never writes it stores nothing.
        """
        return self.state

    def personalised_model(self, model: EncoderClassifier) -> EncoderClassifier | None:
        """This client's personalised network, for the personalised accuracy; None: the method has none.

        Methods with a per-client part (FedETF's fine-tuned ETF and projection, FedNH's, FedLoGe's local
        heads) return the network this client would deploy for *itself*. Called by the client app once per
        round, after local training succeeded and after the reply's model and ``state_to_keep`` were
        taken, with ``model``: this round's locally trained model. Return ``model`` itself, or a copy
        with the personal parts (from ``self.state``) or fine-tuned; never change ``model`` in place (it
        is the worker's shared model object). A fine-tuning step must go through
        ``fedlt_app.train.train_locally`` (data kept from ``begin``), not a loop of its own.

        The app evaluates the result on the balanced test set re-weighted to this client's training
        label distribution (``fedlt_app.personalised``) and reports it in the train reply's metrics as
        ``personalised-accuracy``; the server writes the cohort's mean and per-client values in
        metrics.jsonl (``personalised_accuracy``, ``personalised_accuracy_per_client``, aligned with
        ``clients``). Nothing extra travels but that one number per client.
        """
        return None


@dataclass(frozen=True)
class ClientReport:
    """One client's reply as a method's server part sees it."""

    partition_id: int
    num_examples: int
    payload: Payload
    # The client's returned model (its travelling state), only for a server whose ``reads_client_models``
    # (CAPT's per-class and per-cluster rules); empty otherwise and under secure aggregation.
    model: Payload = field(default_factory=dict)


class ServerMethod:
    """Server side of a method that needs nothing beyond weighted averaging.

    Hooks run in this order each round: ``begin_round`` (the cohort), if ``wants_statistics_before_training``
    the cohort's ``statistics`` on the model being sent to ``absorb_statistics``, ``broadcast`` (with the
    global model being sent), then, on the replies that succeeded, ``aggregation_weights``
    and ``absorb``; if ``wants_statistics``, every client's ``statistics`` answer on
    the new global model goes to ``absorb_statistics``; ``evaluation_model``
    picks what the server tests.
    """

    # False: a method with nothing to train (zero-shot CLIP); rounds send no training messages.
    asks_clients_to_train: bool = True
    # True: ``absorb`` gets every client's returned model in ``ClientReport.model`` (a server that combines the
    # clients' models by its own rule, per class or per cluster, rather than the weighted average).
    reads_client_models: bool = False
    # How the model average weighs a client: "examples" (its sample count n: FedAvg's weighted mean) or
    # "uniform" (1 each: FedNH's unweighted mean). A rule the client can apply itself, so it holds under
    # secure aggregation too (each client weighs its own masked delta; ``aggregation_weights`` needs
    # per-client reports the server never sees there). The plain default ``aggregation_weights`` applies it.
    client_weighting: str = "examples"

    def __init__(self, cfg: RunConfig, model: EncoderClassifier, data: FederatedData) -> None:
        self.cfg = cfg
        self.num_classes = model.num_classes
        # For the method's own forward passes. Wrap each forward, never a loop that steps an optimizer:
        # autocast caches the low-precision copy of a weight until the context exits, so weights updated
        # inside one context would be seen stale by every later forward.
        self.precision = precision_for(cfg.precision, next(model.parameters()).device)

    @classmethod
    def round_plan(cls, cfg: RunConfig, server_round: int) -> dict[str, Any]:
        """What round ``server_round`` of a run of ``cfg`` does that depends on its place among
        ``num-server-rounds``, by name (RUCR's rectification rounds, a last-round calibration); a resume
        that changes ``num-server-rounds`` must leave it unchanged for every finished round
        (:func:`fedlt_app.checkpoint.check_schedule_kept`). A class method: it is asked of the
        checkpointed run's config too, without building that run's server state."""
        return {}

    def begin_round(self, server_round: int, cohort: list[int]) -> None:
        """Called before ``broadcast`` with the partition ids of the round's sampled cohort (RUCR's prototypes
        are over the round's clients); some of them may fail later."""

    def broadcast(self, server_round: int, global_model: EncoderClassifier) -> Payload:
        """Arrays sent to every sampled client with the global model."""
        return {}

    def aggregation_weights(self, server_round: int, reports: list[ClientReport]) -> list[float] | None:
        """Replace the sample counts as model-averaging weights (None: keep them). By default the
        ``client_weighting`` rule: None for "examples", 1 per client for "uniform"."""
        return [1.0] * len(reports) if self.client_weighting == "uniform" else None

    def absorb(self, server_round: int, reports: list[ClientReport]) -> None:
        """Take this round's client payloads (only replies that succeeded)."""

    def sum_segments(self) -> dict[str, SumSpec]:
        """What ``absorb`` needs when the server may see only sums over the round's clients
        (secure-aggregation=secagg): name -> shape and kind of the clients' ``summands``.
        Empty: nothing beyond the weighted model average."""
        return {}

    def absorb_sums(self, server_round: int, sums: Payload) -> None:
        """``absorb`` under secure aggregation: the sums over the round's surviving clients of their
        ``summands``, real segments as float64 and exact ones as int64 (one per ``sum_segments`` entry)."""

    def global_model_overrides(self, server_round: int) -> Payload:
        """Entries of the new global model that the method sets itself, after ``absorb`` and the model update.

        Key: a ``travelling_state`` key; value: the array that replaces the aggregate's (same shape). For a
        part of the model that the server, not the clients' average, decides (FedNH's class prototypes: its
        smoothed update of what the clients report). The new global model is what is broadcast, evaluated
        and checkpointed, so the part never needs a payload of its own. Empty: the aggregate as it is.
        """
        return {}

    def client_model_overrides(self, server_round: int, partition_id: int) -> Payload:
        """Entries of the model that this round's client ``partition_id`` starts from, where they differ from the
        global model being sent: a personalised start (CAPT's cluster-averaged prompts for each member).

        Key: a ``travelling_state`` key; value: its array (same shape as the global entry). Called after
        ``broadcast``, once per sampled client; only that client's message changes, so its bytes count as
        usual. Empty: the global model as it is. Not with secure aggregation (the masked deltas assume one
        common start), which refuses a non-empty answer.
        """
        return {}

    def wants_statistics(self, server_round: int) -> bool:
        """Whether, before this round's evaluation, every client answers ``ClientMethod.statistics`` on the
        new global model (an extra query round trip outside training)."""
        return False

    def wants_statistics_before_training(self, server_round: int) -> bool:
        """Whether, before this round's training, the round's cohort answers ``ClientMethod.statistics`` on the
        model the round starts from (FedYoYo's first phase). The answers go to ``absorb_statistics`` before
        ``broadcast``, so what the server sends can depend on them."""
        return False

    def absorb_statistics(self, server_round: int, global_model: EncoderClassifier,
                          reports: list[ClientReport]) -> None:
        """Take the statistics query's answers (only replies that succeeded): after aggregation (before
        ``evaluation_model``) for ``wants_statistics``, before ``broadcast`` for
        ``wants_statistics_before_training``."""

    def statistics_sum_segments(self) -> dict[str, SumSpec]:
        """What ``absorb_statistics`` needs when the server may see only sums over the clients' answers
        (secure-aggregation=secagg, for ``wants_statistics``): name -> shape and kind of the clients'
        ``statistics_summands``. Empty: the method's statistics cannot be written as sums."""
        return {}

    def absorb_statistics_sums(self, server_round: int, global_model: EncoderClassifier, sums: Payload) -> None:
        """``absorb_statistics`` under secure aggregation: the sums over the answering clients of their
        ``statistics_summands``, real segments as float64 and exact ones as int64."""
        raise NotImplementedError(f"{type(self).__name__}: no statistics from sums (statistics_sum_segments)")

    def statistics_payload(self, server_round: int) -> Payload:
        """What the statistics query carries to the clients beside the model; the client method is built
        with it as its payload (FedAvg-LA's post-hoc adjustment: the federation's prior). Empty by default."""
        return {}

    def evaluation_model(self, global_model: EncoderClassifier) -> EncoderClassifier:
        """The network the server evaluates, given the new global model."""
        return global_model

    def adjusted_evaluation_model(self, server_round: int, network: EncoderClassifier,
                                  ask_clients: Callable[[EncoderClassifier], None]) -> EncoderClassifier:
        """The network the server finally evaluates and saves, given ``evaluation_model``'s (under
        ``swa-start`` the running mean of those): for a step that must see the network as evaluated, after
        the averaging (FedAvg-LA's post-hoc adjustment, whose strength the clients measure on it).
        ``ask_clients(network)`` runs the statistics query on ``network`` and hands the answers to
        ``absorb_statistics`` (``absorb_statistics_sums`` under secure aggregation). Return ``network``
        itself (the default: nothing to adjust) or a changed copy; the averaging never sees the copy."""
        return network

    def round_metrics(self) -> dict[str, float | int]:
        """Method state worth a column in metrics.jsonl."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold to resume this method's server side."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of ``state_dict``."""


def extend_nothing(model: EncoderClassifier) -> EncoderClassifier:
    return model
