"""End-to-end runs of the harness on digits: smoke, resume, non-finite loss, two processes."""

import csv
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import run
from benchmarks.core import training
from benchmarks.storage.files import BrokenFile, read_torch
from benchmarks.core.run_store import RunStore
from benchmarks.core.metrics import METRICS
from benchmarks.core.query_scores import KeepEmbeddingsTester
from torchrun import run_two_processes

REPO = Path(__file__).resolve().parents[2]
TINY = ["--dataset", "digits", "--epochs", "2", "--seeds", "1", "--limit-per-class", "40", "--batch-size", "32", "--m-per-class", "8", "--patience", "-1"]

TINY_ONE_EPOCH = ["--dataset", "digits", "--epochs", "1", "--seeds", "1", "--limit-per-class", "20", "--batch-size", "16",
                  "--m-per-class", "4", "--patience", "-1"]


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
            assert 0.0 <= float(row["val_" + metric]) <= 1.0
    for loss in ("ice", "triplet", "proxyanchor"):  # test metrics: the untrained model and the best epoch alone
        run_rows = [r for r in rows if r["loss"] == loss]
        best = max(run_rows, key=lambda r: (float(r["val_mean_average_precision_at_r"]), -int(r["epoch"])))
        for row in run_rows:
            tested = row["epoch"] in ("0", best["epoch"])
            for metric in METRICS:
                assert 0.0 <= float(row[metric]) <= 1.0 if tested else row[metric] == ""
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


@pytest.mark.slow
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


