"""The FairFAL comparison over seeds: the aggregated table, the plot, and compare's run plan (no simulation)."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest

from fedlt_app.active import compare
from fedlt_app.active.plot import comparison_table, plot_curves

RATIOS = (0.05, 0.10, 0.15)
# method -> seed -> accuracy per cycle (fractions); tail accuracy is half of it, so both columns are checked
ACC = {
    "fairfal": {0: (0.50, 0.60, 0.70), 1: (0.60, 0.70, 0.80), 2: (0.55, 0.65, 0.60)},
    "random": {0: (0.40, 0.45, 0.42), 1: (0.50, 0.48, 0.55)},
}


def write_run(folder: Path, method: str, seed: int, accuracies: tuple[float, ...], status: str | None = "completed",
              jitter: float = 0.0) -> Path:
    """A run folder as a real run leaves it: config.json, metrics.jsonl, summary.json (if ``status``)."""
    folder.mkdir(parents=True, exist_ok=True)  # a resumed run writes into its folder
    (folder / "config.json").write_text(json.dumps({"run_config": {"al-method": method, "seed": seed}}))
    rows = [{"cycle": i + 1, "target_ratio": ratio, "labeled_ratio": ratio - jitter * (seed + 1),
             "accuracy": acc, "tail_accuracy": acc / 2} for i, (ratio, acc) in enumerate(zip(RATIOS, accuracies))]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    if status is not None:
        (folder / "summary.json").write_text(json.dumps({"status": status}))
    return folder


def fixture_runs(root: Path) -> list[Path]:
    # the realised labeled ratio differs per seed (as in real runs); the rows line up by target ratio
    return [write_run(root / f"{m}-seed{s}", m, s, acc, jitter=1e-4) for m, seeds in ACC.items()
            for s, acc in seeds.items()]


def spread(values: list[float]) -> str:
    """The expected cell, computed here independently of plot.py."""
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.2f}"
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.2f} ± {std:.2f}"


def cells(table: str, row_label: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"| {row_label} |"))
    return [cell.strip() for cell in line.strip("|").split("|")][1:]


def test_table_cells_are_mean_and_sample_std_over_seeds(tmp_path: Path) -> None:
    table = comparison_table(fixture_runs(tmp_path))
    assert "Seeds per method: fairfal 3 (0, 1, 2); random 2 (0, 1)." in table
    assert "| labeled ratio | fairfal acc. | fairfal tail | random acc. | random tail |" in table
    assert cells(table, "0.05") == [spread([50, 60, 55]), spread([25, 30, 27.5]), spread([40, 50]), spread([20, 25])]
    assert cells(table, "0.05")[2] == "45.00 ± 7.07"
    assert cells(table, "0.15") == [spread([70, 80, 60]), spread([35, 40, 30]), spread([42, 55]), spread([21, 27.5])]
    fair_means = [statistics.fmean(100 * a for a in ACC["fairfal"][s]) for s in (0, 1, 2)]
    random_means = [statistics.fmean(100 * a for a in ACC["random"][s]) for s in (0, 1)]
    assert cells(table, "mean over ratios")[0] == spread(fair_means)
    assert cells(table, "mean over ratios")[2] == spread(random_means)


def test_a_single_seed_shows_the_mean_without_spread(tmp_path: Path) -> None:
    table = comparison_table([write_run(tmp_path / "one", "random", 0, (0.50, 0.60, 0.55))])
    assert cells(table, "0.05") == ["50.00", "25.00"]
    assert "±" not in table
    assert "Paired difference" not in table  # no FairFAL to pair against


def test_paired_difference_against_fairfal(tmp_path: Path) -> None:
    table = comparison_table(fixture_runs(tmp_path))
    # per seed: FairFAL's mean over ratios minus random's, on the seeds both have (0 and 1)
    diffs = [100 * (statistics.fmean(ACC["fairfal"][s]) - statistics.fmean(ACC["random"][s])) for s in (0, 1)]
    mean = sum(diffs) / 2
    std = abs(diffs[0] - diffs[1]) / 2 ** 0.5  # sample std of two values
    expected = f"- fairfal - random, accuracy: {mean:+.2f} ± {std:.2f} points (seeds 0, 1); fairfal higher in 2 of 2"
    assert expected in table
    tail = [d / 2 for d in diffs]
    assert f"- fairfal - random, tail accuracy: {sum(tail) / 2:+.2f} ± {std / 2:.2f} points (seeds 0, 1)" in table


def test_paired_sign_count_counts_seeds_where_fairfal_is_behind(tmp_path: Path) -> None:
    runs = [write_run(tmp_path / f"{m}{s}", m, s, (acc,) * 3)
            for m, s, acc in (("fairfal", 0, 0.6), ("random", 0, 0.5), ("fairfal", 1, 0.4), ("random", 1, 0.5))]
    table = comparison_table(runs)
    assert "- fairfal - random, accuracy: +0.00 ± 14.14 points (seeds 0, 1); fairfal higher in 1 of 2 seeds." in table


def test_monotonicity_lines(tmp_path: Path) -> None:
    table = comparison_table(fixture_runs(tmp_path))
    # random's mean curve: 45.00, 46.50, 48.50 -> rising; fairfal's: 55.00, 65.00, 70.00 -> rising
    assert "- fairfal: mean accuracy is non-decreasing in the labeled ratio." in table
    assert "- random: mean accuracy is non-decreasing in the labeled ratio." in table
    dropping = [write_run(tmp_path / "d0", "entropy", 0, (0.50, 0.70, 0.40)),
                write_run(tmp_path / "d1", "entropy", 1, (0.60, 0.50, 0.45))]
    # mean curve 55.00, 60.00, 42.50: one drop, 17.50 points from 0.10 to 0.15
    assert ("- entropy: mean accuracy falls 1 time(s); largest drop 17.50 points, from ratio 0.10 to 0.15."
            in comparison_table(dropping))


def test_incomplete_runs_are_left_out(tmp_path: Path) -> None:
    runs = fixture_runs(tmp_path)
    runs.append(write_run(tmp_path / "random-seed2", "random", 2, (0.99, 0.99, 0.99), status="running"))
    runs.append(write_run(tmp_path / "random-seed3", "random", 3, (0.01, 0.01, 0.01), status=None))
    table = comparison_table(runs)
    assert "random 2 (0, 1)" in table
    assert cells(table, "0.05")[2] == spread([40, 50])
    assert comparison_table(runs[-2:]) == "No completed runs."


def test_cycle_plateaus_from_recorded_cycle_curves(tmp_path: Path) -> None:
    runs = fixture_runs(tmp_path)
    # random seed 0 recorded its cycles' curves (al-cycle-curve): 40 rounds each
    rising = [0.1 + 0.02 * r for r in range(15)] + [0.6] * 25  # flat from round 16 on
    never = [0.01 * r for r in range(40)]  # rises 0.1 per 10 rounds to the end: never settles
    flat = [0.5] * 40
    metrics = runs[3] / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    for row, curve in zip(rows, (rising, flat, never), strict=True):
        row["cycle_accuracy"], row["cycle_tail_accuracy"] = curve, flat
    metrics.write_text("".join(json.dumps(row) + "\n" for row in rows))
    table = comparison_table(runs)
    line = next(line for line in table.splitlines() if line.startswith("- random seed 0 (40 rounds per cycle)"))
    # rising: the last-10 means at N and N + 10 agree from N = 25 (rounds 16-25 and 26-35 both flat); at N = 24
    # round 15 (0.38) is still in the first window: 2.2 points apart
    assert "balanced 25, 10, not reached (largest: not reached)" in line
    assert "tail 10, 10, 10 (largest: 10)" in line
    assert sum(line.startswith("- ") and "rounds per cycle" in line for line in table.splitlines()) == 1


def test_plot_curves_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = plot_curves(fixture_runs(tmp_path / "runs"), tmp_path / "out" / "curves.png", title="fixture")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 1000


OVERRIDE = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")


class FakeLaunch:
    """Stands in for launch.run: records each run config and leaves a completed run folder as a real run would."""

    def __init__(self) -> None:
        self.calls: list[dict[str, str]] = []

    def __call__(self, app_dir: Path, run_config: str, **kwargs: object) -> int:
        config = {key: value.strip("'\"") for key, value in OVERRIDE.findall(run_config)}
        self.calls.append(config)
        seed = int(config["seed"])
        accuracy = 0.5 + 0.1 * seed + (0.05 if config["al-method"] == "fairfal" else 0.0)
        write_run(Path(config["output-dir"]) / config["run-name"], config["al-method"], seed, (accuracy,) * 3)
        return 0


@pytest.fixture
def fake_launch(monkeypatch: pytest.MonkeyPatch) -> FakeLaunch:
    fake = FakeLaunch()
    monkeypatch.setattr(compare.launch, "run", fake)
    # the PNG is plot_curves' business (tested above); here only which folders it is given
    monkeypatch.setattr(compare, "plot_curves", lambda run_dirs, output, title="": output)
    return fake


def test_compare_runs_seed_major_and_keeps_completed_runs(tmp_path: Path, fake_launch: FakeLaunch) -> None:
    argv = ["--preset", "p", "--out", str(tmp_path), "--methods", "fairfal", "random", "--seeds", "0", "1",
            "--run-config", "fl-rounds-per-cycle=2"]
    assert compare.main(argv) == 0
    assert [(c["seed"], c["al-method"]) for c in fake_launch.calls] == [
        ("0", "fairfal"), ("0", "random"), ("1", "fairfal"), ("1", "random")]
    for call in fake_launch.calls:
        assert call["run-name"] == f"p-{call['al-method']}-seed{call['seed']}"
        assert call["preset"] == "p" and call["fl-rounds-per-cycle"] == "2"
    table = (tmp_path / "p.md").read_text()
    assert "Seeds per method: fairfal 2 (0, 1); random 2 (0, 1)." in table
    assert "fairfal higher in 2 of 2 seeds" in table

    fake_launch.calls.clear()  # a second invocation with one more seed runs only that seed
    assert compare.main([*argv[:-4], "0", "1", "2"]) == 0
    assert [(c["seed"], c["al-method"]) for c in fake_launch.calls] == [("2", "fairfal"), ("2", "random")]
    assert "fairfal 3 (0, 1, 2); random 3 (0, 1, 2)" in (tmp_path / "p.md").read_text()


def test_compare_stops_at_an_unfinished_run_before_running_anything(tmp_path: Path, fake_launch: FakeLaunch) -> None:
    write_run(tmp_path / "p-random-seed1", "random", 1, (0.5,) * 3, status="running")
    with pytest.raises(SystemExit, match="unfinished run"):
        compare.main(["--preset", "p", "--out", str(tmp_path), "--methods", "fairfal", "random", "--seeds", "0", "1"])
    assert fake_launch.calls == []


def test_compare_continues_an_interrupted_run_from_its_checkpoint(tmp_path: Path, fake_launch: FakeLaunch) -> None:
    interrupted = tmp_path / "p-random-seed0"
    write_run(interrupted, "random", 0, (0.5,) * 3, status="failed")
    (interrupted / "checkpoint.pt").write_bytes(b"")  # what compare looks for; the app reads it
    assert compare.main(["--preset", "p", "--out", str(tmp_path), "--methods", "fairfal", "random"]) == 0
    fairfal, random = fake_launch.calls
    assert "resume-from" not in fairfal
    assert random["resume-from"] == str(interrupted) and random["run-name"] == interrupted.name


def test_compare_reports_completed_seeds_after_a_failed_run(tmp_path: Path, fake_launch: FakeLaunch,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def fail_on_seed_1(app_dir: Path, run_config: str, **kwargs: object) -> int:
        return 1 if "seed=1" in run_config else fake_launch(app_dir, run_config, **kwargs)

    monkeypatch.setattr(compare.launch, "run", fail_on_seed_1)
    code = compare.main(["--preset", "p", "--out", str(tmp_path), "--methods", "fairfal", "random",
                         "--seeds", "0", "1"])
    assert code == 1
    assert "Seeds per method: fairfal 1 (0); random 1 (0)." in (tmp_path / "p.md").read_text()


def test_report_only_tables_the_runs_there_and_runs_nothing(tmp_path: Path, fake_launch: FakeLaunch) -> None:
    write_run(tmp_path / "p-fairfal-seed0", "fairfal", 0, (0.6,) * 3)
    write_run(tmp_path / "p-random-seed0", "random", 0, (0.5,) * 3, status="running")  # unfinished: left out
    assert compare.main(["--preset", "p", "--out", str(tmp_path), "--methods", "fairfal", "random",
                         "--report-only"]) == 0
    assert fake_launch.calls == []
    assert "Seeds per method: fairfal 1 (0)." in (tmp_path / "p.md").read_text()


@pytest.mark.parametrize("run_config", ["seed=3", "local-epochs=2 seed=3"])
def test_compare_refuses_a_seed_in_run_config(tmp_path: Path, fake_launch: FakeLaunch, run_config: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        compare.main(["--out", str(tmp_path), "--run-config", run_config])
    assert exit_info.value.code == 2
    assert "--seeds" in capsys.readouterr().err
    assert fake_launch.calls == []


def test_table_says_where_each_run_computed(tmp_path: Path) -> None:
    """Seeds computed on CPUs whose kernels differ do not share float rounding: the table lists the machines."""
    runs = fixture_runs(tmp_path)
    avx2 = {"cpu": "AMD EPYC", "cpu_capability": "AVX2", "torch": "2.14.1"}
    avx512 = {**avx2, "cpu_capability": "AVX512"}
    for run in runs:
        config = json.loads((run / "config.json").read_text())
        config["server_machine"] = avx2 if run.name.endswith("seed0") else avx512
        if run.name == "fairfal-seed2":  # started on one machine, resumed on another after cycle 2
            config["machine_history"] = [{"from_round": 1, "server_machine": avx2},
                                         {"from_round": 3, "server_machine": avx512}]
        (run / "config.json").write_text(json.dumps(config))
    table = comparison_table(runs)
    assert "## Machines" in table and "paired differences include it" in table
    assert "- AMD EPYC (AVX512), torch 2.14.1: 2 run(s): `fairfal-seed1`, `random-seed1`" in table
    assert "- AMD EPYC (AVX2), torch 2.14.1: 2 run(s): `fairfal-seed0`, `random-seed0`" in table
    assert ("- AMD EPYC (AVX2), torch 2.14.1 from round 1; AMD EPYC (AVX512), torch 2.14.1 from round 3: "
            "1 run(s): `fairfal-seed2`") in table


def test_notebook_renders_a_comparison(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    for method, seeds in ACC.items():
        for seed, accuracies in seeds.items():
            write_run(tmp_path / f"p-{method}-seed{seed}", method, seed, accuracies)
    write_run(tmp_path / "p-entropy-seed0", "entropy", 0, (0.9,) * 3, status=None)  # unfinished: left out
    write_run(tmp_path / "q-entropy-seed0", "entropy", 0, (0.9,) * 3)  # another preset's
    plot_curves([tmp_path / "p-fairfal-seed0"], tmp_path / "p-fairfal-seed0" / "per_class.png")  # any PNG
    notebook = Path(__file__).resolve().parent.parent / "notebooks" / "fairfal_comparison.ipynb"
    nb = nbformat.read(notebook, as_version=4)
    monkeypatch.setenv("FEDLT_AL_RESULTS", str(tmp_path))
    monkeypatch.setenv("FEDLT_AL_PRESET", "p")
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(notebook.parent)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "p: 5/6 runs completed" in text and "p-entropy-seed0: unfinished (left out)" in text
    markdown = "".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert "Seeds per method: fairfal 3 (0, 1, 2); random 2 (0, 1)." in markdown
    assert f"| 0.05 | {spread([50.0, 60.0, 55.0])} |" in markdown
    assert len([o for o in outputs if "image/png" in o.get("data", {})]) == 2  # the curves, one per-class picture
