"""End-to-end runs of the harness on digits: smoke, resume, non-finite loss, two processes."""

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import run
from benchmarks.core import training
from benchmarks.report.metrics import METRICS

REPO = Path(__file__).resolve().parents[2]
TINY = ["--dataset", "digits", "--epochs", "2", "--seeds", "1", "--limit-per-class", "40", "--batch-size", "32", "--m-per-class", "8", "--patience", "-1"]


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_smoke_run_on_digits(tmp_path, capsys):
    out = tmp_path / "out"
    assert run.main(TINY + ["--losses", "ice,triplet,proxyanchor", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = read_rows(out / "results.csv")
    assert list(rows[0])[:3] == ["loss", "seed", "epoch"]
    assert set(METRICS) <= set(rows[0])
    assert [(r["loss"], r["epoch"]) for r in rows] == [
        (loss, str(epoch)) for loss in ("ice", "triplet", "proxyanchor") for epoch in (0, 1, 2)
    ]
    for row in rows:
        for metric in METRICS:
            assert 0.0 <= float(row[metric]) <= 1.0
    # Every run starts from the same untrained model (same seed): identical epoch-0 rows.
    epoch0 = [{k: v for k, v in r.items() if k != "loss"} for r in rows if r["epoch"] == "0"]
    assert all(e == epoch0[0] for e in epoch0)
    summary = (out / "summary.md").read_text()
    assert "| `ice` | 1 |" in summary and "MAP@R" in summary
    assert "| `proxyanchor` | 1 |" in printed
    for plot in ("curves.png", "summary_bars.png"):
        assert (out / "plots" / plot).read_bytes()[:4] == b"\x89PNG"
    run_dir = out / "runs" / "ice" / "seed0"
    assert json.loads((run_dir / "run.json").read_text()) == {"loss": "ice", "seed": 0}  # the run's identity
    assert (run_dir / "logs" / "logs.db").is_file()
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run_dir / "tensorboard"))
    # Proxy losses train their proxies with their own optimizer.
    checkpoint = torch.load(out / "runs" / "proxyanchor" / "seed0" / "checkpoint.pth", weights_only=True)
    assert "metric_loss_optimizer" in checkpoint["optimizers"]
    check_ice_weight_statistics_are_logged(run_dir)


