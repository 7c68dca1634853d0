"""Registry of methods: the run-config ``method`` value -> its three parts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fedlt_app.methods.base import ClientMethod, ClientReport, Payload, ServerMethod, extend_nothing
from fedlt_app.methods.climb import ClimbClient, ClimbServer
from fedlt_app.methods.creff import CReFFClient, CReFFServer
from fedlt_app.methods.fedlc import FedLCClient
from fedlt_app.methods.focal import FocalClient
from fedlt_app.methods.ratio_loss import RatioLossClient, RatioLossServer
from fedlt_app.methods.redgrape import RedGrapeClient, RedGrapeServer, add_supplementary_classifier
from fedlt_app.models import EncoderClassifier


@dataclass(frozen=True)
class Method:
    client: type[ClientMethod]
    server: type[ServerMethod]
    extend_model: Callable[[EncoderClassifier], EncoderClassifier] = extend_nothing


METHODS: dict[str, Method] = {
    "fedavg": Method(ClientMethod, ServerMethod),
    "fedprox": Method(ClientMethod, ServerMethod),  # the proximal term lives in the shared loop (prox-mu)
    "focal": Method(FocalClient, ServerMethod),
    "fedlc": Method(FedLCClient, ServerMethod),
    "ratio-loss": Method(RatioLossClient, RatioLossServer),
    "climb": Method(ClimbClient, ClimbServer),
    "creff": Method(CReFFClient, CReFFServer),
    "redgrape": Method(RedGrapeClient, RedGrapeServer, add_supplementary_classifier),
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"method: unknown method {name!r}; allowed: {', '.join(METHODS)}") from None


__all__ = ["METHODS", "ClientMethod", "ClientReport", "Method", "Payload", "ServerMethod", "get_method"]
