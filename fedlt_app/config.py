"""The run-config schema: every key's type, default, allowed values and meaning.

One table drives validation, preset merging, the defaults in pyproject.toml
(a test keeps the two in sync) and the README's key table, so a key can never
be accepted in one place and unknown in another.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from fedlt_app.generative.shortfall import TARGETS as REGL_TARGETS

METHOD_NAMES = ("fedavg", "fedprox", "focal", "fedlc", "fedavg-la", "flat-la", "ratio-loss", "climb", "creff", "ccvr",
                "rucr", "fedic", "moon", "redgrape", "grape-la", "zero-shot-clip", "promptfl", "capt", "clip2fl",
                "fedetf", "fednh", "fedgrab", "fedloge", "fedyoyo")
# Methods whose server needs only sums over a round's clients: the weighted model sum (fednh: unweighted,
# ServerMethod.client_weighting), for fedavg-la / grape-la the class counts, for redgrape / grape-la / creff /
# fednh per-class sums and counts,
# fedgrab its clients' summed PID weights, moon its contrasting clients' count and summed term
# (ServerMethod.sum_segments); fedetf / fednh / fedloge personalised
# accuracy travels masked (the cohort's mean only); ccvr's statistics query, per-class feature sums and second
# moments, in a second secure instance (ServerMethod.statistics_sum_segments); rucr's class-means query the
# same way (full participation only: its prototypes are the cohort's) and its rectified heads' weighted sum;
# fedyoyo's pre-training dispersion query (the cohort's Σ eff) as an instance of its own before training's.
SECAGG_METHODS = ("fedavg", "fedprox", "focal", "fedlc", "fedavg-la", "flat-la", "ratio-loss", "redgrape", "grape-la",
                  "creff", "fedetf", "fednh", "fedgrab", "moon", "ccvr", "rucr", "fedyoyo", "fedloge", "zero-shot-clip",
                  "promptfl", "clip2fl")
# sam-rho computes each step's loss twice (at the weights and at the perturbed weights): methods whose loss() is a
# pure function of the model and the batch. Not: fedgrab (its loss draws exemptions and accumulates the step's
# statistics), rucr and moon (they accumulate their feature / contrastive loss), fedyoyo (advances its prior per
# call), the CLIP methods (a frozen backbone, prompts trained by their own rules).
SAM_METHODS = ("fedavg", "fedprox", "focal", "fedlc", "fedavg-la", "flat-la", "ratio-loss", "climb", "redgrape",
               "grape-la", "creff", "ccvr", "fedic", "fedetf", "fednh", "fedloge")
# need the clip extra and clip-weights (fedlt_app/clip)
CLIP_METHODS = ("zero-shot-clip", "promptfl", "capt", "clip2fl")
SERVER_OPTS = ("fedavg", "fedavgm", "fedadam")
AL_METHODS = ("fairfal", "random", "entropy")  # active learning (fedlt_app/active)
PRECISIONS = ("fp32", "bf16", "fp16", "auto")  # see fedlt_app/precision.py
AUGMENT_POLICIES = ("authors", "crop-flip")  # see fedlt_app/data/transforms.py
# Mirroring a digit or a handwritten letter makes another glyph (or none); a garment stays a garment.
_FLIP_UNSAFE_DATASETS = ("mnist", "femnist")
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

Check = Callable[[Any], str | None]


def augment_policy_problem(policy: str, dataset: str) -> str | None:
    """Why ``augment=policy`` cannot run on ``dataset`` (None when it can): the one home of this rule, for
    ``resolve`` and for the transform itself."""
    if policy not in AUGMENT_POLICIES:
        return f"augment: unknown value {policy!r}; allowed values are {', '.join(AUGMENT_POLICIES)}"
    if policy == "crop-flip" and dataset in _FLIP_UNSAFE_DATASETS:
        return (f"augment: 'crop-flip' mirrors images, which turns {dataset}'s digits or letters into other glyphs; "
                "use augment='authors' (no augmentation, as the authors) or dataset=fmnist")
    return None


def one_of(*allowed: str) -> Check:
    return lambda v: None if v in allowed else f"must be one of {', '.join(allowed)}"


def at_least(low: float, strict: bool = False) -> Check:
    def check(v: Any) -> str | None:
        ok = v > low if strict else v >= low
        return None if ok and math.isfinite(v) else f"must be {'>' if strict else '>='} {low}"

    return check


def in_range(low: float, high: float) -> Check:
    return lambda v: None if low <= v < high else f"must be in [{low}, {high})"


def in_unit_interval(v: float) -> str | None:
    """0 <= v <= 1 (both ends meaningful, e.g. a smoothing weight)."""
    return None if 0.0 <= v <= 1.0 else "must be in [0, 1]"


def in_range_closed(low: float, high: float) -> Check:
    """low < v <= high."""
    return lambda v: None if low < v <= high else f"must be in ({low}, {high}]"


def parsed_by(parse: Callable[[str], object], message: str) -> Check:
    """A check that ``parse`` accepts the value (it raises ValueError otherwise)."""
    def check(v: str) -> str | None:
        try:
            parse(v)
        except ValueError:
            return message
        return None

    return check


def parse_class_list(text: str) -> tuple[int, ...]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    values = tuple(int(s) for s in items)
    if not values or any(v < 0 for v in values):
        raise ValueError(text)
    return values


def parse_float_list(text: str) -> tuple[float, ...]:
    """``"-0.5,0,0.5"`` -> (-0.5, 0.0, 0.5); ValueError on an empty list, a non-number or a repeat."""
    values = tuple(float(part) for part in text.split(","))
    if len(set(values)) != len(values) or not all(math.isfinite(v) for v in values):
        raise ValueError(text)
    return values


class_list = parsed_by(parse_class_list, 'must be comma-separated class indices, e.g. "0,7,8"')
float_list = parsed_by(parse_float_list, 'must be distinct comma-separated numbers, e.g. "-0.5,-0.25,0,0.25,0.5"')


def optional_class_list(v: str) -> str | None:
    return None if not v.strip() else class_list(v)


def positive_int_list(v: str) -> str | None:
    try:
        values = parse_class_list(v)
    except ValueError:
        values = (0,)
    return None if min(values) >= 1 else 'must be comma-separated positive integers, e.g. "1,2,3,5,7,10"'


@dataclass(frozen=True)
class Option:
    key: str
    kind: type
    default: Any
    help: str
    check: Check | None = None


SCHEMA: tuple[Option, ...] = (
    Option("preset", str, "", "name of a file in conf/ (without .yaml) merged under explicit overrides"),
    Option("method", str, "redgrape", "client/server method", one_of(*METHOD_NAMES)),
    Option("dataset", str, "fmnist", "data set (femnist: natural long tail and clients, needs partition=writers)",
           one_of("mnist", "fmnist", "cifar10", "cifar100", "femnist")),
    Option("data-dir", str, "", "where data sets live (Fashion-MNIST is also found in /usr/share/datasets)"),
    Option("samples-per-class", int, 0, "quick subset: at most this many train and test samples per class (0 = all)",
           at_least(0)),
    Option("imbalance-profile", str, "exp", "long-tail profile of the training set", one_of("exp", "step")),
    Option("imbalance-ratio", float, 100.0, "largest / smallest class size", at_least(1.0)),
    Option("minority-classes", str, "0,7,8", "classes cut by the step profile", class_list),
    Option(
        "partition",
        str,
        "dirichlet",
        "dirichlet: equal quotas with Dir(alpha*p) label mixes (authors' code); "
        "dirichlet-per-class: flwr-datasets' per-class split; iid; "
        "writers: FEMNIST's writers as clients (writer w to client w mod num-clients); "
        "dir-balance: FairFAL's equal-size clients with Dir(alpha) label mixes",
        one_of("dirichlet", "dirichlet-per-class", "iid", "writers", "dir-balance"),
    ),
    Option("dirichlet-alpha", float, 1.0, "Dirichlet concentration (smaller = more non-iid)",
           at_least(0.0, strict=True)),
    Option("model", str, "cnn", "network", one_of("cnn", "cnn-mcmahan", "resnet56", "cnn4conv")),
    Option("num-server-rounds", int, 15, "federated rounds", at_least(1)),
    Option("clients-per-round", int, 0, "clients sampled per round (0 = all)", at_least(0)),
    Option("local-epochs", int, 1, "local epochs per round", at_least(1)),
    Option("batch-size", int, 64, "local mini-batch size", at_least(1)),
    Option("local-lr", float, 0.05, "client SGD learning rate", at_least(0.0, strict=True)),
    Option("momentum", float, 0.9, "client SGD momentum", in_range(0.0, 1.0)),
    Option("grad-clip", float, 1.0, "global gradient-norm clip per step (0 = off)", at_least(0.0)),
    Option("weight-decay", float, 0.0, "L2 weight decay of the local SGD, as torch.optim.SGD's weight_decay "
           "(0 = none, fedlt's protocols; FedLTLib's shared optimiser uses 1e-5)", at_least(0.0)),
    Option("lr-decay", float, 1.0, "local lr x this in the rounds past lr-decay-after of them (of each cycle's "
           "rounds in active learning; FairFAL's code: 0.1); 1 = a constant lr", in_range_closed(0.0, 1.0)),
    Option("lr-decay-after", float, 0.75, "fraction of the rounds after which lr-decay applies: round r (from 1) "
           "is decayed when r - 1 > floor(fraction x rounds), as FairFAL's code", in_unit_interval),
    Option("augment", str, "authors", "training-time augmentation: authors (the papers' pipelines: CIFAR crop + "
           "flip + Cutout, MNIST-type none) or crop-flip (fedlt's, Fashion-MNIST: RandomCrop(28, padding 2) + "
           "horizontal flip; CIFAR as authors)", one_of(*AUGMENT_POLICIES)),
    Option("prox-mu", float, 0.0, "FedProx proximal coefficient mu", at_least(0.0)),
    Option("server-lr", float, 1.0, "server learning rate on the averaged update", at_least(0.0, strict=True)),
    Option("server-opt", str, "fedavg", "server optimizer on the averaged update (Flower's FedAvgM / FedAdam)",
           one_of(*SERVER_OPTS)),
    Option("server-momentum", float, 0.9, "FedAvgM's server momentum (server-opt=fedavgm)", in_range(0.0, 1.0)),
    Option("swa-start", int, 0, "server-side weight averaging: from this round on the server evaluates (and saves) "
           "the running mean of the networks it evaluated since, while training continues from the latest global "
           "model (0 = off; fedlt_app/swa.py)", at_least(0)),
    Option("sam-rho", float, 0.0, "sharpness-aware minimisation of the local SGD (SAM, Foret et al. 2021; FedSAM, "
           "Caldarola et al. 2022): each step takes the gradient at the weights moved sam-rho along the normalised "
           "gradient, two forward-backward passes a step (0 = off; fedlt_app/train.py)", at_least(0.0)),
    Option("focal-gamma", float, 2.0, "Fed-Focal's focusing parameter gamma", at_least(0.0)),
    Option("fedlc-tau", float, 1.0,
           "FedLC's calibration strength tau: logits z_c - tau * n_c^(-1/4) with the client's own class counts "
           "(FedLTLib's default 1.0; 0 = plain cross-entropy)", at_least(0.0)),
    Option("fedlc-counts", str, "client",
           "FedLC: whose class counts n_c calibrate a client's logits: client (its own, the paper's; a class it "
           "lacks leaves its softmax) or federation (every client's summed, FedLTLib's serverlc.py: one calibration "
           "for all, from counts the clients report)", one_of("client", "federation")),
    Option("moon-mu", float, 1.0,
           "MOON's mu: weight of the model-contrastive term (official --mu default 1; the paper's CIFAR-10: 5)",
           at_least(0.0)),
    Option("moon-temperature", float, 0.5, "MOON's temperature tau of the contrastive term (official default 0.5)",
           at_least(0.0, strict=True)),
    Option("fednh-smoothing", float, 0.9,
           "FedNH's rho: the server's prototypes move to normalise(rho * old + (1 - rho) * clients' class means) "
           "(official FedNH_smoothing 0.9; 1 = fixed prototypes)", in_unit_interval),
    Option("fedgrab-kp", float, 10.0, "Fed-GraB: proportional gain K_p of each class's PID controller (official 10)",
           at_least(0.0)),
    Option("fedgrab-ki", float, 0.01, "Fed-GraB: integral gain K_i of each class's PID controller (official 0.01)",
           at_least(0.0)),
    Option("fedgrab-kd", float, 0.1, "Fed-GraB: derivative gain K_d of each class's PID controller (official 0.1)",
           at_least(0.0)),
    Option("fedgrab-balance-classes", str, "all",
           "Fed-GraB: classes whose gradients the balancer re-weights: all (the official code, which has no DPA) "
           "or dpa-tail (the paper's Direct Prior Analyzer: the tail of the prior estimated from the global "
           "classifier's weight norms, from round 2)", one_of("all", "dpa-tail")),
    Option("fedyoyo-lambda", float, 4.0,
           "FedYoYo: weight lambda of the self-distillation (KL weak -> strong view) after its warm-up "
           "(authors' fedyoyo.sh 4.0; 0 = logit adjustment alone)", at_least(0.0)),
    Option("fedyoyo-temperature", float, 1.5, "FedYoYo: distillation temperature T (authors' default 1.5)",
           at_least(0.0, strict=True)),
    Option("fedyoyo-tau", float, 1.5, "FedYoYo: exponent tau of the logit adjustment log(prior^tau) "
           "(authors' default 1.5; 0 = no adjustment)", at_least(0.0)),
    Option("fedyoyo-gamma", float, 0.1,
           "FedYoYo: per-step pull gamma of the prior toward the client's own label distribution "
           "(authors' fedyoyo.sh 0.1)", in_unit_interval),
    Option("fedyoyo-warmup", int, 50, "FedYoYo: rounds over which the distillation weight grows linearly to "
           "lambda (authors' fedyoyo.sh 50; 0 = full weight from round 1)", at_least(0)),
    Option("fedyoyo-cap-effective", bool, False,
           "FedYoYo, fedlt's fix (off = the authors' code): cap each batch's effective weight of a class at the "
           "number of its samples in the batch, so that a client's only two samples of a class (exactly opposite "
           "once centred) count as 2, not as the 1e6 of the floored cosine"),
    Option("ratio-aux-per-class", int, 32, "Ratio Loss: server auxiliary samples per class", at_least(1)),
    Option("climb-epsilon", float, 0.01, "CLIMB's constraint slack epsilon", at_least(0.0)),
    Option("climb-dual-lr", float, 2.0, "CLIMB's dual step size eta_D", at_least(0.0, strict=True)),
    Option("creff-features-per-class", int, 100, "CReFF: federated features per class", at_least(1)),
    Option("creff-match-steps", int, 100, "CReFF: feature-matching steps per round", at_least(1)),
    Option("creff-feature-lr", float, 0.1, "CReFF: learning rate of the federated features",
           at_least(0.0, strict=True)),
    Option("creff-retrain-epochs", int, 300, "CReFF: classifier re-training epochs (batch 32, at creff-retrain-lr)",
           at_least(1)),
    Option("creff-retrain-lr", float, 0.01, "CReFF: learning rate of the classifier re-training (official lr_net)",
           at_least(0.0, strict=True)),
    Option("ccvr-virtual-per-class", int, 2000, "CCVR: virtual features drawn per class (the paper's M_c; "
           "FedLTLib's num_vr)", at_least(1)),
    Option("ccvr-retrain-epochs", int, 10, "CCVR: classifier calibration epochs (SGD momentum 0.9, weight decay "
           "1e-5, batch batch-size; FedLTLib's retrain_epoch)", at_least(1)),
    Option("ccvr-retrain-lr", float, 0.001, "CCVR: learning rate of the classifier calibration (FedLTLib's "
           "retrain_lr)", at_least(0.0, strict=True)),
    Option("ccvr-calibrate", str, "every-round",
           "CCVR: calibrate (and evaluate calibrated) every round's global model, or only the last round's "
           "(FedLTLib: once, after training); training never sees the calibrated classifier",
           one_of("every-round", "final")),
    Option("rucr-feature-weight", float, 0.15,
           "RUCR: weight of the balanced prototype (representation unification) term (official run's "
           "feat_loss_arg 0.15; 0 = cross-entropy alone)", at_least(0.0)),
    Option("rucr-temperature", float, 0.9, "RUCR: temperature t of the prototype cosines (official run's t 0.9)",
           at_least(0.0, strict=True)),
    Option("rucr-times", float, 1.0,
           "RUCR: factor of the cohort's log class ratio added to the target logit (official times 1.0)",
           at_least(0.0)),
    Option("rucr-crt-rounds", int, 20,
           "RUCR: classifier rectification in rounds r with num-server-rounds - r <= this, i.e. the last "
           "rucr-crt-rounds + 1 (official crt_ep 20)", at_least(0)),
    Option("rucr-crt-epochs", int, 50, "RUCR: epochs of each client's classifier re-training (official local_bal_ep)",
           at_least(0)),
    Option("rucr-crt-features-per-class", int, 100,
           "RUCR: mixed features per class for the re-training (official crt_feat_num)", at_least(1)),
    Option("rucr-crt-lr", float, 0.01, "RUCR: learning rate of the classifier re-training (official lr_cls_balance)",
           at_least(0.0, strict=True)),
    Option("rucr-crt-batch-size", int, 256, "RUCR: batch size of the classifier re-training (official "
           "crt_batch_size)", at_least(1)),
    Option("rucr-mixup-low", float, 0.35, "RUCR: lower end of the mixing weight lambda (official uniform_left)",
           in_unit_interval),
    Option("rucr-mixup-high", float, 0.95, "RUCR: upper end of the mixing weight lambda (official uniform_right)",
           in_unit_interval),
    Option("fedic-server-data", str, "",
           "FedIC: the server's labeled and unlabeled data; heldout = training-split images on no client (per "
           "class the first fedic-teach-per-class labeled, the rest unlabeled). No default: method=fedic must "
           "set it", one_of("", "heldout")),
    Option("fedic-teach-per-class", int, 100, "FedIC: labeled server images per class (official 100)", at_least(1)),
    Option("fedic-steps", int, 100, "FedIC: Adam steps of each server stage: refine, calibrate, distil (official 100)",
           at_least(1)),
    Option("fedic-lr", float, 0.001, "FedIC: Adam learning rate of the server stages (official lr_global_teaching)",
           at_least(0.0, strict=True)),
    Option("fedic-temperature", float, 2.0, "FedIC: distillation temperature (official 2)", at_least(0.0, strict=True)),
    Option("fedic-ld", float, 0.5, "FedIC: weight of the distillation term; 1 - ld weighs the labeled "
           "cross-entropy (official ld 0.5)", in_unit_interval),
    Option("fedic-labeled-batch-size", int, 20, "FedIC: labeled server batch (official mini_batch_size)", at_least(1)),
    Option("fedic-unlabeled-batch-size", int, 128, "FedIC: unlabeled server batch (official "
           "mini_batch_size_unlabeled)", at_least(1)),
    Option("fedetf-temperature", float, 1.0,
           "FedETF: initial value of the learnable temperature beta on the ETF logits (official scaling_train of "
           "its ResNets: 1.0)", at_least(0.0, strict=True)),
    Option("fedetf-finetune", str, "last-round",
           "FedETF: when each trained client fine-tunes its personal model (ETF and projection, alternately) for "
           "the personalised accuracy: last-round (the official code: once, after training), every-round, or off "
           "(the personal model is the locally trained one)", one_of("last-round", "every-round", "off")),
    Option("fedetf-finetune-rounds", int, 20, "FedETF: alternations of the personal fine-tuning (official 20)",
           at_least(1)),
    Option("fedetf-finetune-epochs", int, 3,
           "FedETF: local epochs of each fine-tuning step, ETF and projection each (official 3)", at_least(1)),
    Option("fedetf-finetune-etf-lr", float, 0.1, "FedETF: SGD lr of the ETF fine-tuning, no momentum (official 0.1)",
           at_least(0.0, strict=True)),
    Option("fedetf-finetune-projection-lr", float, 0.05,
           "FedETF: SGD lr of the projection fine-tuning, momentum as momentum (official 0.05)",
           at_least(0.0, strict=True)),
    Option("fedloge-sparsity", float, 0.6,
           "FedLoGe: fraction beta of the SSE-C's entries set to zero, drawn uniformly (official gen_sparse_ETF "
           "beta 0.6)", in_range(0.0, 1.0)),
    Option("fedloge-sse-norm", float, 0.1,
           "FedLoGe: norm the SSE-C's class vectors are optimised towards (official 0.1; FedLTLib 1.0)",
           at_least(0.0, strict=True)),
    Option("fedloge-sse-steps", int, 10000,
           "FedLoGe: Adam steps (lr 1e-4) that optimise the SSE-C's surviving entries (official 10000)", at_least(0)),
    Option("fedloge-gha-norm", float, 1.7,
           "FedLoGe: norm gamma of every class row of the auxiliary global head after the global realignment "
           "(GHA; official globaltest_calibra 1.7)", at_least(0.0, strict=True)),
    Option("fedloge-realign", str, "every-round",
           "FedLoGe: rounds whose global model is g_aux realigned (GHA) and whose personalised models are "
           "realigned (LA): every-round, last-round (the official step 2, after training) or off (the official "
           "per-round log: the SSE-C model; local + aux heads)", one_of("every-round", "last-round", "off")),
    Option("rebalance-lambda", float, 0.1, "RedGrape's lambda: weight of the re-balancing step", at_least(0.0)),
    Option("rebalance-step", str, "plain",
           "RedGrape: plain (authors' code: an extra momentum-free step on W after the optimizer step) or "
           "combined (the paper's Eq. 13: the re-balancing term joins W's gradient before clipping and SGD-momentum)",
           one_of("plain", "combined")),
    Option("grape-la-prior", str, "global",
           "GRAPE-LA (fedlt's method): the class prior in the adjusted loss CE(z + tau*log prior): global "
           "(the federation's, summed from client counts; a client's own in round 1) or local (the client's own)",
           one_of("global", "local")),
    Option("grape-la-tau", float, 1.0, "GRAPE-LA: strength tau of the logit adjustment (0 = RedGrape exactly)",
           at_least(0.0)),
    Option("fedavg-la-prior", str, "global",
           "FedAvg-LA (fedlt's ablation of GRAPE-LA): the class prior in CE(z + tau*log prior): global (the "
           "federation's, summed from client counts; a client's own in round 1) or local (the client's own)",
           one_of("global", "local")),
    Option("fedavg-la-tau", float, 1.0, "FedAvg-LA: strength tau of the logit adjustment (0 = FedAvg+CE exactly)",
           at_least(0.0)),
    Option("fedavg-la-posthoc", str, "none",
           "FedAvg-LA and FLAT-LA: a further post-hoc adjustment of the evaluated network's logits, z - tau'*log "
           "prior, with tau' chosen every round without test data: none, or training-recall (each client counts "
           "its own training images the network gets right per class and candidate tau'; the server picks the "
           "tau' of highest balanced recall over the summed counts; README 'fedlt's method: FLAT-LA')",
           one_of("none", "training-recall")),
    Option("fedavg-la-posthoc-grid", str, "-1,-0.75,-0.5,-0.25,0,0.25,0.5,0.75,1",
           "fedavg-la-posthoc=training-recall: the candidate strengths tau', comma-separated (0, the network "
           "unchanged, is always a candidate)", float_list),
    Option("flat-la-tau", float, 1.5,
           "FLAT-LA (fedlt's method: FedAvg-LA's loss, flat minima): strength tau of its logit adjustment (it sets "
           "fedavg-la-tau; 0 = cross-entropy). 1.5, not FedAvg-LA's 1: once the long tail is memorised, the margin "
           "tau 1 trains in under-corrects at test time (README 'fedlt's method: FLAT-LA')", at_least(0.0)),
    Option("flat-la-rho", float, 0.05,
           "FLAT-LA (fedlt's method: FedAvg-LA's loss, flat minima): the SAM radius of its local steps (it sets "
           "sam-rho; 0 = plain SGD steps)", at_least(0.0)),
    Option("flat-la-average-from", float, 0.5,
           "FLAT-LA: fraction f of the rounds after which the server evaluates the running mean of the global "
           "models, from round floor(f x num-server-rounds) + 1 on (it sets swa-start; 1 = no averaging)",
           in_range_closed(0.0, 1.0)),
    Option("flat-la-posthoc", str, "none",
           "FLAT-LA: its test-free post-hoc adjustment (it sets fedavg-la-posthoc): none or training-recall",
           one_of("none", "training-recall")),
    Option("clip-weights", str, "",
           "CLIP methods: local file of OpenAI-format CLIP weights, e.g. ViT-B-16.pt (never downloaded; README "
           "'CLIP methods')"),
    Option("promptfl-n-ctx", int, 16, "PromptFL: learnable context vectors shared by all classes (CoOp's 16)",
           at_least(1)),
    Option("capt-n-ctx", int, 4, "CAPT: learned prompt tokens per class, general + class-aware (the code's 4)",
           at_least(2)),
    Option("capt-n-general", int, 1, "CAPT: general prompt tokens n_g (< capt-n-ctx; also the visual prompts)",
           at_least(1)),
    Option("capt-temperature", float, 0.1, "CAPT: temperature T of the two contrastive terms",
           at_least(0.0, strict=True)),
    Option("capt-alpha", float, 1.0, "CAPT: weight of the general-prompt term L_G", at_least(0.0)),
    Option("capt-beta", float, 1.0, "CAPT: weight of the class-aware term L_CA", at_least(0.0)),
    Option("capt-prior", str, "global",
           "CAPT: class prior of L_LA and L_CA: global (the federation's, summed from the counts clients share; "
           "a client's own before any arrived) or local (the client's own); the code reads the global training "
           "labels directly", one_of("global", "local")),
    Option("capt-class-threshold", float, 0.1,
           "CAPT: a client's a_c joins class c's aggregate when its class share p_kc exceeds this (the code's 0.1)",
           in_unit_interval),
    Option("capt-sim-clusters", int, 4, "CAPT: KMeans clusters of clients by label-distribution similarity",
           at_least(1)),
    Option("capt-comp-clusters", int, 4, "CAPT: complete-linkage clusters of clients by head/tail complementarity",
           at_least(1)),
    Option("capt-mab-arms", str, "1,2,3,5,7,10", "CAPT: the bandit's arms: global aggregation every this many rounds",
           positive_int_list),
    Option("capt-mab-epsilon", float, 0.1, "CAPT: the bandit's exploration probability", in_unit_interval),
    Option("capt-mab-reward", str, "val",
           "CAPT: val (the bandit's reward from the clients' accuracy and macro-F1 of the model they received, on "
           "their own data; never test labels) or off (global aggregation every round, no bandit)",
           one_of("val", "off")),
    Option("capt-mask", str, "fixed",
           "CAPT: fixed (rows of a for classes absent from the batch do not move: masked before the step, restored "
           "after it) or code (the code's mask runs after the step: every row moves)", one_of("fixed", "code")),
    Option("capt-weight-decay", float, 5e-4, "CAPT: SGD weight decay on g, a and F (Dassl's default)", at_least(0.0)),
    Option("capt-contrastive-space", str, "token",
           "CAPT: what image features meet in L_CA: token (the code: mean class-aware token embeddings) or "
           "text-feature (the encoded class prompts)", one_of("token", "text-feature")),
    Option("capt-share-histogram", bool, True,
           "CAPT: clients send their label counts (a label-distribution disclosure) for clustering, the per-class "
           "rule and the global prior; false: no clustering, FedAvg of all prompts (the code's fedavg ablation)"),
    Option("capt-deliver-clusters", bool, True,
           "CAPT: a cluster's averaged prompts start its members' next round (fedlt's fix); false: each node "
           "restarts from its own prompts and cluster averages only reach the global aggregation (the code)"),
    Option("clip2fl-alpha", float, 2.0, "CLIP2FL: weight of the distillation from CLIP's zero-shot logits (code: 2)",
           at_least(0.0)),
    Option("clip2fl-temperature", float, 3.0, "CLIP2FL: distillation temperature T (code: 3)",
           at_least(0.0, strict=True)),
    Option("clip2fl-contrast-weight", float, 0.001,
           "CLIP2FL: weight of the text-guided contrastive term in the server's feature matching (code: 0.001; "
           "needs the model's feature width = CLIP's, e.g. cnn-mcmahan's 512; 0 = off)", at_least(0.0)),
    Option("clip2fl-contrast-temperature", float, 0.1, "CLIP2FL: temperature of that term (code's ins_temp 0.1)",
           at_least(0.0, strict=True)),
    Option("balance-threshold", int, 8, "RedGrape's T: real samples per class in the local balanced set", at_least(1)),
    Option("synthetic-data", str, "off",
           "ReGL: regl = every client adds generated images of its minority and missing classes to its training "
           "data (any method; README 'ReGL'); off = real data only", one_of("off", "regl")),
    Option("regl-generator", str, "",
           "ReGL: local diffusers text-to-image pipeline folder, e.g. Stable Diffusion (never downloaded; README "
           "'ReGL: weights')"),
    Option("regl-target", str, "balanced-max",
           "ReGL: count each class is filled to: balanced-max (the client's largest class), fixed "
           "(regl-synthetic-per-class), global-prior (the client's largest class times the federation's prior "
           "relative to its largest class)", one_of(*REGL_TARGETS)),
    Option("regl-synthetic-per-class", int, 400, "ReGL: the count of regl-target=fixed (FGL's 400)", at_least(0)),
    Option("regl-prompt", str, "A photo of {class}", "ReGL: prompt template; {class} is the class name (paper)",
           lambda v: None if "{class}" in v else "must contain {class}"),
    Option("regl-negative-prompt", str, "", "ReGL: negative prompt (empty = none; FGL: 'low quality, low resolution')"),
    Option("regl-steps", int, 50, "ReGL: denoising steps per image (FGL's 50)", at_least(1)),
    Option("regl-guidance", float, 2.0, "ReGL: classifier-free guidance scale (FGL's 2)", at_least(0.0)),
    Option("regl-resolution", int, 0, "ReGL: generation size in pixels (0 = the pipeline's native size)",
           at_least(0)),
    Option("regl-batch-size", int, 8, "ReGL: images per pipeline call (memory only: images do not depend on it)",
           at_least(1)),
    Option("regl-lora", bool, False, "ReGL: adapt the pipeline's UNet to the client's images with LoRA first"),
    Option("regl-lora-rank", int, 4, "ReGL: LoRA rank (alpha = rank; assumed)", at_least(1)),
    Option("regl-lora-steps", int, 200, "ReGL: LoRA training steps per client (assumed)", at_least(1)),
    Option("regl-lora-lr", float, 1e-4, "ReGL: LoRA AdamW learning rate (assumed)", at_least(0.0, strict=True)),
    Option("regl-lora-batch-size", int, 4, "ReGL: real images per LoRA step (assumed)", at_least(1)),
    Option("regl-cache-dir", str, "", "ReGL: cache of generated images (empty = ~/.cache/fedlt/regl)"),
    Option("regl-weight-count", str, "all",
           "ReGL: samples a client's FedAvg weight counts: all (real + synthetic) or real", one_of("all", "real")),
    Option("regl-concurrent", int, 1, "ReGL: clients on one machine (one cache dir) generating at once",
           at_least(1)),
    Option("regl-generate-timeout", float, 86400.0, "ReGL: seconds the server waits for the generation phase",
           at_least(0.0, strict=True)),
    Option("round-timeout", float, 3600.0, "seconds to wait for a round's replies; late clients count as failed",
           at_least(0.0, strict=True)),
    Option("max-failure-fraction", float, 0.5, "stop the run when more of a round's clients fail",
           in_range(0.0, 1.0001)),
    Option("secure-aggregation", str, "off",
           "secagg: the server sees only masked sums of the clients' updates (README 'Secure aggregation'); "
           "off: plain updates", one_of("off", "secagg")),
    Option("secagg-min-cohort", int, 3, "secure aggregation: a round with fewer clients than this refuses to aggregate",
           at_least(2)),
    Option("checkpoint-every", int, 10, "write a resumable checkpoint every this many rounds (0 = never); "
           "active learning: after every cycle when above 0", at_least(0)),
    Option("resume-from", str, "", "a run directory whose checkpoint this run continues"),
    Option("persist-client-state", bool, True, "with checkpoints: clients of a method that keeps state (MOON, "
           "Fed-GraB, FedLoGe) write it to the run folder's client-state/ after each round, so that resume-from "
           "replays them; false: memory only (a resumed run starts new client states)"),
    Option("debug-fail-partitions", str, "", "fault injection: these partition ids raise in training (e.g. \"1,3\")",
           optional_class_list),
    Option("debug-hang-partitions", str, "", "fault injection: these partition ids stall past round-timeout",
           optional_class_list),
    Option("debug-pause-after-checkpoint", float, 0.0, "fault injection: the ServerApp waits this many seconds "
           "after writing each checkpoint, so that a test can kill the run at a known round", at_least(0.0)),
    Option("al-method", str, "none", "active learning: none (plain federated training), fairfal, random, entropy",
           one_of("none", *AL_METHODS)),
    Option("al-query-ratio", float, 0.05, "labeled ratio of the first cycle and added by every query",
           in_range_closed(0.0, 1.0)),
    Option("al-end-ratio", float, 0.45, "last labeled ratio (cycles run while round(ratio, 2) <= this)",
           in_range_closed(0.0, 1.0)),
    Option("fl-rounds-per-cycle", int, 100, "federated rounds of every active-learning cycle", at_least(1)),
    Option("al-reset-per-cycle", bool, True, "re-initialise the model at the start of every cycle"),
    Option("al-report-query-counts", bool, False,
           "clients report per-class counts of what they labeled (a label histogram; off by default)"),
    Option("al-cycle-curve", bool, False,
           "evaluate the global model after every round of each cycle and record the cycle's curve"),
    Option("fairfal-t", float, 0.5, "FairFAL's t in the query-model score", in_range_closed(0.0, 1.0)),
    Option("fairfal-global-threshold", float, 0.75, "global model for uncertainty when the score exceeds this"),
    Option("fairfal-gradnet-threshold", float, 0.5, "global model for gradient embeddings when r-bar is below this"),
    Option("fairfal-oversample", float, 4.0, "uncertainty candidates per class: this times the class quota",
           at_least(1.0)),
    Option("fairfal-proto-temperature", float, 1.5, "prototype softmax temperature (argmax only: no effect)",
           at_least(0.0, strict=True)),
    Option("fairfal-local-epochs", int, 50, "local-only model: at most this many epochs", at_least(1)),
    Option("fairfal-local-milestone", int, 37, "local-only model: lr x0.1 after this many steps (0 = never)",
           at_least(0)),
    Option("fairfal-local-milestone-unit", str, "batch", "unit of fairfal-local-milestone (the code: batch)",
           one_of("batch", "epoch")),
    Option("fairfal-local-early-stop", float, 0.99, "local-only model: stop at this training accuracy",
           in_range_closed(0.0, 1.0)),
    Option("fairfal-freeze-global-ratio", bool, True, "keep r-bar from the first query (the code) or renew it"),
    Option("fairfal-distance", str, "euclidean-squared", "k-center distance on gradient embeddings",
           one_of("euclidean-squared", "cosine")),
    Option("seed", int, 0, "seed of data, partition, initialisation, sampling and local shuffling"),
    Option("device", str, "auto", "where clients and server compute", one_of("auto", "cpu", "cuda")),
    Option("precision", str, "auto",
           "autocast dtype of forward passes: fp32, bf16, fp16 (CUDA only, loss scaling), "
           "auto (bf16 where the device runs it natively, else fp32); weights, updates, prototypes stay fp32",
           one_of(*PRECISIONS)),
    Option("output-dir", str, "outputs", "results go to <output-dir>/<run-name>/ (relative: to the app's directory)"),
    Option("run-name", str, "", "name of the run's result folder (empty = <method>-<dataset>-<timestamp>)"),
    Option("pictures", bool, True, "draw the run's pictures (curves.png, per_class.png, partition.png) when it "
           "ends; false: metrics and summary only (fedlt-report RUN_DIR draws them later)"),
    Option("wandb-mode", str, "disabled", "Weights & Biases logging", one_of("disabled", "offline", "online")),
    Option("wandb-project", str, "fedlt", "W&B project"),
)

OPTIONS: dict[str, Option] = {o.key: o for o in SCHEMA}


class ConfigError(ValueError):
    """A run-config value that cannot be used; the message names the key."""


@dataclass(frozen=True)
class RunConfig:
    """The validated run configuration, with Python names for the kebab-case keys."""

    preset: str
    method: str
    dataset: str
    data_dir: str
    samples_per_class: int
    imbalance_profile: str
    imbalance_ratio: float
    minority_classes: str
    partition: str
    dirichlet_alpha: float
    model: str
    num_server_rounds: int
    clients_per_round: int
    local_epochs: int
    batch_size: int
    local_lr: float
    momentum: float
    grad_clip: float
    weight_decay: float
    lr_decay: float
    lr_decay_after: float
    augment: str
    prox_mu: float
    server_lr: float
    server_opt: str
    server_momentum: float
    swa_start: int
    sam_rho: float
    focal_gamma: float
    fedlc_tau: float
    fedlc_counts: str
    moon_mu: float
    moon_temperature: float
    fednh_smoothing: float
    fedgrab_kp: float
    fedgrab_ki: float
    fedgrab_kd: float
    fedgrab_balance_classes: str
    fedyoyo_lambda: float
    fedyoyo_temperature: float
    fedyoyo_tau: float
    fedyoyo_gamma: float
    fedyoyo_warmup: int
    fedyoyo_cap_effective: bool
    ratio_aux_per_class: int
    climb_epsilon: float
    climb_dual_lr: float
    creff_features_per_class: int
    creff_match_steps: int
    creff_feature_lr: float
    creff_retrain_epochs: int
    creff_retrain_lr: float
    ccvr_virtual_per_class: int
    ccvr_retrain_epochs: int
    ccvr_retrain_lr: float
    ccvr_calibrate: str
    rucr_feature_weight: float
    rucr_temperature: float
    rucr_times: float
    rucr_crt_rounds: int
    rucr_crt_epochs: int
    rucr_crt_features_per_class: int
    rucr_crt_lr: float
    rucr_crt_batch_size: int
    rucr_mixup_low: float
    rucr_mixup_high: float
    fedic_server_data: str
    fedic_teach_per_class: int
    fedic_steps: int
    fedic_lr: float
    fedic_temperature: float
    fedic_ld: float
    fedic_labeled_batch_size: int
    fedic_unlabeled_batch_size: int
    fedetf_temperature: float
    fedetf_finetune: str
    fedetf_finetune_rounds: int
    fedetf_finetune_epochs: int
    fedetf_finetune_etf_lr: float
    fedetf_finetune_projection_lr: float
    fedloge_sparsity: float
    fedloge_sse_norm: float
    fedloge_sse_steps: int
    fedloge_gha_norm: float
    fedloge_realign: str
    rebalance_lambda: float
    rebalance_step: str
    grape_la_prior: str
    grape_la_tau: float
    fedavg_la_prior: str
    fedavg_la_tau: float
    fedavg_la_posthoc: str
    fedavg_la_posthoc_grid: str
    flat_la_tau: float
    flat_la_rho: float
    flat_la_average_from: float
    flat_la_posthoc: str
    clip_weights: str
    promptfl_n_ctx: int
    capt_n_ctx: int
    capt_n_general: int
    capt_temperature: float
    capt_alpha: float
    capt_beta: float
    capt_prior: str
    capt_class_threshold: float
    capt_sim_clusters: int
    capt_comp_clusters: int
    capt_mab_arms: str
    capt_mab_epsilon: float
    capt_mab_reward: str
    capt_mask: str
    capt_weight_decay: float
    capt_contrastive_space: str
    capt_share_histogram: bool
    capt_deliver_clusters: bool
    clip2fl_alpha: float
    clip2fl_temperature: float
    clip2fl_contrast_weight: float
    clip2fl_contrast_temperature: float
    balance_threshold: int
    synthetic_data: str
    regl_generator: str
    regl_target: str
    regl_synthetic_per_class: int
    regl_prompt: str
    regl_negative_prompt: str
    regl_steps: int
    regl_guidance: float
    regl_resolution: int
    regl_batch_size: int
    regl_lora: bool
    regl_lora_rank: int
    regl_lora_steps: int
    regl_lora_lr: float
    regl_lora_batch_size: int
    regl_cache_dir: str
    regl_weight_count: str
    regl_concurrent: int
    regl_generate_timeout: float
    round_timeout: float
    max_failure_fraction: float
    secure_aggregation: str
    secagg_min_cohort: int
    checkpoint_every: int
    resume_from: str
    persist_client_state: bool
    debug_fail_partitions: str
    debug_hang_partitions: str
    debug_pause_after_checkpoint: float
    al_method: str
    al_query_ratio: float
    al_end_ratio: float
    fl_rounds_per_cycle: int
    al_reset_per_cycle: bool
    al_report_query_counts: bool
    al_cycle_curve: bool
    fairfal_t: float
    fairfal_global_threshold: float
    fairfal_gradnet_threshold: float
    fairfal_oversample: float
    fairfal_proto_temperature: float
    fairfal_local_epochs: int
    fairfal_local_milestone: int
    fairfal_local_milestone_unit: str
    fairfal_local_early_stop: float
    fairfal_freeze_global_ratio: bool
    fairfal_distance: str
    seed: int
    device: str
    precision: str
    output_dir: str
    run_name: str
    pictures: bool
    wandb_mode: str
    wandb_project: str

    @property
    def minority_class_tuple(self) -> tuple[int, ...]:
        return parse_class_list(self.minority_classes)

    def local_lr_at(self, server_round: int) -> float:
        """The clients' learning rate in ``server_round`` (from 1; in active learning the run-wide round, whose
        place in its cycle decides): ``local-lr``, times ``lr-decay`` past ``lr-decay-after`` of the rounds."""
        rounds = self.fl_rounds_per_cycle if self.al_method != "none" else self.num_server_rounds
        index = (server_round - 1) % rounds  # a plain run's rounds never pass num-server-rounds
        return self.local_lr * (self.lr_decay if index > math.floor(self.lr_decay_after * rounds) else 1.0)

    def as_dict(self) -> dict[str, Any]:
        """Kebab-case keys, as a user writes them."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}


