"""How much a run's accuracy is held back by its classifier, and how much by its features.

Item 4 of issue 11 asks for a fedlt method 2 points above every other on the
converged protocol. Two kinds of method compete there: classifier corrections
(RedGrape's re-balancing, logit adjustment, CReFF's and CCVR's re-trained
heads) and representation changes. This script measures, on the final global
model of a finished run (its ``checkpoint.pt``), what the best classifier
correction could reach on that run's frozen encoder, so the next method is
chosen by evidence:

``global head``
    the travelling classifier W as clients hold it (RedGrape's deployed head;
    CCVR, CReFF, FedETF... deploy a different head, reported by the run itself).
``post-hoc LA``
    W's logits minus log π, π the long-tailed training prior (Menon et al.,
    ICLR 2021, post-hoc logit adjustment, τ = 1).
``NCM``
    nearest class mean of the L2-normalised features of the long-tailed
    training set (no learned head at all).
``balanced re-train (LT data)``
    a fresh linear head on the frozen features of the federation's own
    long-tailed training set, class-balanced cross-entropy (weights 1/n_c),
    full batch: the ceiling of every head re-trained from the federation's data
    (CCVR and CReFF approximate it with virtual or federated features).
``oracle re-train (balanced data)``
    the same on the features of every training image of the data set, balanced
    (Fashion-MNIST: 6,000 per class), i.e. data that no client holds: it
    measures only how linearly separable the encoder makes the classes. It is
    not a method; it bounds what any head on this encoder can do.

If the balanced re-train is within a point of the run's own accuracy, no
classifier correction can add 2 points: the encoder must improve.

    python benchmarks/classifier_ceiling.py RUN_DIR [RUN_DIR ...] -o results/classifier-ceiling
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from fedlt_app.checkpoint import load_checkpoint, load_final_model
from fedlt_app.config import RunConfig, resolve_recorded
from fedlt_app.configured_data import federated_data
from fedlt_app.data.federated import FederatedData, first_per_class
from fedlt_app.data.longtail import tail_classes
from fedlt_app.data.transforms import to_float
from fedlt_app.models import EncoderClassifier
from fedlt_app.task import method_model

PROBES = ("global head", "post-hoc LA", "NCM", "balanced re-train (LT data)", "oracle re-train (balanced data)")


@torch.no_grad()
def features_of(encoder: torch.nn.Module, images: Tensor, dataset: str, batch_size: int = 1000) -> Tensor:
    encoder.eval()
    return torch.cat([encoder(to_float(images[i : i + batch_size], dataset)).float()
                      for i in range(0, len(images), batch_size)])


def train_linear_head(features: Tensor, labels: Tensor, num_classes: int, seed: int,
                      steps: int = 300, weight_decay: float = 1e-4) -> torch.nn.Linear:
    """Full-batch L-BFGS on class-balanced cross-entropy (each class weighs the same in total)."""
    torch.manual_seed(seed)
    head = torch.nn.Linear(features.shape[1], num_classes)
    counts = torch.bincount(labels, minlength=num_classes).clamp(min=1).float()
    weights = counts.sum() / (num_classes * counts)
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=steps, history_size=20,
                                  line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(head(features), labels, weight=weights)
        loss = loss + weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return head


def accuracies(logits: Tensor, labels: Tensor, tail: list[int], num_classes: int) -> dict[str, float | list[float]]:
    hits = logits.argmax(dim=1) == labels
    per_class = [float(hits[labels == c].float().mean()) for c in range(num_classes)]
    return {"accuracy": float(hits.float().mean()),
            "tail_accuracy": float(np.mean([per_class[c] for c in tail])),  # balanced test set: mean of classes
            "per_class_accuracy": per_class}


def probed_model(run_dir: Path, which: str) -> tuple[EncoderClassifier, RunConfig, FederatedData, int]:
    """The network to probe: ``checkpoint`` = the last global model as clients hold it (``checkpoint.pt``),
    ``final`` = the network the run measured its last accuracy on (``final_model.pt``: with ``swa-start`` the
    weight average, with CCVR or CReFF the calibrated head)."""
    if which == "final":
        saved = load_final_model(run_dir)
        cfg, num_clients, state = resolve_recorded(saved["run_config"]), int(saved["num_clients"]), saved["state"]
    else:
        saved = load_checkpoint(run_dir)
        cfg = resolve_recorded(saved["run_config"])
        num_clients = int(json.loads((run_dir / "config.json").read_text())["num_clients"])
        state = {k: torch.from_numpy(np.asarray(v)) for k, v in saved["arrays"].items()}
    data = federated_data(cfg, num_clients)
    model = method_model(cfg, data)
    model.load_travelling_state(state)
    return model.eval(), cfg, data, int(saved["round"])


def ceiling(run_dir: Path, oracle_per_class: int = 0, which: str = "checkpoint") -> dict:
    """Every probe's test accuracy on the final model of ``run_dir`` (``which``: see :func:`probed_model`).

    The oracle re-trains on every training image of the data set, or on the first ``oracle_per_class``
    of each class when that is positive.
    """
    model, cfg, data, last_round = probed_model(run_dir, which)
    num_classes = data.num_classes
    tail = tail_classes(data.class_counts)
    test_images, test_labels = data.test_data()
    train_index = torch.from_numpy(np.asarray(data.train_indices).copy())
    lt_images, lt_labels = data.dataset.train_images[train_index], data.dataset.train_labels[train_index]

    test_h = features_of(model.encoder, test_images, cfg.dataset)
    all_labels = data.dataset.train_labels
    if oracle_per_class <= 0:  # every training image: the long-tailed set is a subset, its features too
        oracle_index = torch.arange(len(all_labels))
        all_h = features_of(model.encoder, data.dataset.train_images, cfg.dataset)
        lt_h = all_h[train_index]
    else:
        oracle_index = torch.from_numpy(first_per_class(all_labels.numpy(), oracle_per_class))
        all_h = features_of(model.encoder, data.dataset.train_images[oracle_index], cfg.dataset)
        lt_h = features_of(model.encoder, lt_images, cfg.dataset)
    with torch.no_grad():
        head_logits = model.classifier(test_h).float()
        prior = torch.tensor(data.class_counts, dtype=torch.float32)
        la_logits = head_logits - torch.log(prior / prior.sum())
        unit = F.normalize(lt_h, dim=1)
        means = F.normalize(torch.stack([unit[lt_labels == c].mean(0) for c in range(num_classes)]), dim=1)
        ncm_logits = F.normalize(test_h, dim=1) @ means.T
    lt_head = train_linear_head(lt_h, lt_labels, num_classes, cfg.seed).requires_grad_(False)
    all_head = train_linear_head(all_h, all_labels[oracle_index], num_classes, cfg.seed).requires_grad_(False)
    results = {
        "global head": accuracies(head_logits, test_labels, tail, num_classes),
        "post-hoc LA": accuracies(la_logits, test_labels, tail, num_classes),
        "NCM": accuracies(ncm_logits, test_labels, tail, num_classes),
        "balanced re-train (LT data)": accuracies(lt_head(test_h), test_labels, tail, num_classes),
        "oracle re-train (balanced data)": accuracies(all_head(test_h), test_labels, tail, num_classes),
    }
    return {"run": run_dir.name, "model": which, "method": cfg.method, "seed": cfg.seed, "round": last_round,
            "class_counts": list(data.class_counts), "tail_classes": tail, "probes": results}


def markdown(reports: list[dict]) -> str:
    lines = ["# Classifier ceiling of finished runs", "",
             ("Test accuracy (balanced / tail, %) of probes on each run's final global encoder; "
              "`benchmarks/classifier_ceiling.py` explains each probe."), "",
             "| run | round | " + " | ".join(PROBES) + " |", "|---|---|" + "---|" * len(PROBES)]
    for r in reports:
        probes = [r["probes"][p] for p in PROBES]
        cells = [f"{100 * probe['accuracy']:.2f} / {100 * probe['tail_accuracy']:.2f}" for probe in probes]
        lines.append(f"| {r['run']} ({r.get('model', 'checkpoint')}) | {r['round']} | " + " | ".join(cells) + " |")
    lines += ["", "Per-class accuracy (%), classes 0-9:", ""]
    for r in reports:
        for p in PROBES:
            per_class = r["probes"][p]["per_class_accuracy"]
            lines.append(f"- {r['run']}, {p}: " + " ".join(f"{100 * a:.1f}" for a in per_class))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders holding checkpoint.pt and config.json")
    parser.add_argument("--model", choices=("checkpoint", "final"), default="checkpoint",
                        help="checkpoint: the last global model (checkpoint.pt); final: the network the run "
                             "evaluated last (final_model.pt: a weight average, a calibrated head)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="folder for ceiling.json and ceiling.md")
    args = parser.parse_args()
    report_each(args.runs, lambda run: ceiling(run, which=args.model), args.output / "ceiling", markdown)


def report_each(runs: list[Path], measure: Callable[[Path], dict], stem: Path,
                markdown: Callable[[list[dict]], str]) -> None:
    """Measure each run in turn, rewriting ``stem``.json and ``stem``.md after every one, so that what a long
    probe has measured is on disk if a later run fails."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    reports: list[dict] = []
    for run in runs:
        reports.append(measure(run))
        stem.with_suffix(".json").write_text(json.dumps(reports, indent=1) + "\n")
        stem.with_suffix(".md").write_text(markdown(reports))
        print(markdown(reports[-1:]), flush=True)


if __name__ == "__main__":
    main()
