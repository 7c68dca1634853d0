"""Per-run pictures and fedlt-report: the count matrix behind partition.png, and the CLI on fake runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures.fake_runs import CLASS_COUNTS, round_record, write_run

from fedlt_app import run_plots
from fedlt_app.config import resolve
from fedlt_app.configured_data import federated_data
from fedlt_app.data import longtail_counts, tail_classes
from fedlt_app.results import RunRecorder, federation_info

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
PNG = b"\x89PNG"
PICTURES = (run_plots.CURVES, run_plots.PER_CLASS, run_plots.PARTITION)


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:4] == PNG


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="apt package dataset-fashion-mnist not installed")
@pytest.mark.parametrize("partition", ["dirichlet", "iid", "dir-balance"])
def test_client_class_counts_sum_to_the_long_tailed_class_counts(partition: str) -> None:
    cfg = resolve({"dataset": "fmnist", "samples-per-class": 100, "imbalance-ratio": 10.0, "partition": partition})
    data = federated_data(cfg, 4)
    info = federation_info(4, data.class_counts, data.client_indices, data.dataset.train_labels.numpy(),
                           tail_classes(data.class_counts), run_id=1)
    matrix = np.array(info["client_class_counts"])
    assert matrix.shape == (4, 10)
    # every partition gives each sample of the long-tailed set to exactly one client
    assert matrix.sum(axis=0).tolist() == list(data.class_counts) == longtail_counts([100] * 10, "exp", 10.0)
    assert matrix.sum(axis=1).tolist() == info["client_sizes"]
    assert all(isinstance(v, int) for row in info["client_class_counts"] for v in row)  # JSON-ready
    # the machine whose kernels decided the run's float rounding
    assert info["server_machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["server_machine"]["torch"] == torch.__version__ and info["server_machine"]["cpu"]
    json.dumps(info)


def _fake_run(path: Path, seed: int, **kwargs) -> Path:  # type: ignore[no-untyped-def]
    return write_run(path, {"method": "redgrape", "num-server-rounds": 4, "seed": seed}, **kwargs)


def test_fedlt_report_redraws_each_run_and_overlays_them(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    runs = [_fake_run(tmp_path / f"run-{seed}", seed) for seed in (0, 1)]
    assert not (runs[0] / run_plots.CURVES).exists()  # the fixture skips the pictures unless asked
    matrix = json.loads((runs[0] / "config.json").read_text())["client_class_counts"]
    assert np.array(matrix).sum(axis=0).tolist() == CLASS_COUNTS

    out = tmp_path / "figs" / "overlay.png"
    assert run_plots.main([str(r) for r in runs] + ["--output", str(out)]) == 0
    for run in runs:
        assert all(_is_png(run / name) for name in PICTURES)
    assert _is_png(out)
    printed = capsys.readouterr().out.splitlines()
    assert printed == [str(r / name) for r in runs for name in PICTURES] + [str(out)]


def test_overlay_from_a_round_draws_only_the_later_rounds(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    runs = [run_plots.load_run(_fake_run(tmp_path / f"run-{seed}", seed)) for seed in (0, 1)]
    fig = run_plots.plot_overlay(runs, from_round=3)
    for ax, metric in zip(fig.axes, ("accuracy", "tail_accuracy"), strict=True):
        for line, run in zip(ax.get_lines(), runs, strict=True):
            _, values = run_plots._series(run, metric)
            assert list(line.get_xdata()) == [3, 4] and list(line.get_ydata()) == values[2:]
    with pytest.raises(SystemExit):
        run_plots.main([str(r.dir) for r in runs] + ["--from-round", "0"])
    assert "--from-round must be a round number >= 1, got 0" in capsys.readouterr().err


def test_fedlt_report_of_one_run_writes_no_overlay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    run = _fake_run(tmp_path / "run", 0)
    assert run_plots.main([str(run)]) == 0
    assert all(_is_png(run / name) for name in PICTURES) and not (tmp_path / "overlay.png").exists()


def test_fedlt_report_refuses_a_folder_without_results(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = _fake_run(tmp_path / "run", 0)
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    assert run_plots.main([str(run), str(empty)]) == 2
    assert str(empty) in capsys.readouterr().err
    assert not (run / run_plots.CURVES).exists()  # nothing drawn before the input is known to be good


def test_a_finished_run_draws_its_pictures(tmp_path: Path) -> None:
    run = _fake_run(tmp_path / "run", 0, pictures=True)
    assert all(_is_png(run / name) for name in PICTURES)


def test_an_older_run_without_the_count_matrix_gets_curves_and_per_class(tmp_path: Path) -> None:
    run = _fake_run(tmp_path / "run", 0)
    config = json.loads((run / "config.json").read_text())
    del config["client_class_counts"]
    (run / "config.json").write_text(json.dumps(config))
    lines: list[str] = []
    written = run_plots.draw_run(run, log=lines.append)
    assert written == [run / run_plots.CURVES, run / run_plots.PER_CLASS]
    assert all(_is_png(p) for p in written) and not (run / run_plots.PARTITION).exists()
    assert len(lines) == 1 and "partition.png" in lines[0]


def test_active_learning_cycles_are_drawn_per_cycle(tmp_path: Path) -> None:
    run = _fake_run(tmp_path / "run", 0)
    rows = [{**round_record({"method": "fedavg", "imbalance-ratio": 10.0, "rebalance-lambda": 0.1, "seed": 0}, c),
             "cycle": c, "labeled_ratio": 0.05 * c} for c in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = run_plots.load_run(run)
    assert data.x_label == "active-learning cycle"
    assert run_plots.draw_run(run) == [run / name for name in PICTURES]


def test_without_matplotlib_a_run_still_finishes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(run_plots, "has_matplotlib", lambda: False)
    run = _fake_run(tmp_path / "run", 0, pictures=True)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert not any((run / name).exists() for name in PICTURES)
    assert "pip install" in capsys.readouterr().out


def test_a_plotting_error_does_not_fail_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(run_dir, log=print):  # type: ignore[no-untyped-def]
        raise RuntimeError("no canvas")

    monkeypatch.setattr(run_plots, "draw_run", broken)
    cfg = resolve({"num-server-rounds": 1})
    with RunRecorder(cfg, tmp_path, {}) as recorder:
        recorder.log_round(round_record(cfg.as_dict(), 1))
    assert recorder.summary["status"] == "completed" and recorder.pictures == []


def test_partition_of_many_clients_is_a_heat_map(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", {"num-server-rounds": 2}, num_clients=150)
    fig = run_plots.plot_partition(run_plots.load_run(run))
    assert fig is not None and fig.axes[0].images  # imshow, not 1,500 bars


def test_config_json_keeps_one_client_per_line(tmp_path: Path) -> None:
    run = _fake_run(tmp_path / "run", 0)
    text = (run / "config.json").read_text()
    lines = [line.strip().rstrip(",") for line in text.splitlines()]
    for row in json.loads(text)["client_class_counts"]:
        assert json.dumps(row) in lines
