"""Does a run's trained-in logit adjustment under- or over-correct the long tail at test time?

A method trained with the logit-adjusted loss (FedAvg-LA, FLAT-LA, GRAPE-LA) builds a margin of τ·log π into
its head during training; Menon et al. (ICLR 2021) show it is the balanced error's consistent choice at τ 1, but
their argument assumes the loss is not driven to zero. Once the long tail is memorised (fedlt's converged runs:
training loss 0.02-0.05), the margin the network keeps at test time can differ from the one the loss asked for.
This script measures it on a finished run's final network: the test accuracy of the logits z − τ'·log π for a
grid of extra strengths τ' (π the federation's long-tailed training prior; τ' 0 is the run's own accuracy).
A maximum at τ' > 0 means the head under-corrects: the case for training with a larger τ.

It reads the test set, so it is a diagnostic and not a way to choose τ' for a method: a τ' picked here would be
tuned on test data. fedlt's method keys are chosen before such a reading (see README, "fedlt's method: FLAT-LA").
Beside it, each strength's balanced recall on the federation's own training images (the clients' data, pooled:
what the clients could report as per-class hit counts, a sum secure aggregation carries), and the strength that
reading picks: the test-free choice, and how close it comes to the test set's.

    python benchmarks/posthoc_adjustment.py RUN_DIR [RUN_DIR ...] -o results/posthoc-adjustment
"""

from __future__ import annotations

import argparse
from pathlib import Path

import classifier_ceiling as _ceiling  # a sibling script: python puts benchmarks/ on sys.path
import numpy as np
import torch
from torch import Tensor

from fedlt_app.config import RunConfig
from fedlt_app.data.longtail import tail_classes
from fedlt_app.methods.posthoc import balanced_recalls, hits_per_strength, pick_strength, posthoc_shift

DEFAULT_STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def adjusted_logits(logits: Tensor, class_counts: list[int] | Tensor, strength: float) -> Tensor:
    """``logits − strength · log π`` with π the normalised class counts (Menon et al.'s post-hoc adjustment)."""
    return logits + posthoc_shift(torch.as_tensor(class_counts).numpy(), strength).to(logits.device)


def trained_tau(cfg: RunConfig) -> float | None:
    """The strength of the adjustment the run trained with; None for a method without one."""
    if cfg.method in ("fedavg-la", "flat-la"):
        return cfg.fedavg_la_tau
    return cfg.grape_la_tau if cfg.method == "grape-la" else None


def adjustment_sweep(run_dir: Path, strengths: tuple[float, ...] = DEFAULT_STRENGTHS, which: str = "final") -> dict:
    """Test accuracy of ``run_dir``'s network (``which``: ``final`` or ``checkpoint``, as the classifier ceiling's
    probes) under each extra adjustment strength (0, the network as it is, always among them), and its balanced
    recall on the federation's training images."""
    strengths = tuple(sorted(set(strengths) | {0.0}))
    model, cfg, data, last_round = _ceiling.probed_model(run_dir, which)
    test_images, test_labels = data.test_data()
    train = [data.client_data(p) for p in range(data.num_clients)]
    train_images, train_labels = torch.cat([x for x, _ in train]), torch.cat([y for _, y in train])
    with torch.no_grad():
        logits = model.classifier(_ceiling.features_of(model.encoder, test_images, cfg.dataset)).float()
        train_logits = model.classifier(_ceiling.features_of(model.encoder, train_images, cfg.dataset)).float()
    tail = tail_classes(data.class_counts)
    by_strength = {str(s): _ceiling.accuracies(adjusted_logits(logits, data.class_counts, s), test_labels, tail,
                                               data.num_classes) for s in strengths}
    # the test-free reading, by the rule fedavg-la-posthoc=training-recall applies every round (methods/posthoc.py)
    hits = hits_per_strength(train_logits, train_labels, data.class_counts, strengths, data.num_classes)
    totals = np.bincount(train_labels.numpy(), minlength=data.num_classes)
    test_hits = hits_per_strength(logits, test_labels, data.class_counts, strengths, data.num_classes)
    test_totals = np.bincount(test_labels.numpy(), minlength=data.num_classes)
    return {"run": run_dir.name, "model": which, "method": cfg.method, "seed": cfg.seed, "round": last_round,
            "trained_tau": trained_tau(cfg),
            "class_counts": list(data.class_counts), "strengths": by_strength,
            "training_recall": {str(s): float(r) for s, r in zip(strengths, balanced_recalls(hits, totals),
                                                                  strict=True)},
            "training_pick": str(pick_strength(strengths, hits, totals)),
            "test_pick": str(pick_strength(strengths, test_hits, test_totals))}


def markdown(reports: list[dict]) -> str:
    strengths = list(reports[0]["strengths"]) if reports else []
    lines = ["# Post-hoc adjustment on top of finished runs", "",
             ("Test accuracy (balanced / tail, %) of each run's final network with its logits adjusted by a further "
              "τ'·log π (τ' 0: the run's own accuracy). A diagnostic on test data, not a way to choose τ': "
              "`benchmarks/posthoc_adjustment.py` explains."), "",
             "| run | round | " + " | ".join(f"τ' {s}" for s in strengths) + " |",
             "|---|---|" + "---|" * len(strengths)]
    for r in reports:
        cells = [f"{100 * r['strengths'][s]['accuracy']:.2f} / {100 * r['strengths'][s]['tail_accuracy']:.2f}"
                 for s in strengths]
        lines.append(f"| {r['run']} ({r['model']}, τ {r['trained_tau']}) | {r['round']} | " + " | ".join(cells) + " |")
    lines += ["", ("The test-free reading: balanced recall (%) on the federation's training images under each "
                   "strength, the strength it picks (`fedavg-la-posthoc=training-recall`'s rule; ties to the "
                   "smaller |τ'|), the test set's pick, and the test accuracy gained at the training set's pick "
                   "over τ' 0."), "",
              "| run | " + " | ".join(f"τ' {s}" for s in strengths) + " | training pick | test pick | test gain |",
              "|---|" + "---|" * (len(strengths) + 3)]
    for r in reports:
        chosen = r["training_pick"]
        gain = r["strengths"][chosen]["accuracy"] - r["strengths"]["0.0"]["accuracy"]
        lines.append(f"| {r['run']} | " + " | ".join(f"{100 * r['training_recall'][s]:.2f}" for s in strengths)
                     + f" | {chosen} | {r['test_pick']} | {100 * gain:+.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished run folders (final_model.pt or checkpoint.pt)")
    parser.add_argument("--model", choices=("checkpoint", "final"), default="final",
                        help="final: the network the run evaluated last (a weight average with swa-start); "
                             "checkpoint: the last global model")
    parser.add_argument("--strengths", type=lambda s: tuple(float(v) for v in s.split(",")),
                        default=DEFAULT_STRENGTHS, help="comma-separated extra strengths τ' (default 0,0.25,...,1)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="folder for adjustment.json and .md")
    args = parser.parse_args()
    _ceiling.report_each(args.runs, lambda run: adjustment_sweep(run, args.strengths, args.model),
                         args.output / "adjustment", markdown)


if __name__ == "__main__":
    main()
