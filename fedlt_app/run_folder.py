"""Reading a run folder's state without importing what wrote it.

``results.RunRecorder`` writes ``summary.json`` when a run ends (``completed``
or ``failed``); until then the folder holds only its per-round records. The
sweep, the reports, the FairFAL comparison and ``collect`` all ask the same
question of a folder, so the answer lives here, below all of them, with the
standard library only (asking it must not load torch).
"""

from __future__ import annotations

import json
from pathlib import Path


def run_status(run_dir: Path) -> str | None:
    """``summary.json``'s status (``completed``, ``failed``), or None while absent or unreadable."""
    try:
        return str(json.loads((Path(run_dir) / "summary.json").read_text())["status"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def completed(run_dir: Path) -> bool:
    """Whether the run finished; an unfinished run's records are a partial curve that would bias a mean."""
    return run_status(run_dir) == "completed"
