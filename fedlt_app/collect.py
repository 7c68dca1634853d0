"""Bring the runs another clone computed into this checkout's ``results/``, ready to commit.

    python -m fedlt_app.collect /work/sweeprun          # copy, then rewrite the tables they belong to
    python -m fedlt_app.collect /work/sweeprun --dry-run

Long sweeps and the FairFAL comparison run in a clone of their own, so that the
checkout being edited and tested is never the one a run writes into. A session
may end (and the next one start on a fresh machine without the old disk) while
a run is half done, so what the clone computed must reach the repository:

- a **finished** run (``summary.json`` says ``completed``): its records and
  pictures, not the models (``checkpoint.pt``, ``final_model.pt``: large, and
  re-creatable); a checkpoint an earlier collection left here for it is deleted;
- an **unfinished** run that left a checkpoint: ``config.json``,
  ``metrics.jsonl``, ``checkpoint.pt`` and, for a method that keeps state on its
  clients (MOON's previous models, Fed-GraB's controllers, FedLoGe's local heads),
  the ``client-state/`` files its clients wrote, which ``.gitignore`` skips on
  purpose, so commit them with ``git add -f`` (the command is printed):
  ``fedlt-sweep`` and the FairFAL comparison then continue the run from them in
  a later session;
- an unfinished run is left out, with the reason, when nothing could continue it
  exactly: it has no checkpoint, or its method keeps state on its clients and
  they did not write it (``persist-client-state`` off, or a run from before the
  key), so ``fedlt-sweep`` re-runs such a cell from round 1.

A run already here with at least as many rounds (or cycles) is kept; the first
runs of a sweep new to this checkout bring its ``sweep.json`` and ``cells.jsonl``. Then the
tables the copied runs belong to are rewritten: ``fedlt-sweep SPEC --report-only``
for a sweep's cells (``runs/`` next to its ``sweep.json``), the comparison's
``--report-only`` for FairFAL runs (``<preset>-<method>-seed<K>``).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedlt_app.run_folder import completed

STATE_FOLDER = "client-state"  # fedlt_app.client_state.STATE_FOLDER (imported there with flwr; not needed here)

MODEL_FILES = ("checkpoint.pt", "checkpoint.tmp", "final_model.pt", "final_model.tmp")
RESUME_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt")
AL_RUN = re.compile(r"^(?P<preset>.+)-(?P<method>fairfal|random|entropy)-seed(?P<seed>\d+)$")


@dataclass(frozen=True)
class Collected:
    """One run folder the collection copied: where to, and whether it is finished or waits to be continued."""

    run: Path  # in this checkout
    finished: bool
    records: int  # rounds or cycles in its metrics.jsonl


def _records(run_dir: Path) -> int:
    """Rounds (or cycles) the run has written: its progress, to tell which copy is ahead."""
    try:
        return sum(1 for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip())
    except OSError:
        return 0


def run_folders(results: Path) -> list[Path]:
    """Every run folder under ``results`` (a folder holding ``config.json``), in a stable order."""
    return sorted(config.parent for config in results.rglob("config.json"))


def not_continuable(run_dir: Path) -> str | None:
    """Why an unfinished run could not be continued exactly from what it left (None: it can)."""
    if not (run_dir / "checkpoint.pt").is_file():
        return "no checkpoint"
    from fedlt_app.methods import resumes_exactly  # torch: only for unfinished runs

    try:
        run_config = json.loads((run_dir / "config.json").read_text())["run_config"]
        exact = resumes_exactly(run_config)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "config.json unreadable"
    if not exact:
        return (f"{run_config.get('method')} keeps state on its clients, which this run kept in memory only: "
                "it re-runs from round 1")
    return None


def checkpointed_client_states(run_dir: Path) -> list[Path]:
    """The ``client-state/`` files a resume from the run's checkpoint reads (none: its clients kept nothing)."""
    if not (run_dir / STATE_FOLDER).is_dir():
        return []
    import torch  # only for unfinished runs whose clients kept state

    from fedlt_app.client_state import resume_files

    checkpointed = int(torch.load(run_dir / "checkpoint.pt", weights_only=False)["round"])
    return resume_files(run_dir / STATE_FOLDER, checkpointed)


