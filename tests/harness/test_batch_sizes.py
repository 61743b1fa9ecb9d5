"""python -m benchmarks.batch_sizes: per batch size, tuning and seeds, then the seed-paired table."""

import contextlib
import json

import pytest

from benchmarks import batch_sizes

TINY = ["--dataset", "digits", "--epochs", "1", "--limit-per-class", "20", "--m-per-class", "8", "--patience", "1",
        "--losses", "ice,ntxent", "--trials", "1", "--seeds", "2", "--cache-chunk", "16"]


@pytest.mark.slow
def test_each_batch_size_is_tuned_trained_and_compared(tmp_path, capsys):
    out = tmp_path / "out"
    argv = TINY + ["--batch-sizes", "32,16", "--out", str(out)]
    assert batch_sizes.main(argv) == 0
    report = (out / "batch_sizes.md").read_text()
    assert report in capsys.readouterr().out
    assert "- batch 16: runs stopped by the epoch cap: 4 of 4" in report
    rows = [line for line in report.splitlines() if line.startswith(("| ice |", "| ntxent |"))]
    cells = [[cell.strip("| ") for cell in line.split(" | ")] for line in rows]
    # loss, batch, steps per epoch (80 training images), seeds
    assert [(c[0], c[1], c[2], c[4]) for c in cells] == [
        ("ice", "16", "5", "2"), ("ice", "32", "2", "2"), ("ntxent", "16", "5", "2"), ("ntxent", "32", "2", "2")]
    assert rows[0].endswith("|  |  |") and ", p " in rows[1]  # the larger batch against the smallest
    for sentence in ("ice at batch 32 and ice at batch 16", "ntxent at batch 32 and ntxent at batch 16",
                     "At batch 16: ", "At batch 32: "):
        assert sentence in report
    identity = {size: json.loads((out / f"batch{size}" / "config.json").read_text()) for size in (16, 32)}
    assert (identity[16]["batch_size"], identity[16]["cache_chunk"]) == (16, None)
    assert (identity[32]["batch_size"], identity[32]["cache_chunk"]) == (32, 16)
    trained = sorted((out / "batch32").glob("runs/*/seed*/checkpoint.pth"))
    stamps = [path.stat().st_mtime_ns for path in trained]
    assert len(trained) == 4 and batch_sizes.main(argv) == 0  # a rerun resumes: nothing is trained again
    assert [path.stat().st_mtime_ns for path in trained] == stamps
    assert (out / "batch_sizes.md").read_text() == report


@pytest.mark.parametrize("extra, message", [
    (["--batch-sizes", "16,64"], "cannot fill a batch of 64"),
    (["--batch-sizes", "16,x"], "distinct integers >= 1"),
    (["--batch-size", "16"], "--batch-size: set by this command"),
    (["--batch-size=16", "--quiet"], "--batch-size, --quiet: set by this command"),
    (["--cache", "8", "--losse", "ntxent"], "unrecognized arguments: --cache 8 --losse ntxent; write the options of "
     "benchmarks.run in full (--cache for --cache-chunk?, --losse for --losses?)"),
    (["--config", "run.toml"], "--config: set by this command"),
    (["--losses", "ice,nope"], "no search space for nope"),
    (["--seeds", "0"], "--seeds must be a count"),
    (["--trials", "0"], "--trials and --cache-chunk must be at least 1"),
])
def test_bad_requests_are_refused_before_anything_trains(tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) if "integers" in message else contextlib.nullcontext():
        assert batch_sizes.main(TINY + extra + ["--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_an_out_naming_a_file_is_refused_before_anything_trains(tmp_path, capsys):
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    assert batch_sizes.main(TINY + ["--batch-sizes", "16", "--out", str(existing)]) == 2
    assert f"--out {existing} is a file, not a folder" in capsys.readouterr().err
    assert existing.read_text() == "keep me" and sorted(tmp_path.iterdir()) == [existing]


@pytest.mark.slow
def test_a_fixed_budget_draws_no_verdict(tmp_path):
    out = tmp_path / "out"
    assert batch_sizes.main(TINY + ["--patience", "-1", "--batch-sizes", "16", "--seeds", "2", "--out", str(out)]) == 0
    report = (out / "batch_sizes.md").read_text()
    assert "- Not trained to convergence (a fixed budget): no verdict is drawn from these differences." in report
    assert "better than" not in report and "no detectable difference" not in report
