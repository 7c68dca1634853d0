"""Where CReFF's federated features sit against the real features of the same encoder, and what that costs its head.

CReFF (Shang et al., IJCAI 2022) re-trains its evaluated head on 100 server-side "federated features" per class,
moved each round so that the classifier gradient they produce matches, row by row in cosine, the clients' mean
gradient on their real features. A cosine match fixes directions, not where a class's features lie: the features
start as ``torch.randn`` (norm about √d) and nothing asks them to take the real features' norms. This script
reads a finished CReFF run's ``checkpoint.pt`` (the final global encoder, the federated features and the re-trained
head) and asks, per class:

``geometry``
    the mean norm of the class's real training features and of its federated ones; the cosine between the two
    class means; which real class mean the federated class mean is nearest (cosine); the share of the class's
    federated features nearest their own class's real mean; and the distance between the two class means as a
    fraction of the real mean's norm.
``heads``
    test accuracy of heads trained by CReFF's own recipe (``creff-retrain-epochs`` epochs of SGD at
    ``creff-retrain-lr``, batch 32, a fresh head) on: the federated features (it should land where the run's own
    head does); as many real training features per class, drawn from the federation's data (what the recipe
    reaches when the features are real); the federated features with every class's mean moved onto its real
    class mean (the spread kept); and with one class's mean moved at a time (which class's placement costs).

The real features are the federation's own training images (no augmentation), the test set is balanced::

    python benchmarks/federated_features.py RUN_DIR [RUN_DIR ...] -o results/creff-features
"""

from __future__ import annotations

import argparse
from pathlib import Path

import classifier_ceiling as _ceiling  # a sibling script: python puts benchmarks/ on sys.path
import torch
from torch import Tensor
from torch.nn import functional as F

from fedlt_app.checkpoint import load_checkpoint
from fedlt_app.data.longtail import tail_classes
from fedlt_app.methods.retrain import retrain_linear
from fedlt_app.precision import FP32


