"""python -m benchmarks.compare: two output folders, loss by loss, by the seed-paired test."""

import csv
import shutil

import numpy as np
import pytest
import torch

from benchmarks import compare, run

pytestmark = pytest.mark.slow  # every test reads folders trained once for the module

TINY = ["--dataset", "digits", "--epochs", "1", "--limit-per-class", "20", "--m-per-class", "8", "--patience", "1",
        "--quiet"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    made = {
        "a": TINY + ["--batch-size", "16", "--losses", "ice,ntxent", "--seeds", "3"],
        "b": TINY + ["--batch-size", "32", "--losses", "ice:scale=20", "--seeds", "0,1"],
        "two_ice": TINY + ["--batch-size", "16", "--losses", "ice:scale=10,ice:scale=20", "--seeds", "1"],
        "other_queries": TINY[:5] + ["10"] + TINY[6:] + ["--batch-size", "16", "--losses", "ice", "--seeds", "1"],
        "fixed_budget": TINY + ["--patience", "-1", "--batch-size", "16", "--losses", "ice", "--seeds", "2"],
    }
    for name, argv in made.items():
        assert run.main(argv + ["--out", str(root / name)]) == 0
    return root


def best_test_map(folder, seeds):
    """Per seed, the test MAP@R (%) of the ice run at its best validation epoch, from results.csv."""
    with open(folder / "results.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["loss"].startswith("ice")]
    best = {}
    for seed in seeds:
        runs = [r for r in rows if int(r["seed"]) == seed]
        top = max(runs, key=lambda r: (float(r["val_mean_average_precision_at_r"]), -int(r["epoch"])))
        best[seed] = 100 * float(top["mean_average_precision_at_r"])
    return best


def test_the_losses_both_folders_hold_are_compared_over_their_common_seeds(folders, tmp_path, capsys):
    out = tmp_path / "report.md"
    assert compare.main([str(folders / "a"), str(folders / "b"), "--out", str(out)]) == 0
    report = out.read_text()
    assert report in capsys.readouterr().out
    assert "batch_size 16 / 32" in report and "cache_chunk" not in report
    rows = [line for line in report.splitlines() if line.startswith("| ice |")]
    assert len(rows) == 1 and "ntxent" not in report  # ntxent is in A only
    cells = rows[0].strip("| ").split(" | ")
    assert cells[1:4] == ["`ice`", "`ice:scale=20`", "2"]
    a, b = best_test_map(folders / "a", [0, 1]), best_test_map(folders / "b", [0, 1])
    delta = float(cells[6].split()[0])
    assert delta == pytest.approx(sum(a[s] - b[s] for s in (0, 1)) / 2, abs=0.051)
    assert any(line.startswith("- ") and "ice in A" in line and "ice in B" in line for line in report.splitlines())
    # one epoch, patience 1: every run reached the cap with validation MAP@R still counted as improving
    assert f"- {folders / 'a'}: runs stopped by the epoch cap: 6 of 6" in report
    assert "(`ice` in A: 3 of 3 runs stopped by the epoch cap) (`ice:scale=20` in B: 2 of 2 runs" in report
    assert compare.main([str(folders / "b"), str(folders / "a")]) == 0
    swapped = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ice |")][0]
    assert float(swapped.strip("| ").split(" | ")[6].split()[0]) == pytest.approx(-delta, abs=0.051)


@pytest.mark.parametrize("first, second, message", [
    ("a", "missing", "has no config.json"),
    ("two_ice", "a", "holds two settings of ice"),
    ("a", "other_queries", "were tested on different queries"),
])
def test_folders_that_cannot_be_compared_are_refused(folders, capsys, first, second, message):
    assert compare.main([str(folders / first), str(folders / second)]) == 2
    assert message in capsys.readouterr().err


def folder_bytes(folder):
    return {path: path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("target, message", [
    ("a/config.json", "is inside"),
    ("b/new/report.md", "is inside"),
    ("a", "is a folder; give a file name"),
])
def test_the_report_is_never_written_into_a_compared_folder(folders, capsys, target, message):
    """The compared folders are only read: `--out A/config.json` once replaced A's settings."""
    before = folder_bytes(folders)
    assert compare.main([str(folders / "a"), str(folders / "b"), "--out", str(folders / target)]) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
    assert folder_bytes(folders) == before


def test_a_report_path_that_is_another_folder_is_refused(folders, tmp_path, capsys):
    assert compare.main([str(folders / "a"), str(folders / "b"), "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path} is a folder; give a file name" in capsys.readouterr().err


def test_a_config_json_with_epochs_that_are_not_a_count_is_named(folders, tmp_path, capsys):
    copy = tmp_path / "a"
    shutil.copytree(folders / "a", copy)
    config = copy / "config.json"
    config.write_text(config.read_text().replace('"epochs": 1', '"epochs": "two"'))
    assert compare.main([str(copy), str(folders / "b")]) == 2
    error = capsys.readouterr().err
    assert f"{config}: 'epochs' must be a count of epochs" in error and "'two'" in error


@pytest.mark.parametrize("name, damage, note", [
    ("run.json", b'{"loss": ', "run.json cannot be read"),
    ("checkpoint.pth", b"PK\x03\x04trunc", "checkpoint.pth cannot be read"),
    ("test_scores.npz", b"PK\x03\x04trunc", "test_scores.npz cannot be read"),
    ("test_scores.npz", "object array", "test_scores.npz cannot be read"),
    ("failed.json", b'{"error": "loss is nan", "rows": []}', " failed (loss is nan); left out"),
])
def test_a_run_left_out_is_named_in_the_report(folders, tmp_path, capsys, name, damage, note):
    """Before, compare said only "fewer than 2 seeds in common" (or crashed on the scores)."""
    copy = tmp_path / "a"
    shutil.copytree(folders / "a", copy)
    broken = copy / "runs" / "ice" / "seed1" / name
    if damage == "object array":
        np.savez(broken, labels=np.array([0, "a"], dtype=object), mean_average_precision_at_r=np.ones(2),
                 precision_at_1=np.ones(2))
    else:
        broken.write_bytes(damage)
    before = folder_bytes(copy)
    assert compare.main([str(copy), str(folders / "b")]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("- left out of A: ")]
    assert len(notes) == 1 and f"{broken.parent}{'' if note.startswith(' ') else '/'}{note}" in notes[0]
    assert folder_bytes(copy) == before  # only read


def test_an_unfinished_run_is_named_in_the_report(folders, tmp_path, capsys):
    copy = tmp_path / "a"
    shutil.copytree(folders / "a", copy)
    path = copy / "runs" / "ice" / "seed1" / "checkpoint.pth"
    checkpoint = torch.load(path, weights_only=True)
    torch.save(dict(checkpoint, epoch=0), path)
    assert compare.main([str(copy), str(folders / "b")]) == 0
    assert f"- left out of A: {path.parent} has trained 0 of 1 epochs" in capsys.readouterr().out


def test_a_fixed_budget_gets_no_verdict(folders, capsys):
    assert compare.main([str(folders / "fixed_budget"), str(folders / "b")]) == 0
    report = capsys.readouterr().out
    assert "models were not trained to convergence, and no verdict" in report
    assert "- ice: not trained to convergence (a fixed budget), no verdict" in report
    assert "better than" not in report and "no detectable difference" not in report