def check_ice_weight_statistics_are_logged(run_dir):
    """ICE's reducer statistics reach record-keeper's CSV and tensorboard (PML's log_freq: every 10th iteration of an epoch)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    group = "metric_loss_ICELoss__modules_reducer_ICEReweightReducer"
    rows = read_rows(run_dir / "logs" / f"{group}.csv")
    iterations = [int(r["~iteration~"]) for r in rows]
    assert iterations == sorted(set(iterations)) and len(rows) >= 2
    for row in rows:
        assert float(row["max_weight_over_mean"]) >= 1.0
        assert 0.0 < float(row["effective_sample_size"]) <= 1.0
    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    logged = [e.value for e in events.Scalars(f"{group}/max_weight_over_mean")]
    assert logged == pytest.approx([float(r["max_weight_over_mean"]) for r in rows], rel=1e-6)


def test_interrupted_run_resumes_to_the_same_rows(tmp_path, monkeypatch):
    argv = TINY + ["--epochs", "3", "--losses", "ice,ntxent"]
    assert run.main(argv + ["--out", str(tmp_path / "straight")]) == 0

    epoch_two_steps = {"n": 0}
    original = training.BenchmarkTrainer.forward_and_backward

    def killed_during_epoch_two(self):
        if self.epoch == 2:
            epoch_two_steps["n"] += 1
            if epoch_two_steps["n"] > 3:  # after 3 of its 5 iterations
                raise KeyboardInterrupt("simulated kill")
        original(self)

    monkeypatch.setattr(training.BenchmarkTrainer, "forward_and_backward", killed_during_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        run.main(argv + ["--out", str(tmp_path / "resumed")])
    partial = read_rows(tmp_path / "resumed" / "results.csv")
    assert [(r["loss"], r["epoch"]) for r in partial] == [("ice", "0"), ("ice", "1")]

    monkeypatch.setattr(training.BenchmarkTrainer, "forward_and_backward", original)
    assert run.main(argv + ["--out", str(tmp_path / "resumed")]) == 0
    straight = (tmp_path / "straight" / "results.csv").read_text()
    assert (tmp_path / "resumed" / "results.csv").read_text() == straight

    # A third invocation trains nothing and rewrites the same rows.
    checkpoint = tmp_path / "resumed" / "runs" / "ice" / "seed0" / "checkpoint.pth"
    before = checkpoint.stat().st_mtime_ns
    assert run.main(argv + ["--out", str(tmp_path / "resumed")]) == 0
    assert checkpoint.stat().st_mtime_ns == before
    assert (tmp_path / "resumed" / "results.csv").read_text() == straight


def test_more_epochs_extend_finished_runs(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    argv = TINY + ["--losses", "ice,ntxent", "--out", out]
    assert run.main(argv + ["--epochs", "1"]) == 0
    original = training.BenchmarkTrainer.forward_and_backward

    def killed_in_ntxent(self):
        if self.loss_label == "ntxent":
            raise KeyboardInterrupt("simulated kill")
        original(self)

    # Killed once ice has its epoch 2: results.csv still holds ntxent's earlier rows.
    monkeypatch.setattr(training.BenchmarkTrainer, "forward_and_backward", killed_in_ntxent)
    with pytest.raises(KeyboardInterrupt):
        run.main(argv)
    rows = read_rows(Path(out) / "results.csv")
    assert [(r["loss"], r["epoch"]) for r in rows] == [("ice", "0"), ("ice", "1"), ("ice", "2"), ("ntxent", "0"), ("ntxent", "1")]
    monkeypatch.setattr(training.BenchmarkTrainer, "forward_and_backward", original)
    assert run.main(argv) == 0
    rows = read_rows(Path(out) / "results.csv")
    assert [(r["loss"], r["epoch"]) for r in rows] == [(loss, str(e)) for loss in ("ice", "ntxent") for e in (0, 1, 2)]


def test_non_finite_loss_stops_only_that_run(tmp_path, capsys):
    out = tmp_path / "out"
    assert run.main(TINY + ["--losses", "ntxent:temperature=0.0,ice", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "loss 'ntxent:temperature=0' is nan at epoch 1, iteration 0" in printed
    summary = (out / "summary.md").read_text()
    assert "loss 'ntxent:temperature=0' is nan at epoch 1, iteration 0" in summary
    # Its epoch-0 row is no result: the table and plots leave the failed run out.
    assert "| `ice` | 1 |" in summary and "| `ntxent:temperature=0`" not in summary
    assert "| `ntxent:temperature=0`" not in printed
    rows = read_rows(out / "results.csv")
    assert [(r["loss"], r["epoch"]) for r in rows] == [
        ("ntxent:temperature=0", "0"), ("ice", "0"), ("ice", "1"), ("ice", "2")
    ]
    # The failure is remembered: a rerun does not retry it.
    assert run.main(TINY + ["--losses", "ntxent:temperature=0.0,ice", "--out", str(out)]) == 0
    assert "failed before: ntxent:temperature=0 seed 0" in capsys.readouterr().out


def test_same_seed_reproduces_the_run(tmp_path):
    for name in ("a", "b"):
        assert run.main(TINY + ["--losses", "multisimilarity", "--out", str(tmp_path / name)]) == 0
    assert (tmp_path / "a" / "results.csv").read_text() == (tmp_path / "b" / "results.csv").read_text()


def test_two_processes_with_torchrun(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "benchmarks.run", *TINY, "--epochs", "1", "--losses", "ice,proxyanchor", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # torchrun and both workers
        process.communicate()
        raise
    assert process.returncode == 0, stderr[-3000:]
    rows = read_rows(out / "results.csv")
    assert [(r["loss"], r["epoch"]) for r in rows] == [("ice", "0"), ("ice", "1"), ("proxyanchor", "0"), ("proxyanchor", "1")]
    assert stdout.count("| `ice` | 1 |") == 1  # only rank 0 reports
    assert '"processes": 2' in (out / "config.json").read_text()
