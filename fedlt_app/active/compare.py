"""FairFAL against random and entropy sampling: three runs of one preset, a table and a PNG.

    python -m fedlt_app.active.compare --preset fairfal-fmnist-lt-cpu --num-clients 10 --out results/fairfal

Runs the preset once per ``al-method`` through the simulation engine
(:func:`fedlt_app.launch.run`), each into ``<out>/<preset>-<method>/``; a run
whose folder already holds a completed summary is kept, not rerun. Then writes
``<out>/<preset>.png`` (accuracy against labeled ratio) and ``<out>/<preset>.md``
(the same numbers as a table).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from fedlt_app import launch
from fedlt_app.active.plot import comparison_table, plot_curves
from fedlt_app.config import AL_METHODS

ROOT = Path(__file__).resolve().parent.parent.parent


def completed(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    except (OSError, ValueError, KeyError):
        return False


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedlt_app.active.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="fairfal-fmnist-lt-cpu")
    parser.add_argument("--num-clients", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("results/fairfal"))
    parser.add_argument("--run-config", default="", help="extra overrides for every run")
    parser.add_argument("--methods", nargs="+", default=list(AL_METHODS), choices=AL_METHODS)
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so each run's SuperLink is stopped (launch.run's finally)
    signal.signal(signal.SIGTERM, _interrupt)
    out = args.out.resolve()
    run_dirs = []
    for method in args.methods:
        run_dir = out / f"{args.preset}-{method}"
        run_dirs.append(run_dir)
        if completed(run_dir):
            print(f"compare: {run_dir} is complete; kept", flush=True)
            continue
        if run_dir.exists():
            sys.exit(f"compare: {run_dir} holds an unfinished run; remove it to rerun")
        run_config = (f"preset='{args.preset}' al-method='{method}' output-dir='{out}' "
                      f"run-name='{run_dir.name}' {args.run_config}")
        code = launch.run(ROOT, run_config, num_clients=args.num_clients, cpus=1, gpus=0.0, timeout=24 * 3600)
        if code != 0:
            return code
    png = plot_curves(run_dirs, out / f"{args.preset}.png", title=args.preset)
    table = comparison_table(run_dirs)
    (out / f"{args.preset}.md").write_text(f"# {args.preset}\n\nAccuracy (%) per labeled ratio.\n\n{table}\n")
    print(f"compare: {png}\n{table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