@pytest.mark.slow
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
    assert run.main(TINY + ["--losses", "ntxent:temperature=1e-38,ice", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "loss 'ntxent:temperature=1e-38' is inf at epoch 1, iteration 0" in printed
    summary = (out / "summary.md").read_text()
    assert "loss 'ntxent:temperature=1e-38' is inf at epoch 1, iteration 0" in summary
    # Its epoch-0 row is no result: the table and plots leave the failed run out.
    assert "| `ice` | 1 |" in summary and "| `ntxent:temperature=1e-38`" not in summary
    assert "| `ntxent:temperature=1e-38`" not in printed
    rows = read_rows(out / "results.csv")
    assert [(r["loss"], r["epoch"]) for r in rows] == [
        ("ntxent:temperature=1e-38", "0"), ("ice", "0"), ("ice", "1"), ("ice", "2")
    ]
    # The failure is remembered: a rerun does not retry it.
    assert run.main(TINY + ["--losses", "ntxent:temperature=1e-38,ice", "--out", str(out)]) == 0
    assert "failed before: ntxent:temperature=1e-38 seed 0" in capsys.readouterr().out


def test_same_seed_reproduces_the_run(tmp_path):
    for name in ("a", "b"):
        assert run.main(TINY + ["--losses", "multisimilarity", "--out", str(tmp_path / name)]) == 0
    assert (tmp_path / "a" / "results.csv").read_text() == (tmp_path / "b" / "results.csv").read_text()


def test_evaluations_never_change_what_is_trained(tmp_path, monkeypatch):
    assert run.main(TINY + ["--losses", "ice", "--out", str(tmp_path / "plain")]) == 0
    test = KeepEmbeddingsTester.test

    def test_drawing_random_numbers(self, *args, **kwargs):
        torch.rand(1000), np.random.rand(10)
        return test(self, *args, **kwargs)

    monkeypatch.setattr(KeepEmbeddingsTester, "test", test_drawing_random_numbers)
    assert run.main(TINY + ["--losses", "ice", "--out", str(tmp_path / "drawing")]) == 0
    assert (tmp_path / "plain" / "results.csv").read_text() == (tmp_path / "drawing" / "results.csv").read_text()


def test_a_run_killed_before_its_final_test_resumes_with_it_and_trains_nothing(tmp_path, monkeypatch):
    out = tmp_path / "out"
    test_at_best = training.Run.evaluate_test_at_best_epoch

    def killed(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(training.Run, "evaluate_test_at_best_epoch", killed)
    with pytest.raises(KeyboardInterrupt):
        run.main(TINY + ["--losses", "ice", "--out", str(out)])
    checkpoint = out / "runs" / "ice" / "seed0" / "checkpoint.pth"
    assert RunStore(checkpoint.parent).load(2).status == "partial"
    monkeypatch.setattr(training.Run, "evaluate_test_at_best_epoch", test_at_best)
    trainer = training.Run.trainer
    monkeypatch.setattr(training.Run, "trainer", lambda self: pytest.fail("trained again"))
    assert run.main(TINY + ["--losses", "ice", "--out", str(out)]) == 0
    assert RunStore(checkpoint.parent).load(2).status == "finished"
    monkeypatch.setattr(training.Run, "trainer", trainer)
    assert run.main(TINY + ["--losses", "ice", "--out", str(tmp_path / "straight")]) == 0
    assert (out / "results.csv").read_text() == (tmp_path / "straight" / "results.csv").read_text()


@pytest.mark.slow
def test_a_run_extended_by_more_epochs_is_tested_at_its_new_best_epoch_alone(tmp_path):
    out, straight = tmp_path / "out", tmp_path / "straight"
    assert run.main(TINY + ["--epochs", "1", "--losses", "ice", "--out", str(out)]) == 0
    assert run.main(TINY + ["--losses", "ice", "--out", str(out)]) == 0  # TINY trains 2 epochs
    assert run.main(TINY + ["--losses", "ice", "--out", str(straight)]) == 0
    assert (out / "results.csv").read_text() == (straight / "results.csv").read_text()


@pytest.mark.slow
def test_seeds_added_to_an_out_folder_join_the_earlier_ones(tmp_path):
    out = tmp_path / "out"
    assert run.main(TINY_ONE_EPOCH + ["--losses", "ice", "--out", str(out)]) == 0
    first = out / "runs" / "ice" / "seed0" / "checkpoint.pth"
    trained = first.stat().st_mtime_ns
    assert run.main(TINY_ONE_EPOCH + ["--losses", "ice", "--seeds", "1,2", "--out", str(out)]) == 0
    assert first.stat().st_mtime_ns == trained  # seed 0 is not trained again
    assert sorted({(r["seed"]) for r in read_rows(out / "results.csv")}) == ["0", "1", "2"]
    assert "| `ice` | 3 |" in (out / "summary.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("caching", [[], ["--cache-chunk", "8"]], ids=["uncached", "cached"])
def test_two_processes_with_torchrun(tmp_path, caching):
    """ICE sharded exactly, ProxyAnchor through PML's wrapper; with caching, DDP synchronises
    once per step."""
    out = tmp_path / "out"
    stdout = run_two_processes(["-m", "benchmarks.run", *TINY, "--epochs", "1", "--losses", "ice,proxyanchor",
                                *caching, "--out", str(out)])
    rows = read_rows(out / "results.csv")
    assert [(r["loss"], r["epoch"]) for r in rows] == [("ice", "0"), ("ice", "1"), ("proxyanchor", "0"), ("proxyanchor", "1")]
    assert stdout.count("| `ice` | 1 |") == 1  # only rank 0 reports
    assert '"processes": 2' in (out / "config.json").read_text()


# Hostile-user probes: each once gave lost rows, a traceback or a silent wrong run.


def run_rows(path):
    with open(path, newline="") as f:
        return [(r["loss"], r["seed"], r["epoch"]) for r in csv.DictReader(f)]


def test_later_command_with_other_losses_keeps_earlier_rows(tmp_path):
    out = str(tmp_path / "out")
    assert run.main(TINY_ONE_EPOCH + ["--losses", "ice", "--out", out]) == 0
    assert run.main(TINY_ONE_EPOCH + ["--losses", "ntxent", "--seeds", "1", "--out", out]) == 0
    assert run_rows(Path(out) / "results.csv") == [
        ("ntxent", "0", "0"), ("ntxent", "0", "1"), ("ice", "0", "0"), ("ice", "0", "1")]
    summary = (Path(out) / "summary.md").read_text()
    assert "| `ice` | 1 |" in summary and "| `ntxent` | 1 |" in summary


@pytest.mark.slow
def test_two_commands_at_once_on_one_out_keep_both_sets_of_rows(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    processes = [
        subprocess.Popen([sys.executable, "-m", "benchmarks.run", *TINY_ONE_EPOCH, "--losses", losses, "--out", str(out)],
                         cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for losses in ("ice", "supcon")
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-2000:]
    assert sorted(run_rows(out / "results.csv")) == [
        (loss, "0", epoch) for loss in ("ice", "supcon") for epoch in ("0", "1")]


@pytest.mark.slow
@pytest.mark.parametrize("broken_file, content", [("checkpoint.pth", b"PK\x03\x04trunc"), ("failed.json", b"")])
def test_broken_run_file_restarts_that_run_and_the_others_carry_on(tmp_path, capsys, broken_file, content):
    out = tmp_path / "out"
    argv = TINY_ONE_EPOCH + ["--losses", "ice,triplet", "--out", str(out)]
    assert run.main(argv) == 0
    expected = (out / "results.csv").read_text()
    broken = out / "runs" / "ice" / "seed0" / broken_file
    broken.write_bytes(content)
    capsys.readouterr()
    assert run.main(argv) == 0
    printed = capsys.readouterr().out
    assert f"{broken} cannot be read" in printed and "the run starts again" in printed
    assert broken.with_name(broken_file + ".broken").read_bytes() == content
    assert (out / "results.csv").read_text() == expected  # retrained to the same rows
    assert RunStore(out / "runs" / "triplet" / "seed0").load(1).status == "finished"
    # A broken run of an earlier command (not run now) is only reported, its files stay.
    broken.write_bytes(content)
    assert run.main(TINY_ONE_EPOCH + ["--losses", "triplet", "--out", str(out)]) == 0
    assert f"earlier run: {broken} cannot be read" in capsys.readouterr().out
    assert f"{broken} cannot be read" in (out / "summary.md").read_text()
    assert broken.read_bytes() == content


def test_broken_feature_cache_is_computed_again(tmp_path, capsys):
    out = tmp_path / "out"
    argv = TINY_ONE_EPOCH + ["--freeze-trunk", "--losses", "ice", "--out", str(out)]
    assert run.main(argv) == 0
    expected = (out / "results.csv").read_text()
    cache = out / "cache" / "trunk_features.pt"
    cache.write_bytes(b"")
    (out / "runs" / "ice" / "seed0" / "checkpoint.pth").unlink()
    capsys.readouterr()
    assert run.main(argv) == 0
    assert f"{cache} cannot be read" in capsys.readouterr().out
    assert (out / "results.csv").read_text() == expected


@pytest.mark.parametrize("content, message", [
    ('{"dataset": "dig', "config.json cannot be read"),
    ('{"epochs": "two"}', "config.json: 'epochs' must be a count of epochs"),
])
def test_broken_config_json_names_the_file_and_what_to_do(tmp_path, capsys, content, message):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text(content)
    assert run.main(TINY_ONE_EPOCH + ["--losses", "ice", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert f"{out}/{message}" in error and ("delete it" in error or "restore the file" in error)
    assert "Traceback" not in error


def test_output_files_respect_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        assert run.main(TINY_ONE_EPOCH + ["--epochs", "0", "--losses", "ice", "--out", str(tmp_path / "out")]) == 0
    finally:
        os.umask(previous)
    for name in ("results.csv", "summary.md", "config.json", "runs/ice/seed0/checkpoint.pth"):
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == 0o644, name


@pytest.mark.slow
def test_record_keeper_logs_hold_each_epoch_once_after_a_resume(tmp_path, monkeypatch):
    """Killed after PML's hook logged epoch 2 but before its checkpoint was written."""
    out = tmp_path / "out"
    argv = TINY_ONE_EPOCH + ["--epochs", "3", "--losses", "ice", "--out", str(out)]
    original = RunStore.save_checkpoint

    def killed_at_epoch_two(self, state):
        if state["epoch"] == 2:
            raise KeyboardInterrupt("simulated kill")
        original(self, state)

    monkeypatch.setattr(RunStore, "save_checkpoint", killed_at_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        run.main(argv)
    monkeypatch.setattr(RunStore, "save_checkpoint", original)
    assert run.main(argv) == 0
    logs = out / "runs" / "ice" / "seed0" / "logs"
    rows = read_rows(out / "results.csv")
    best = max(rows, key=lambda r: (float(r["val_mean_average_precision_at_r"]), -int(r["epoch"])))["epoch"]
    tested = sorted({"0", best})  # the test split: the untrained model and the best validation epoch
    for split, epochs in (("TEST", tested), ("VAL", ["0", "1", "2", "3"])):
        (accuracies,) = logs.glob(f"accuracies_*_{split}_vs_self.csv")
        with open(accuracies, newline="") as f:
            assert [row["epoch"] for row in csv.DictReader(f)] == epochs
    with open(logs / "loss_histories.csv", newline="") as f:
        iterations = [row["~iteration~"] for row in csv.DictReader(f)]
    assert len(iterations) == len(set(iterations))
    for path in logs.glob("*.csv"):  # one line ending per file, record-keeper's
        text = path.read_bytes()
        assert text.count(b"\n") == text.count(b"\r\n"), path.name
    with sqlite3.connect(logs / "logs.db") as db:
        table = next(name for (name,) in db.execute("SELECT name FROM sqlite_master") if name.endswith("VAL_vs_self"))
        assert [e for (e,) in db.execute(f'SELECT epoch FROM "{table}" ORDER BY id')] == [0, 1, 2, 3]


class _Payload:
    """A pickle that writes a marker file when loaded with weights_only=False."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


def test_a_planted_checkpoint_never_runs_its_code(tmp_path, capsys):
    out, marker = tmp_path / "out", tmp_path / "marker"
    planted = out / "runs" / "zzz" / "seed7" / "checkpoint.pth"
    planted.parent.mkdir(parents=True)
    torch.save({"rows": [], "payload": _Payload(marker)}, planted)
    assert run.main(TINY_ONE_EPOCH + ["--losses", "ice", "--out", str(out)]) == 0
    assert not marker.exists()
    assert f"{planted} cannot be read as tensors and plain values" in capsys.readouterr().out


def test_a_planted_feature_cache_never_runs_its_code(tmp_path):
    marker, cache = tmp_path / "marker", tmp_path / "trunk_features.pt"
    torch.save({"train": _Payload(marker)}, cache)
    with pytest.raises(BrokenFile, match="cannot be read as tensors and plain values"):
        read_torch(cache)
    assert not marker.exists()


def test_a_lock_file_that_is_a_link_is_refused_and_its_target_untouched(tmp_path, capsys):
    out, victim = tmp_path / "out", tmp_path / "victim"
    victim.write_text("precious\n")
    out.mkdir()
    (out / ".lock").symlink_to(victim)
    assert run.main(TINY_ONE_EPOCH + ["--losses", "ice", "--out", str(out)]) == 2
    assert f"{out / '.lock'} is a symbolic link" in capsys.readouterr().err
    assert victim.read_text() == "precious\n"


@pytest.mark.slow
@pytest.mark.parametrize("change, difference", [
    (["--epochs", "1", "--seeds", "2"], "epochs: 2 there, 1 now"),
    (["--patience", "3"], "patience: None there, 3 now"),
    (["--num-workers", "2"], "num_workers: 0 there, 2 now"),
    ("threads", "torch_threads: "),
])
def test_settings_that_change_the_numbers_identify_the_folder(tmp_path, capsys, change, difference):
    # one run at a time: its thread count is then torch's (--jobs auto would give each run one)
    argv = TINY + ["--losses", "ice", "--jobs", "1", "--out", str(tmp_path)]
    assert run.main(argv) == 0
    capsys.readouterr()
    threads = torch.get_num_threads()
    try:
        if change == "threads":
            torch.set_num_threads(threads + 1)
            change = []
        assert run.main(argv + change) == 2
    finally:
        torch.set_num_threads(threads)
    assert difference in capsys.readouterr().err


def test_a_folder_older_than_a_setting_opens_and_records_it(tmp_path):
    argv = TINY + ["--epochs", "0", "--losses", "ice", "--out", str(tmp_path)]
    assert run.main(argv) == 0
    config = json.loads((tmp_path / "config.json").read_text())
    older = {k: v for k, v in config.items() if k not in ("epochs", "patience", "num_workers", "torch_threads")}
    (tmp_path / "config.json").write_text(json.dumps(older))
    assert run.main(argv) == 0
    assert json.loads((tmp_path / "config.json").read_text()) == config


def refuse_writes(monkeypatch, code):
    """Every new file fails with ``code`` (as root, chmod cannot make a folder read-only)."""
    import errno
    import tempfile
    from benchmarks.core import out_folder

    def no_new_file(*args, **kwargs):
        raise OSError(code, os.strerror(code), kwargs.get("dir") or (args[0] if args else None))

    real_open = os.open
    monkeypatch.setattr(tempfile, "mkstemp", no_new_file)
    monkeypatch.setattr(out_folder.os, "open", lambda path, flags, *a: no_new_file(path) if flags & os.O_CREAT
                        else real_open(path, flags, *a))
    return errno


def file_bytes(folder):
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def finished_folder_refusing_writes(tmp_path, monkeypatch, capsys, error):
    """A finished one-run folder, its files' bytes, and every later write refused with ``error``."""
    argv = TINY + ["--epochs", "1", "--losses", "ice", "--out", str(tmp_path)]
    assert run.main(argv) == 0
    before = file_bytes(tmp_path)
    capsys.readouterr()
    refuse_writes(monkeypatch, error)
    return argv, before


def test_a_finished_read_only_folder_prints_its_table(tmp_path, monkeypatch, capsys):
    argv, before = finished_folder_refusing_writes(tmp_path, monkeypatch, capsys, 30)  # EROFS
    assert run.main(argv) == 0
    out = capsys.readouterr().out
    assert "Test metrics (%)" in out and "cannot be written: nothing was updated there" in out
    assert file_bytes(tmp_path) == before


def test_a_full_disk_stops_with_one_line_and_keeps_the_files(tmp_path, monkeypatch, capsys):
    argv, before = finished_folder_refusing_writes(tmp_path, monkeypatch, capsys, 28)  # ENOSPC
    assert run.main(argv[:-2] + ["--losses", "ice,ntxent", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device; the files written before are intact" in err[0], err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p in before} == before


@pytest.mark.slow
def test_an_earlier_run_left_behind_by_more_epochs_is_named(tmp_path, capsys):
    argv = TINY + ["--out", str(tmp_path)]
    assert run.main(argv + ["--epochs", "1", "--losses", "ice,ntxent"]) == 0
    capsys.readouterr()
    assert run.main(argv + ["--losses", "ice"]) == 0
    assert "earlier run ntxent seed 0: trained 1 of 2 epochs, published as it is; add it to --losses" in capsys.readouterr().out


@pytest.mark.slow
def test_runs_trained_side_by_side_give_the_bytes_of_runs_trained_in_turn(tmp_path, capsys):
    argv = TINY + ["--losses", "ice,ntxent", "--seeds", "2"]
    assert run.main(argv + ["--jobs", "1", "--out", str(tmp_path / "in_turn")]) == 0
    assert run.main(argv + ["--jobs", "2", "--out", str(tmp_path / "side_by_side")]) == 0
    in_turn, side_by_side = ((tmp_path / name / "results.csv").read_text() for name in ("in_turn", "side_by_side"))
    assert side_by_side == in_turn and len(side_by_side.splitlines()) == 1 + 4 * 3
    assert json.loads((tmp_path / "side_by_side" / "config.json").read_text())["torch_threads"] == 1
    assert "ntxent seed 1: best epoch" in capsys.readouterr().out
