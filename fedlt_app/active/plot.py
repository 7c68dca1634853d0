"""Accuracy against labeled ratio, one curve per active-learning run.

    python -m fedlt_app.active.plot RUN_DIR [RUN_DIR ...] -o results/fairfal/curves.png

Each RUN_DIR is a result folder of an ``al-method`` run (its metrics.jsonl has
one line per cycle). Needs matplotlib (the ``dev`` extra).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def read_cycles(run_dir: Path) -> tuple[str, list[dict[str, Any]]]:
    """(al-method, per-cycle rows) of one run."""
    config = json.loads((run_dir / "config.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return str(config["run_config"]["al-method"]), rows


def comparison_table(run_dirs: Sequence[Path]) -> str:
    """A Markdown table: accuracy (and tail accuracy) per labeled ratio, one column pair per run."""
    runs = [read_cycles(Path(d)) for d in run_dirs]
    header = "| labeled ratio | " + " | ".join(f"{m} acc. | {m} tail" for m, _ in runs) + " |"
    lines = [header, "|---" * (1 + 2 * len(runs)) + "|"]
    for cycle in range(max(len(rows) for _, rows in runs)):
        ratio = next(rows[cycle]["target_ratio"] for _, rows in runs if cycle < len(rows))
        cells = []
        for _, rows in runs:
            row = rows[cycle] if cycle < len(rows) else None
            cells += [f"{100 * row['accuracy']:.2f}", f"{100 * row['tail_accuracy']:.2f}"] if row else ["", ""]
        lines.append(f"| {ratio:.2f} | " + " | ".join(cells) + " |")
    means = []
    for _, rows in runs:
        means += [f"{100 * sum(r['accuracy'] for r in rows) / len(rows):.2f}",
                  f"{100 * sum(r['tail_accuracy'] for r in rows) / len(rows):.2f}"]
    lines.append("| mean | " + " | ".join(means) + " |")
    return "\n".join(lines)


def plot_curves(run_dirs: Sequence[Path], output: Path, title: str = "") -> Path:
    """Accuracy and tail accuracy (%) against the labeled ratio; writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (overall, tail) = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for run_dir in run_dirs:
        method, rows = read_cycles(Path(run_dir))
        ratios = [r["labeled_ratio"] for r in rows]
        overall.plot(ratios, [100 * r["accuracy"] for r in rows], marker="o", label=method)
        tail.plot(ratios, [100 * r["tail_accuracy"] for r in rows], marker="o", label=method)
    overall.set_title("test accuracy")
    tail.set_title("tail-class accuracy (30% rarest classes)")
    for axes in (overall, tail):
        axes.set_xlabel("labeled ratio")
        axes.set_ylabel("accuracy (%)")
        axes.grid(alpha=0.3)
        axes.legend()
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=120)
    plt.close(figure)
    return output


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedlt_app.active.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="result folders of al-method runs")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    print(plot_curves(args.runs, args.output, args.title))
    print(comparison_table(args.runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