def collect_run(source: Path, target: Path, dry_run: bool = False) -> Collected | None:
    """Copy one finished run, or one unfinished run that ``not_continuable`` passed, if it holds something this
    checkout lacks (see the module docstring); None if not."""
    finished = completed(source)
    # kept if finished here, or as far along as the source's unfinished run
    if target.is_dir() and (completed(target) or (not finished and _records(target) >= _records(source))):
        return None
    if dry_run:
        return Collected(target, finished, _records(source))
    target.mkdir(parents=True, exist_ok=True)
    if finished:
        for path in source.iterdir():
            if path.is_file() and path.name not in MODEL_FILES:
                shutil.copy2(path, target / path.name)
        for name in MODEL_FILES:
            (target / name).unlink(missing_ok=True)
        shutil.rmtree(target / STATE_FOLDER, ignore_errors=True)
    else:
        for name in RESUME_FILES:
            shutil.copy2(source / name, target / name)
        shutil.rmtree(target / STATE_FOLDER, ignore_errors=True)  # the files of this checkpoint, none older
        for path in checkpointed_client_states(source):
            (target / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target / path.relative_to(source))
    return Collected(target, finished, _records(source))


def adopt_sweep_manifest(source_sweep: Path, target_sweep: Path) -> None:
    """A sweep this checkout has no results of yet: bring its ``sweep.json`` (which names the sweep file the
    tables are rewritten from) and ``cells.jsonl`` (the cells' outcomes) with its first runs."""
    if (source_sweep / "sweep.json").is_file() and not (target_sweep / "sweep.json").exists():
        for name in ("sweep.json", "cells.jsonl"):
            if (source_sweep / name).is_file():
                shutil.copy2(source_sweep / name, target_sweep / name)


def _rewrite_reports(root: Path, copied: Sequence[Collected]) -> None:
    # imported here: collecting and --dry-run need neither torch nor the report code
    from fedlt_app import sweep
    from fedlt_app.active import compare

    sweeps = sorted({c.run.parent.parent for c in copied if (c.run.parent.parent / "sweep.json").is_file()})
    for sweep_dir in sweeps:
        spec = root / json.loads((sweep_dir / "sweep.json").read_text())["source"]
        print(f"collect: rewriting {sweep_dir.relative_to(root)}'s tables from {spec.relative_to(root)}")
        sweep.main([str(spec), "--output", str(sweep_dir.parent), "--report-only"])
    comparisons: dict[tuple[Path, str], tuple[set[str], set[int]]] = {}
    for c in copied:
        match = AL_RUN.match(c.run.name)
        if match:
            methods, seeds = comparisons.setdefault((c.run.parent, match["preset"]), (set(), set()))
            for sibling in c.run.parent.iterdir():  # every seed and method already there, not only the new ones
                m = AL_RUN.match(sibling.name)
                if m and m["preset"] == match["preset"]:
                    methods.add(m["method"])
                    seeds.add(int(m["seed"]))
    for (out, preset), (methods, seeds) in sorted(comparisons.items()):
        print(f"collect: rewriting {out.relative_to(root)}/{preset}.md")
        compare.main(["--preset", preset, "--out", str(out), "--methods", *sorted(methods),
                      "--seeds", *map(str, sorted(seeds)), "--report-only"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedlt_app.collect", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="the clone whose results/ holds the runs (e.g. /work/sweeprun)")
    parser.add_argument("--into", type=Path, default=Path("."), help="this checkout (default: the current folder)")
    parser.add_argument("--dry-run", action="store_true", help="list what would be copied; copy nothing")
    args = parser.parse_args(argv)
    source, root = args.source.resolve(), args.into.resolve()
    if not (source / "results").is_dir():
        parser.error(f"{source} has no results/ folder")
    if source == root:
        parser.error("source and --into are the same checkout")
    copied = []
    for run in run_folders(source / "results"):
        if not completed(run) and (reason := not_continuable(run)):
            print(f"collect: left out {run.relative_to(source)} (unfinished: {reason})")
            continue
        if (c := collect_run(run, root / run.relative_to(source), args.dry_run)) is not None:
            copied.append(c)
            if not args.dry_run:
                adopt_sweep_manifest(run.parent.parent, c.run.parent.parent)
    for c in copied:
        state = "finished" if c.finished else f"unfinished: {c.records} records and its checkpoint"
        print(f"collect: {c.run.relative_to(root)} ({state})")
    if not copied:
        print("collect: nothing new")
        return 0
    if args.dry_run:
        return 0
    _rewrite_reports(root, copied)
    waiting = [path for c in copied if not c.finished
               for path in (c.run / "checkpoint.pt", c.run / STATE_FOLDER) if path.exists()]
    print("collect: stage the runs (and the deletion of checkpoints whose runs finished) with: git add -A results")
    if waiting:
        print("collect: and the checkpoints (and client states) that let a later session continue (ignored by "
              ".gitignore) with:\n"
              f"  git add -f {' '.join(str(p.relative_to(root)) for p in waiting)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