def class_means(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    return torch.stack([features[labels == c].mean(dim=0) for c in range(num_classes)])


def class_geometry(real: Tensor, real_labels: Tensor, federated: Tensor, federated_labels: Tensor,
                   num_classes: int) -> list[dict[str, float | int]]:
    """Per class: where the federated features sit against the real ones (see the module's docstring)."""
    real_means = class_means(real, real_labels, num_classes)
    federated_means = class_means(federated, federated_labels, num_classes)
    cosine = F.normalize(federated_means, dim=1) @ F.normalize(real_means, dim=1).T
    nearest_of_each = (F.normalize(federated, dim=1) @ F.normalize(real_means, dim=1).T).argmax(dim=1)
    rows = []
    for c in range(num_classes):
        own = federated_labels == c
        rows.append({
            "class": c,
            "real_norm": float(real[real_labels == c].norm(dim=1).mean()),
            "federated_norm": float(federated[own].norm(dim=1).mean()),
            "mean_cosine": float(cosine[c, c]),
            "nearest_real_mean": int(cosine[c].argmax()),
            "share_nearest_own": float((nearest_of_each[own] == c).float().mean()),
            "mean_offset": float((federated_means[c] - real_means[c]).norm() / real_means[c].norm()),
        })
    return rows


def recentred(federated: Tensor, federated_labels: Tensor, real_means: Tensor, classes: list[int]) -> Tensor:
    """A copy of the federated features with each of ``classes`` shifted so that its mean is the real class mean."""
    moved = federated.clone()
    for c in classes:
        own = federated_labels == c
        moved[own] += real_means[c] - federated[own].mean(dim=0)
    return moved


def balanced_draw(labels: Tensor, per_class: int, num_classes: int, generator: torch.Generator) -> Tensor:
    """``per_class`` indices of each class (with replacement: the rarest classes hold fewer than CReFF's 100)."""
    picks = []
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten()
        if len(members) == 0:
            raise ValueError(f"class {c} has no training image in the federation: nothing to draw its features from")
        picks.append(members[torch.randint(len(members), (per_class,), generator=generator)])
    return torch.cat(picks)


def recipe_head(features: Tensor, labels: Tensor, num_classes: int, epochs: int, lr: float,
                seed: int) -> torch.nn.Linear:
    """CReFF's re-training (``CReFFServer.retrain_classifier``): a fresh head, plain SGD, batch 32."""
    torch.manual_seed(seed)
    head = torch.nn.Linear(features.shape[1], num_classes)
    retrain_linear(head, features, labels, epochs=epochs, lr=lr, batch_size=32,
                   generator=torch.Generator().manual_seed(seed), precision=FP32)
    return head


def study(run_dir: Path, seed: int = 0) -> dict:
    """Geometry and heads of one CReFF run's final federated features (``checkpoint.pt``)."""
    model, cfg, data, last_round = _ceiling.probed_model(run_dir, "checkpoint")
    if cfg.method != "creff":
        raise ValueError(f"{run_dir}: method is {cfg.method!r}; this study reads CReFF's federated features")
    state = load_checkpoint(run_dir)["method"]
    federated = state["features"].detach().float()
    per_class, num_classes = cfg.creff_features_per_class, data.num_classes
    federated_labels = torch.arange(num_classes).repeat_interleave(per_class)
    run_head = torch.nn.Linear(federated.shape[1], num_classes)
    run_head.load_state_dict(state["classifier"])

    pairs = [data.client_data(k) for k in range(data.num_clients)]
    train_images, train_labels = torch.cat([x for x, _ in pairs]), torch.cat([y for _, y in pairs])
    real = _ceiling.features_of(model.encoder, train_images, cfg.dataset)
    test_images, test_labels = data.test_data()
    test = _ceiling.features_of(model.encoder, test_images, cfg.dataset)
    real_means = class_means(real, train_labels, num_classes)
    tail = tail_classes(data.class_counts)

    def measured(head: torch.nn.Module) -> dict:
        with torch.no_grad():
            return _ceiling.accuracies(head(test), test_labels, tail, num_classes)

    def trained_on(features: Tensor, labels: Tensor) -> dict:
        return measured(recipe_head(features, labels, num_classes, cfg.creff_retrain_epochs,
                                    cfg.creff_retrain_lr, seed))

    drawn = balanced_draw(train_labels, per_class, num_classes, torch.Generator().manual_seed(seed))
    heads = {
        "run's head": measured(run_head),
        "recipe on federated": trained_on(federated, federated_labels),
        f"recipe on real ({per_class} per class)": trained_on(real[drawn], train_labels[drawn]),
        "recipe on federated, every mean real": trained_on(
            recentred(federated, federated_labels, real_means, list(range(num_classes))), federated_labels),
    }
    for c in range(num_classes):
        heads[f"recipe on federated, class {c}'s mean real"] = trained_on(
            recentred(federated, federated_labels, real_means, [c]), federated_labels)
    return {"run": run_dir.name, "method": cfg.method, "seed": cfg.seed, "round": last_round,
            "class_counts": [int(n) for n in data.class_counts], "tail_classes": tail,
            "clients_holding": [sum(int((y == c).any()) for _, y in pairs) for c in range(num_classes)],
            "geometry": class_geometry(real, train_labels, federated, federated_labels, num_classes),
            "heads": heads}


def markdown(reports: list[dict]) -> str:
    lines = ["# CReFF's federated features against the real features of the same encoder", "",
             "Per class, and test accuracy (balanced / tail, %; per class) of heads re-trained by CReFF's recipe; "
             "`benchmarks/federated_features.py` explains each column.", ""]
    for r in reports:
        lines += [f"## {r['run']} (round {r['round']})", "",
                  "| class | training images | clients | real norm | federated norm | cos(means) "
                  "| nearest real mean | own nearest | mean offset |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {g['class']} | {r['class_counts'][g['class']]} | {r['clients_holding'][g['class']]} | "
                  f"{g['real_norm']:.2f} | {g['federated_norm']:.2f} | {g['mean_cosine']:.3f} | "
                  f"{g['nearest_real_mean']} | {100 * g['share_nearest_own']:.0f} % | {g['mean_offset']:.2f} |"
                  for g in r["geometry"]]
        lines += ["", "| head | balanced | tail | per class |", "|---|---|---|---|"]
        lines += [f"| {name} | {100 * a['accuracy']:.2f} | {100 * a['tail_accuracy']:.2f} | "
                  + " ".join(f"{100 * p:.1f}" for p in a["per_class_accuracy"]) + " |"
                  for name, a in r["heads"].items()]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="CReFF run folders holding checkpoint.pt and config.json")
    parser.add_argument("--seed", type=int, default=0, help="seed of the re-trained heads and the real draw")
    parser.add_argument("-o", "--output", type=Path, required=True, help="folder for features.json and features.md")
    args = parser.parse_args()
    _ceiling.report_each(args.runs, lambda run: study(run, args.seed), args.output / "features", markdown)


if __name__ == "__main__":
    main()
