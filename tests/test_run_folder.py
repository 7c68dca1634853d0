"""A run folder's state as every reader of results sees it (sweep, reports, FairFAL tables, collect)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fedlt_app.run_folder import completed, run_status


def test_status_follows_summary_json(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"round": 1}\n')
    assert run_status(run) is None and not completed(run)  # still running: records, no summary
    (run / "summary.json").write_text(json.dumps({"status": "failed"}))
    assert run_status(run) == "failed" and not completed(run)
    (run / "summary.json").write_text(json.dumps({"status": "completed"}))
    assert run_status(run) == "completed" and completed(run)


def test_unreadable_summary_is_no_status(tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_text('{"status": "compl')  # cut off mid-write
    assert run_status(tmp_path) is None
    (tmp_path / "summary.json").write_text("[1, 2]")  # valid JSON, not a summary
    assert run_status(tmp_path) is None
    assert run_status(tmp_path / "absent") is None


def test_reading_status_does_not_load_torch() -> None:
    code = "import sys, fedlt_app.run_folder, fedlt_app.collect; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
