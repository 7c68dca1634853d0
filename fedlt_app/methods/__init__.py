"""Registry of methods: the run-config ``method`` value -> its three parts."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedlt_app.config import recorded_value
from fedlt_app.methods.base import ClientMethod, ClientReport, Payload, ServerMethod, extend_nothing
from fedlt_app.methods.decoupled.ccvr import CCVRClient, CCVRServer
from fedlt_app.methods.decoupled.creff import CReFFClient, CReFFServer
from fedlt_app.methods.decoupled.grape_la import GrapeLAClient, GrapeLAServer
from fedlt_app.methods.decoupled.redgrape import RedGrapeClient, RedGrapeServer, add_supplementary_classifier
from fedlt_app.methods.decoupled.rucr import RUCRClient, RUCRServer
from fedlt_app.methods.distillation.fedic import FedICServer
from fedlt_app.methods.distillation.fedyoyo import FedYoYoClient, FedYoYoServer
from fedlt_app.methods.fixed_classifier.fedetf import FedETFClient, FedETFServer, add_etf_classifier
from fedlt_app.methods.fixed_classifier.fedloge import FedLoGeClient, FedLoGeServer, add_fedloge_heads
from fedlt_app.methods.fixed_classifier.fednh import FedNHClient, FedNHServer, add_prototype_classifier
from fedlt_app.methods.loss.climb import ClimbClient, ClimbServer
from fedlt_app.methods.loss.fedavg_la import FedAvgLAClient, FedAvgLAServer
from fedlt_app.methods.loss.fedgrab import FedGraBClient, FedGraBServer
from fedlt_app.methods.loss.fedlc import FedLCClient, FedLCServer
from fedlt_app.methods.loss.focal import FocalClient
from fedlt_app.methods.loss.ratio_loss import RatioLossClient, RatioLossServer
from fedlt_app.methods.representation.moon import MoonClient, MoonServer, add_projection_head
from fedlt_app.methods.vision_language.capt import CAPTClient, CAPTServer, capt_model
from fedlt_app.methods.vision_language.clip2fl import CLIP2FLClient, CLIP2FLServer
from fedlt_app.methods.vision_language.clip_prompts import ZeroShotServer, promptfl_model, zero_shot_model
from fedlt_app.models import EncoderClassifier

if TYPE_CHECKING:
    import torch

    from fedlt_app.config import RunConfig
    from fedlt_app.data import FederatedData


@dataclass(frozen=True)
class Method:
    client: type[ClientMethod]
    server: type[ServerMethod]
    extend_model: Callable[[EncoderClassifier], EncoderClassifier] = extend_nothing
    # A method with its own network (CLIP's) builds it from (cfg, data, device); None: the `model` key's network.
    build: Callable[[RunConfig, FederatedData, torch.device], EncoderClassifier] | None = None


METHODS: dict[str, Method] = {
    "fedavg": Method(ClientMethod, ServerMethod),
    "fedprox": Method(ClientMethod, ServerMethod),  # the proximal term lives in the shared loop (prox-mu)
    "focal": Method(FocalClient, ServerMethod),
    "fedlc": Method(FedLCClient, FedLCServer),
    # fedlt's ablation of GRAPE-LA: one head, CE(z + τ·log π) with the federation's prior from summed counts
    "fedavg-la": Method(FedAvgLAClient, FedAvgLAServer),
    # fedlt's method for item 4: FedAvg-LA's loss and prior; its SAM steps, server momentum and weight averaging are
    # the shared loop's and the server's general mechanisms, which config.resolve sets from the flat-la-* keys
    "flat-la": Method(FedAvgLAClient, FedAvgLAServer),
    "ratio-loss": Method(RatioLossClient, RatioLossServer),
    "climb": Method(ClimbClient, ClimbServer),
    "creff": Method(CReFFClient, CReFFServer),
    "ccvr": Method(CCVRClient, CCVRServer),  # calibration: a statistics query before each evaluation
    # prototype term in training; class means by the statistics query; clients' re-trained heads evaluate
    "rucr": Method(RUCRClient, RUCRServer),
    # cross-entropy clients; the server reads every client model and distils a calibrated ensemble (server data)
    "fedic": Method(ClientMethod, FedICServer),
    # the cohort's feature dispersion before training -> prior; weak + strong views, adjusted logits, self-distillation
    "fedyoyo": Method(FedYoYoClient, FedYoYoServer),
    "moon": Method(MoonClient, MoonServer, add_projection_head),  # keeps each client's previous model on its node
    # fixed simplex-ETF classifier (never sent) + projection; personal fine-tuning for the personalised accuracy
    "fedetf": Method(FedETFClient, FedETFServer, add_etf_classifier),
    # frozen class prototypes on the sphere, moved by the server (global_model_overrides); unweighted averaging
    "fednh": Method(FedNHClient, FedNHServer, add_prototype_classifier),
    # static sparse ETF trains the backbone; g_aux averaged and realigned (GHA); local heads kept on each node (LA)
    "fedloge": Method(FedLoGeClient, FedLoGeServer, add_fedloge_heads),
    # PID-balanced sigmoid loss, controllers kept on each client's node; optional DPA tail from the server
    "fedgrab": Method(FedGraBClient, FedGraBServer),
    "redgrape": Method(RedGrapeClient, RedGrapeServer, add_supplementary_classifier),
    # fedlt's own method (not a paper's): RedGrape + logit adjustment by the class prior
    "grape-la": Method(GrapeLAClient, GrapeLAServer, add_supplementary_classifier),
    # on a frozen CLIP (optional extra, clip-weights): zero-shot reference and federated CoOp
    "zero-shot-clip": Method(ClientMethod, ZeroShotServer, build=zero_shot_model),
    "promptfl": Method(ClientMethod, ServerMethod, build=promptfl_model),
    # general + class-aware prompts; per-node cluster starts (client_model_overrides), per-class aggregation
    "capt": Method(CAPTClient, CAPTServer, build=capt_model),
    # the run's network; CReFF + distillation from CLIP's zero-shot logits + CLIP-text-guided feature matching
    "clip2fl": Method(CLIP2FLClient, CLIP2FLServer),
}


def keeps_client_state(name: str) -> bool:
    """Whether method ``name`` keeps arrays on its clients between rounds (``ClientMethod.state_to_keep``: MOON's
    previous models, Fed-GraB's controllers, FedLoGe's local heads)."""
    return get_method(name).client.state_to_keep is not ClientMethod.state_to_keep


def resumes_exactly(run_config: Mapping[str, Any]) -> bool:
    """Whether the run recorded with ``run_config`` (its config.json's), continued from its checkpoint, replays
    the uninterrupted run: its method keeps nothing on its clients, or its clients wrote what they keep to the
    run folder (``persist-client-state`` with checkpoints; runs from before the key kept it in memory only, and a
    resume started it afresh)."""
    return not keeps_client_state(str(recorded_value(run_config, "method"))) or bool(
        recorded_value(run_config, "persist-client-state") and recorded_value(run_config, "checkpoint-every"))


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"method: unknown method {name!r}; allowed: {', '.join(METHODS)}") from None


__all__ = ["METHODS", "ClientMethod", "ClientReport", "Method", "Payload", "ServerMethod", "get_method",
           "keeps_client_state", "resumes_exactly"]