def _coerce(option: Option, value: Any) -> Any:
    """Cast a TOML/YAML value to the option's type, refusing lossy casts."""
    kind = option.kind
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind is str and isinstance(value, str):
        return value
    if kind is bool and isinstance(value, bool):
        return value
    raise ConfigError(f"{option.key}: expected {kind.__name__}, got {value!r} ({type(value).__name__})")


def load_preset(name: str) -> dict[str, Any]:
    path = CONF_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONF_DIR.glob("*.yaml"))
        raise ConfigError(f"preset: no preset {name!r} in {CONF_DIR}; known presets: {', '.join(known)}")
    loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(loaded, dict):
        raise ConfigError(f"preset: {path} must hold a mapping of run-config keys")
    if "preset" in loaded:
        raise ConfigError(f"preset: {path} must not name another preset")
    return loaded


def defaults() -> dict[str, Any]:
    return {o.key: o.default for o in SCHEMA}


# What a run recorded before a key existed actually did, where that is not the key's default today.
BEFORE_KEY: dict[str, Callable[[Mapping[str, Any]], Any]] = {
    "precision": lambda ran: "fp32",  # before `precision`, runs were float32 (the default is now auto)
    "persist-client-state": lambda ran: False,  # before it, client state lived in memory only
    # CReFF re-trained at the local lr; for other methods the key changes nothing
    "creff-retrain-lr": lambda ran: ran.get("local-lr") if ran.get("method") == "creff" else OPTIONS[
        "creff-retrain-lr"].default,
    # FLAT-LA took its strength from fedavg-la-tau (1 by default) before flat-la-tau (1.5) existed
    "flat-la-tau": lambda ran: ran.get("fedavg-la-tau", 1.0) if ran.get("method") == "flat-la" else OPTIONS[
        "flat-la-tau"].default,
}


