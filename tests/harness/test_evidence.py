"""The ablation command and the README's ICE table, on tiny digits runs."""

import csv

import numpy as np
import pytest

from benchmarks import ablation, evidence, run
from benchmarks.core.out_folder import OutFolder
from benchmarks.core import query_scores
from benchmarks.report import comparisons, tables
from benchmarks.core.results import best_epoch_rows

TINY = ["--dataset", "digits", "--epochs", "1", "--limit-per-class", "40", "--batch-size", "32", "--m-per-class", "8",
        "--patience", "-1", "--quiet"]


def test_the_ablation_grid_trains_lam_zero_once_and_sweeps_scale_around_the_centre():
    centre = ablation.Setting(scale=6.03, lam=2.56, normalize="anchor")
    groups = ablation.grid(centre)
    lam_grid = [(s.lam, s.normalize, s.scale) for s in groups["lam"]]
    assert lam_grid[0] == (0, "batch", 6.03) and [lam for lam, _, _ in lam_grid].count(0) == 1
    assert sorted(lam_grid[1:]) == sorted((lam, n, 6.03) for lam in ablation.LAMS if lam for n in ablation.NORMALIZATIONS)
    assert [s.scale for s in groups["scale"]] == sorted(set(ablation.SCALES) | {6.03})
    assert all((s.lam, s.normalize) == (2.56, "anchor") for s in groups["scale"])
    assert groups["lam"][0].spec.label == "ice:lam=0,normalize='batch',scale=6.03"


@pytest.mark.slow
def test_ablation_runs_the_grid_and_compares_each_lam_with_lam_zero(tmp_path, monkeypatch):
    monkeypatch.setattr(ablation, "LAMS", (0, 2))
    monkeypatch.setattr(ablation, "SCALES", (4,))
    out = tmp_path / "ablation"
    argv = TINY + ["--losses", "ice:scale=16,lam=1,normalize=anchor", "--seeds", "2", "--out", str(out)]
    assert ablation.main(argv) == 0
    report = (out / "ablation.md").read_text()
    assert (out / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    settings = [ablation.Setting(16, 0, "batch"), ablation.Setting(16, 2, "batch"), ablation.Setting(16, 2, "anchor"),
                ablation.Setting(4, 1, "anchor"), ablation.Setting(16, 1, "anchor")]
    best, scores, _ = ablation.collect(OutFolder(out), settings, seeds=2, epochs=1)
    assert set(best) == {s.spec.label for s in settings} and all(len(rows) == 2 for rows in best.values())
    difference = comparisons.compare_losses(scores, settings[2].spec.label, settings[0].spec.label)
    d = difference["mean_average_precision_at_r"].seeds
    assert "| anchor | 2 | 16" in report and f"{100 * d.mean:+.1f} [{100 * d.ci_low:+.1f}, {100 * d.ci_high:+.1f}]" in report
    assert "## scale, at lam 1 and normalize anchor" in report
    checkpoints = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed*/checkpoint.pth")}
    assert len(checkpoints) == 10
    assert ablation.main(argv) == 0  # a second command finds every run done and trains nothing
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed*/checkpoint.pth")} == checkpoints


@pytest.mark.slow
def test_the_ablation_can_train_one_group(tmp_path, monkeypatch):
    monkeypatch.setattr(ablation, "LAMS", (0, 2))
    out = tmp_path / "ablation"
    argv = TINY + ["--losses", "ice:scale=16,lam=1,normalize=anchor", "--seeds", "2", "--groups", "lam", "--out", str(out)]
    assert ablation.main(argv) == 0
    report = (out / "ablation.md").read_text()
    assert "## lam and normalize" in report and "## scale" not in report
    trained = {p.parent.parent.name for p in out.glob("runs/*/seed*/checkpoint.pth")}
    assert trained == {s.spec.folder_name for s in ablation.grid(ablation.Setting(16, 1, "anchor"), ["lam"])["lam"]}


def test_ablation_needs_an_ice_spec(tmp_path, capsys):
    assert ablation.main(TINY + ["--losses", "ntxent", "--out", str(tmp_path)]) == 2
    assert "names no ICE spec" in capsys.readouterr().err


@pytest.mark.slow
def test_the_ice_table_reads_means_and_paired_differences_from_the_runs(tmp_path):
    out = tmp_path / "runs"
    assert run.main(TINY + ["--patience", "1", "--losses", "ice,ntxent", "--seeds", "2", "--out", str(out)]) == 0
    table = evidence.ice_table(out)
    with open(out / "results.csv", newline="") as f:
        rows = [{k: (v if k == "loss" else float(v or "nan")) for k, v in r.items()} for r in csv.DictReader(f)]
    best = best_epoch_rows(rows)
    ntxent_map = 100 * np.mean([r["mean_average_precision_at_r"] for r in best["ntxent"]])
    lines = table.splitlines()
    assert lines[2].startswith("| untrained model | 2 |") and lines[3].startswith("| `ice` | 2 |")
    assert lines[4].startswith(f"| `ntxent` | 2 | {ntxent_map:.1f} ± ")
    _, run_folders, _ = OutFolder(out).finished_runs(epochs=1)
    found = comparisons.compare_losses(query_scores.load_run_scores(run_folders)[0], "ntxent", "ice")
    d, headline = found["precision_at_1"].seeds, found["mean_average_precision_at_r"].seeds
    assert lines[4].endswith(f"{100 * d.mean:+.1f} [{100 * d.ci_low:+.1f}, {100 * d.ci_high:+.1f}], "
                             f"p {tables.p_text(d.p_value)} | {100 * headline.detectable:.1f} |")
    assert "ntxent (`ntxent`: 2 of 2 runs stopped by the epoch cap)" in table.splitlines()[-1]
    assert table.splitlines()[-1].endswith("ICE (`ice`: 2 of 2 runs stopped by the epoch cap).")
    assert "runs stopped by the epoch cap: 4 of 4" in table.splitlines()


@pytest.mark.slow
def test_the_ice_table_of_a_fixed_budget_draws_no_verdict(tmp_path):
    out = tmp_path / "fixed"
    assert run.main(TINY + ["--losses", "ice,ntxent", "--seeds", "2", "--out", str(out)]) == 0
    lines = evidence.ice_table(out).splitlines()
    assert "runs stopped by the epoch cap: 4 of 4" in lines
    assert lines[-1] == "Not trained to convergence (a fixed budget): no verdict about which loss is better."


def test_the_ice_table_needs_runs_and_an_ice_run(tmp_path, capsys):
    assert evidence.main([str(tmp_path / "empty")]) == 2
    assert "holds no finished run" in capsys.readouterr().err
    out = tmp_path / "no-ice"
    assert run.main(TINY + ["--losses", "ntxent", "--seeds", "1", "--out", str(out)]) == 0
    with pytest.raises(ValueError, match="no ICE run"):
        evidence.ice_table(out)
