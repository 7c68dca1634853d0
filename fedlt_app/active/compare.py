"""FairFAL against random and entropy sampling over several seeds: one run per method and seed, a table and a PNG.

    python -m fedlt_app.active.compare --preset fairfal-fmnist-lt-cpu --seeds 0 1 2 --out results/fairfal

Runs the preset once per ``al-method`` and seed through the simulation engine
(:func:`fedlt_app.launch.run`), each into ``<out>/<preset>-<method>-seed<K>/``
with ``seed=<K>`` in its run config; a run whose folder already holds a
completed summary is kept, not rerun, so adding seeds later only runs the new
ones; an interrupted run that left a checkpoint (every cycle's, by default) is
continued from it with ``resume-from``. The order is seed-major (every method of seed 0, then of seed 1, ...), so
a comparison stopped midway has whole seeds to compare. Then writes
``<out>/<preset>.md`` (accuracy and tail accuracy per labeled ratio, mean ± std
over seeds, paired differences against FairFAL) and ``<out>/<preset>.png`` from
the completed runs of the seeds and methods asked for, also after a failed run.
``--report-only`` writes only the table and PNG, from the runs already there (e.g. runs finished in another
clone and copied into ``--out``), and runs nothing.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from fedlt_app import launch
from fedlt_app.active.plot import comparison_table, completed, plot_curves
from fedlt_app.checkpoint import CHECKPOINT_FILE
from fedlt_app.config import AL_METHODS

ROOT = Path(__file__).resolve().parent.parent.parent
# Flower's key=value pattern (flwr.common.config.parse_config_args), without importing flwr for one check
_OVERRIDE = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")


def override_keys(run_config: str) -> set[str]:
    """The keys a ``--run-config`` string sets, as Flower would read them."""
    return {key for key, _ in _OVERRIDE.findall(run_config)}


def plan(preset: str, methods: Sequence[str], seeds: Sequence[int], out: Path) -> list[tuple[int, str, Path]]:
    """(seed, method, run folder) in run order: seed-major, so an interrupted comparison stops between seeds' sets."""
    return [(seed, method, out / f"{preset}-{method}-seed{seed}") for seed in seeds for method in methods]


def write_report(out: Path, preset: str, run_dirs: Sequence[Path]) -> None:
    """``<preset>.md`` and ``<preset>.png`` from the completed runs among ``run_dirs`` (none: nothing to write)."""
    if not any(completed(d) for d in run_dirs):
        print("compare: no completed run; no table or plot written", flush=True)
        return
    png = plot_curves(run_dirs, out / f"{preset}.png", title=preset)
    table = comparison_table(run_dirs)
    (out / f"{preset}.md").write_text(
        f"# {preset}\n\nAccuracy and tail accuracy (%) per target labeled ratio: mean ± sample std over seeds "
        f"(completed runs only).\n\n{table}\n"
    )
    print(f"compare: {png}\n{table}", flush=True)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedlt_app.active.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="fairfal-fmnist-lt-cpu")
    parser.add_argument("--num-clients", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("results/fairfal"))
    parser.add_argument("--run-config", default="", help="extra overrides for every run (not seed: use --seeds)")
    parser.add_argument("--methods", nargs="+", default=list(AL_METHODS), choices=AL_METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="K", help="seeds to run (default: 0)")
    parser.add_argument("--report-only", action="store_true",
                        help="only (re)write the table and PNG from the completed runs in --out; run nothing")
    args = parser.parse_args(argv)
    if "seed" in override_keys(args.run_config):
        parser.error("--run-config sets seed; give the seeds with --seeds instead")
    out = args.out.resolve()
    runs = plan(args.preset, list(dict.fromkeys(args.methods)), list(dict.fromkeys(args.seeds)), out)
    if args.report_only:
        write_report(out, args.preset, [run_dir for _, _, run_dir in runs])
        return 0
    for _, _, run_dir in runs:  # before any run, not hours in
        if run_dir.exists() and not completed(run_dir) and not (run_dir / CHECKPOINT_FILE).is_file():
            sys.exit(f"compare: {run_dir} holds an unfinished run without a checkpoint; remove it to rerun")
    # SIGTERM unwinds like Ctrl-C, so each run's SuperLink is stopped (launch.run's finally)
    signal.signal(signal.SIGTERM, _interrupt)
    code = 0
    for seed, method, run_dir in runs:
        if completed(run_dir):
            print(f"compare: {run_dir} is complete; kept", flush=True)
            continue
        run_config = (f"preset='{args.preset}' al-method='{method}' seed={seed} output-dir='{out}' "
                      f"run-name='{run_dir.name}' {args.run_config}")
        if run_dir.exists():  # interrupted after a checkpoint (checked above)
            print(f"compare: continuing {run_dir} from its checkpoint", flush=True)
            run_config += f" resume-from='{run_dir}'"
        code = launch.run(ROOT, run_config, num_clients=args.num_clients, cpus=1, gpus=0.0, timeout=24 * 3600)
        if code != 0:
            print(f"compare: {run_dir.name} failed (exit {code}); reporting the completed runs", flush=True)
            break
    write_report(out, args.preset, [run_dir for _, _, run_dir in runs])
    return code


if __name__ == "__main__":
    raise SystemExit(main())