def recorded_value(ran: Mapping[str, Any], key: str) -> Any:
    """The value of ``key`` a recorded run config (config.json, a checkpoint) ran with.

    A key missing from an older record counts as what runs did before the key
    existed, so a resume or a sweep never mistakes an old run for a new setting.
    """
    if key in ran:
        return ran[key]
    if key in BEFORE_KEY:
        return BEFORE_KEY[key](ran)
    return OPTIONS[key].default if key in OPTIONS else None


def resolve_recorded(ran: Mapping[str, Any]) -> RunConfig:
    """The config a recorded run (config.json, a checkpoint, a final model) ran with, resolved: keys added
    since it ran take the value that reproduces what it did (:func:`recorded_value`), not today's default."""
    return resolve({key: recorded_value(ran, key) for key in OPTIONS})


def flat_la_average_start(fraction: float, num_server_rounds: int) -> int:
    """The first averaged round of FLAT-LA's ``flat-la-average-from`` (0: no averaging): past the fraction's
    share of the rounds, e.g. 0.5 of 100 rounds -> round 51."""
    return math.floor(fraction * num_server_rounds) + 1 if fraction < 1 else 0


def _set_flat_la_mechanisms(values: dict[str, Any]) -> None:
    """FLAT-LA is FedAvg-LA's loss over three of fedlt's general mechanisms, set from its own keys: the
    adjustment's strength (fedavg-la-tau <- flat-la-tau), SAM local steps (sam-rho <- flat-la-rho), server
    momentum (server-opt <- fedavgm, at server-momentum), server-side weight averaging (swa-start <-
    flat-la-average-from) and the test-free post-hoc adjustment (fedavg-la-posthoc <- flat-la-posthoc). A
    general key given another value is refused, so a
    config never says two things; given the same value (a recorded, resolved config) it is accepted."""
    implied = {
        "fedavg-la-tau": (values["flat_la_tau"], "flat-la-tau"),
        "sam-rho": (values["flat_la_rho"], "flat-la-rho"),
        "swa-start": (flat_la_average_start(values["flat_la_average_from"], values["num_server_rounds"]),
                      "flat-la-average-from"),
        "server-opt": ("fedavgm", "server-momentum (0 = no momentum)"),
        "fedavg-la-posthoc": (values["flat_la_posthoc"], "flat-la-posthoc"),
    }
    for key, (value, own_key) in implied.items():
        name, default = key.replace("-", "_"), OPTIONS[key].default
        if values[name] not in (default, value):
            raise ConfigError(f"{key}: method 'flat-la' sets it ({value!r} here) from {own_key}; leave {key} at "
                              f"{default!r} (got {values[name]!r})")
        values[name] = value
    if values["al_method"] != "none":
        raise ConfigError("al-method: method 'flat-la' is for plain federated runs, not active learning")


