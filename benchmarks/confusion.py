"""Where a finished run's errors go, and whether the clients that hold a class ever see the class it is taken for.

A class c that a client lacks can still be pushed down on that client's images: every image of another class is
a negative example for c. FedLC (FedLTLib's rule) instead drops such a class from the client's softmax (an
infinite margin), so if the clients that hold most images of a class t hold no image of its look-alike p, nothing
in the federation teaches that a t is not a p except the few clients holding both. This script shows the run's
test-set confusion matrix and, for its largest off-diagonal cells (true t called p), the share of t's training
images that lie on clients holding no p (the partition is the run's own, recorded in ``config.json``)::

    python benchmarks/confusion.py RUN_DIR [RUN_DIR ...] -o results/confusion
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import classifier_ceiling as _ceiling  # a sibling script: python puts benchmarks/ on sys.path
import torch

from fedlt_app.data.longtail import tail_classes
from fedlt_app.data.transforms import to_float


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[list[int]]:
    """counts[t][p]: test images of class t predicted as p."""
    flat = torch.bincount(labels.long() * num_classes + predictions.long(), minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).tolist()


def share_on_clients_without(client_class_counts: Sequence[Sequence[int]], true: int, predicted: int) -> float:
    """The fraction of class ``true``'s training images held by clients that hold no image of ``predicted``."""
    held = sum(row[true] for row in client_class_counts)
    alone = sum(row[true] for row in client_class_counts if row[predicted] == 0)
    return alone / held if held else 0.0


def largest_confusions(matrix: Sequence[Sequence[int]], top: int) -> list[tuple[int, int]]:
    """The ``top`` off-diagonal cells (true, predicted), largest first (as a share of the true class's images)."""
    cells = [(t, p) for t in range(len(matrix)) for p in range(len(matrix)) if t != p and matrix[t][p] > 0]
    return sorted(cells, key=lambda tp: -matrix[tp[0]][tp[1]] / sum(matrix[tp[0]]))[:top]


def confusion(run_dir: Path, which: str = "final", top: int = 5) -> dict:
    """The test-set confusion matrix of ``run_dir``'s network and its largest confusions against the partition."""
    model, cfg, data, last_round = _ceiling.probed_model(run_dir, which)
    images, labels = data.test_data()
    with torch.no_grad():  # the network as the run evaluated it: model(x)
        logits = torch.cat([model(to_float(images[i : i + 1000], cfg.dataset)) for i in range(0, len(images), 1000)])
    matrix = confusion_matrix(logits.argmax(dim=1), labels, data.num_classes)
    counts = [torch.bincount(data.client_data(k)[1], minlength=data.num_classes).tolist()
              for k in range(data.num_clients)]
    confused = [{"true": t, "predicted": p, "share_of_test": matrix[t][p] / sum(matrix[t]),
                 "clients_holding_true": sum(row[t] > 0 for row in counts),
                 "clients_holding_predicted": sum(row[p] > 0 for row in counts),
                 "train_share_on_clients_without_predicted": share_on_clients_without(counts, t, p)}
                for t, p in largest_confusions(matrix, top)]
    return {"run": run_dir.name, "model": which, "method": cfg.method, "seed": cfg.seed, "round": last_round,
            "tail_classes": tail_classes(data.class_counts), "client_class_counts": counts,
            "accuracy": _ceiling.accuracies(logits, labels, tail_classes(data.class_counts), data.num_classes),
            "confusion": matrix, "largest_confusions": confused}


def markdown(reports: list[dict]) -> str:
    lines = ["# Where finished runs' errors go", "",
             ("Test-set confusion of each run's network (rows: true class, columns: predicted), and its largest "
              "confusions against the partition; `benchmarks/confusion.py` explains why."), ""]
    for r in reports:
        acc = r["accuracy"]
        lines += [f"## {r['run']} ({r['model']}, round {r['round']}): {100 * acc['accuracy']:.2f} / "
                  f"{100 * acc['tail_accuracy']:.2f}", "",
                  "| true \\ predicted | " + " | ".join(str(c) for c in range(len(r["confusion"]))) + " |",
                  "|---|" + "---|" * len(r["confusion"])]
        lines += [f"| {t} | " + " | ".join(str(n) for n in row) + " |" for t, row in enumerate(r["confusion"])]
        lines += ["", "| true → predicted | share of true's test images | clients holding true / predicted "
                  "| true's training images on clients without predicted |", "|---|---|---|---|"]
        lines += [f"| {c['true']} → {c['predicted']} | {100 * c['share_of_test']:.1f} % | "
                  f"{c['clients_holding_true']} / {c['clients_holding_predicted']} | "
                  f"{100 * c['train_share_on_clients_without_predicted']:.1f} % |" for c in r["largest_confusions"]]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished run folders")
    parser.add_argument("--model", choices=("checkpoint", "final"), default="final",
                        help="final: the network the run evaluated last (final_model.pt); checkpoint: checkpoint.pt")
    parser.add_argument("--top", type=int, default=5, help="how many of the largest confusions to set against "
                                                          "the partition")
    parser.add_argument("-o", "--output", type=Path, required=True, help="folder for confusion.json and .md")
    args = parser.parse_args()
    _ceiling.report_each(args.runs, lambda run: confusion(run, args.model, args.top), args.output / "confusion",
                         markdown)


if __name__ == "__main__":
    main()
