"""Which head a two-head run should infer with, and how far its heads have moved apart since round 0.

RedGrape's family (``redgrape``, ``grape-la``) trains two linear heads on one encoder: the local loss sees only
their sum Wᵀh + Ŵᵀh, inference uses W alone. Both heads get the same gradient from the loss (and the same
momentum, clipping and server average), so W − Ŵ changes only by the re-balancing steps on W. At
``rebalance-lambda`` 0 it never changes: W = (W + Ŵ)/2 + D/2 with D = W₀ − Ŵ₀ the difference of two random
initial heads, fixed for the whole run, and W alone classifies with the trained sum plus a random offset.

This script measures, on a finished run's network, the test accuracy of the three ways to read the heads
(W, the run's own; Ŵ; W + Ŵ) and how far D has moved from its initial value (the round-0 model is a pure
function of the seed, :func:`fedlt_app.task.initial_model`)::

    python benchmarks/two_heads.py RUN_DIR [RUN_DIR ...] -o results/two-heads
"""

from __future__ import annotations

import argparse
from pathlib import Path

import classifier_ceiling as _ceiling  # a sibling script: python puts benchmarks/ on sys.path
import torch

from fedlt_app.data.longtail import tail_classes
from fedlt_app.models import EncoderClassifier
from fedlt_app.task import initial_model

READINGS = ("W (the run's)", "Ŵ", "W + Ŵ")


def head_vector(head: torch.nn.Linear) -> torch.Tensor:
    """A linear head's weight and bias flattened into one vector."""
    parts = [head.weight] + ([head.bias] if head.bias is not None else [])
    return torch.cat([p.detach().flatten().float() for p in parts])


def head_difference(model: EncoderClassifier) -> torch.Tensor:
    """W − Ŵ as one vector."""
    return head_vector(model.classifier) - head_vector(model.supplementary)


def two_heads(run_dir: Path, which: str = "final") -> dict:
    """The three readings' test accuracy on ``run_dir``'s network and the drift of W − Ŵ since round 0."""
    model, cfg, data, last_round = _ceiling.probed_model(run_dir, which)
    if not hasattr(model, "supplementary"):
        raise SystemExit(f"{run_dir}: method={cfg.method!r} has one head; this probe is for RedGrape's two")
    tail = tail_classes(data.class_counts)
    images, labels = data.test_data()
    features = _ceiling.features_of(model.encoder, images, cfg.dataset)
    with torch.no_grad():
        w, s = model.classifier(features).float(), model.supplementary(features).float()
    readings = {name: _ceiling.accuracies(logits, labels, tail, data.num_classes)
                for name, logits in zip(READINGS, (w, s, w + s), strict=True)}
    start, now = head_difference(initial_model(cfg, data)), head_difference(model)
    return {"run": run_dir.name, "model": which, "method": cfg.method, "seed": cfg.seed, "round": last_round,
            "rebalance_lambda": cfg.rebalance_lambda, "readings": readings,
            "difference_moved": float((now - start).norm() / start.norm()),
            "difference_over_w": float(now.norm() / head_vector(model.classifier).norm())}


def markdown(reports: list[dict]) -> str:
    lines = ["# The two heads of finished RedGrape-family runs", "",
             ("Test accuracy (balanced / tail, %) of each reading of the heads, and ‖D − D₀‖/‖D₀‖ with D = W − Ŵ "
              "(0: the heads have moved together since round 0); `benchmarks/two_heads.py` explains why."), "",
             "| run | λ | round | " + " | ".join(READINGS) + " | ‖D − D₀‖/‖D₀‖ | ‖D‖/‖W‖ |",
             "|---|---|---|" + "---|" * (len(READINGS) + 2)]
    for r in reports:
        cells = [f"{100 * r['readings'][k]['accuracy']:.2f} / {100 * r['readings'][k]['tail_accuracy']:.2f}"
                 for k in READINGS]
        lines.append(f"| {r['run']} ({r['model']}) | {r['rebalance_lambda']:g} | {r['round']} | " + " | ".join(cells)
                     + f" | {r['difference_moved']:.3f} | {r['difference_over_w']:.2f} |")
    lines += ["", "Per-class accuracy (%), classes 0-9:", ""]
    for r in reports:
        for k in READINGS:
            lines.append(f"- {r['run']}, {k}: "
                         + " ".join(f"{100 * a:.1f}" for a in r["readings"][k]["per_class_accuracy"]))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders of redgrape or grape-la runs")
    parser.add_argument("--model", choices=("checkpoint", "final"), default="final",
                        help="final: the network the run evaluated last (final_model.pt); checkpoint: checkpoint.pt")
    parser.add_argument("-o", "--output", type=Path, required=True, help="folder for two-heads.json and .md")
    args = parser.parse_args()
    _ceiling.report_each(args.runs, lambda run: two_heads(run, args.model), args.output / "two-heads", markdown)


if __name__ == "__main__":
    main()