def resolve(run_config: Mapping[str, Any]) -> RunConfig:
    """Merge defaults < preset < explicit values and validate every key.

    Flower fuses pyproject defaults and ``--run-config`` overrides into one
    mapping, so a key counts as explicit when its value differs from the
    schema default; the preset then fills in only the keys left at default.
    """
    given = dict(run_config)
    unknown = sorted(set(given) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"unknown run-config key(s): {', '.join(unknown)}; known keys: {', '.join(OPTIONS)}")
    for key, value in given.items():
        _coerce(OPTIONS[key], value)  # a wrong type fails even where it compares equal (True == 1)
    explicit = {k: v for k, v in given.items() if v != OPTIONS[k].default}
    merged = defaults()
    preset = explicit.get("preset", "")
    if preset:
        if not isinstance(preset, str):
            raise ConfigError(f"preset: expected str, got {preset!r}")
        preset_values = load_preset(preset)
        unknown = sorted(set(preset_values) - set(OPTIONS))
        if unknown:
            raise ConfigError(f"preset {preset!r}: unknown key(s) {', '.join(unknown)}")
        merged.update(preset_values)
    merged.update(explicit)
    values: dict[str, Any] = {}
    for option in SCHEMA:
        value = _coerce(option, merged[option.key])
        problem = option.check(value) if option.check else None
        if problem:
            raise ConfigError(f"{option.key}: {problem} (got {value!r})")
        values[option.key.replace("-", "_")] = value
    if values["method"] == "fedprox" and values["prox_mu"] <= 0:
        raise ConfigError("prox-mu: method 'fedprox' needs prox-mu > 0 (e.g. prox-mu=0.01)")
    if values["method"] == "fedic" and not values["fedic_server_data"]:
        raise ConfigError("fedic-server-data: method 'fedic' distils on server data the federation lacks; set "
                          "fedic-server-data=heldout (training-split images on no client; leave room with "
                          "samples-per-class) (README 'FedIC')")
    if values["rucr_mixup_low"] > values["rucr_mixup_high"]:
        raise ConfigError(f"rucr-mixup-low: must be <= rucr-mixup-high={values['rucr_mixup_high']} "
                          f"(got {values['rucr_mixup_low']})")
    augment_problem = augment_policy_problem(values["augment"], values["dataset"])
    if augment_problem:
        raise ConfigError(augment_problem)
    if values["dataset"] == "femnist" and values["partition"] != "writers":
        raise ConfigError(
            f"partition: dataset 'femnist' has natural clients (its writers); use partition=writers "
            f"(got {values['partition']!r}), or preset=femnist"
        )
    if values["partition"] == "writers" and values["dataset"] != "femnist":
        raise ConfigError(
            f"partition: 'writers' needs dataset=femnist, the only one with writer ids (got {values['dataset']!r})"
        )
    if values["method"] in CLIP_METHODS:
        if not values["clip_weights"]:
            raise ConfigError(f"clip-weights: method {values['method']!r} needs a local file of OpenAI-format CLIP "
                              "weights, e.g. clip-weights='/path/ViT-B-16.pt' (README 'CLIP methods: weights')")
        if values["al_method"] != "none":
            raise ConfigError(f"al-method: active learning does not support method {values['method']!r}")
    if values["method"] == "capt":
        if values["capt_n_general"] >= values["capt_n_ctx"]:
            raise ConfigError(f"capt-n-general: must be below capt-n-ctx={values['capt_n_ctx']} (the rest are the "
                              f"class-aware tokens; got {values['capt_n_general']})")
        if values["server_opt"] != "fedavg" or values["server_lr"] != 1.0:
            raise ConfigError("server-opt: CAPT's server sets the whole global model itself (clusters, per-class "
                              "rule); use server-opt='fedavg' and server-lr=1.0")
    if values["synthetic_data"] == "regl":
        if not values["regl_generator"]:
            raise ConfigError("regl-generator: synthetic-data='regl' needs a local diffusers pipeline folder, e.g. "
                              "regl-generator='/data/sd-v1-5' (README 'ReGL: weights')")
        if values["al_method"] != "none":
            raise ConfigError("synthetic-data: 'regl' does not support active learning (al-method)")
    if values["secure_aggregation"] == "secagg":
        if values["method"] not in SECAGG_METHODS:
            why = ("its server needs each client's loss" if values["method"] == "climb"
                   else "its server reads each client's model, where secure aggregation reveals only their sum")
            raise ConfigError(f"secure-aggregation: 'secagg' cannot run method={values['method']!r}: {why}; "
                              f"with secure-aggregation=secagg, method must be one of {', '.join(SECAGG_METHODS)}")
        if values["al_method"] != "none":
            raise ConfigError("secure-aggregation: 'secagg' does not support active learning (al-method)")
        if values["method"] == "rucr" and values["clients_per_round"] != 0:
            raise ConfigError(f"clients-per-round: method='rucr' with secure-aggregation='secagg' needs every client "
                              f"in every round (clients-per-round=0; got {values['clients_per_round']}): its "
                              "prototypes are the cohort's class means, and the masked sums run over all clients")
    if values["method"] == "flat-la":
        _set_flat_la_mechanisms(values)
    if values["fedavg_la_posthoc"] != "none" and values["method"] not in ("fedavg-la", "flat-la"):
        raise ConfigError(f"fedavg-la-posthoc: only methods 'fedavg-la' and 'flat-la' adjust by the federation's "
                          f"prior; method={values['method']!r} needs fedavg-la-posthoc='none'")
    if values["swa_start"] > values["num_server_rounds"]:
        raise ConfigError(f"swa-start: round {values['swa_start']} is past num-server-rounds="
                          f"{values['num_server_rounds']}; nothing would be averaged (0 turns it off)")
    if values["swa_start"] and values["al_method"] != "none":
        raise ConfigError("swa-start: weight averaging is for plain federated runs, not active learning (al-method)")
    if values["sam_rho"] and values["method"] not in SAM_METHODS:
        raise ConfigError(f"sam-rho: method={values['method']!r} cannot take sharpness-aware steps (its loss has side "
                          f"effects a second pass per step would repeat); with sam-rho > 0, method must be one of "
                          f"{', '.join(SAM_METHODS)}")
    if values["sam_rho"] and values["al_method"] != "none":
        raise ConfigError("sam-rho: sharpness-aware steps are for plain federated runs, not active learning "
                          "(al-method)")
    if values["al_method"] != "none" and round(values["al_query_ratio"], 2) > values["al_end_ratio"]:
        raise ConfigError(
            f"al-end-ratio: {values['al_end_ratio']} is below the first labeled ratio "
            f"al-query-ratio={values['al_query_ratio']}; no cycle would run"
        )
    return RunConfig(**values)
