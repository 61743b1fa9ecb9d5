"""Hostile-user probes of the harness (issue 8): each once gave lost rows, a traceback or a
silent wrong run. Later changes must not bring any of them back."""

import csv
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import run
from benchmarks.core import settings
from benchmarks.core.files import BrokenFile, read_torch
from benchmarks.core.run_store import RunStore

REPO = Path(__file__).resolve().parents[2]
TINY = ["--dataset", "digits", "--epochs", "1", "--seeds", "1", "--limit-per-class", "20", "--batch-size", "16", "--m-per-class", "4",
        "--patience", "-1"]


def run_rows(path):
    with open(path, newline="") as f:
        return [(r["loss"], r["seed"], r["epoch"]) for r in csv.DictReader(f)]


def write_config(tmp_path, text):
    config = tmp_path / "bench.toml"
    config.write_text(text + "\n")
    return ["--config", str(config)]


def test_later_command_with_other_losses_keeps_earlier_rows(tmp_path):
    out = str(tmp_path / "out")
    assert run.main(TINY + ["--losses", "ice", "--out", out]) == 0
    assert run.main(TINY + ["--losses", "ntxent", "--seeds", "1", "--out", out]) == 0
    assert run_rows(Path(out) / "results.csv") == [
        ("ntxent", "0", "0"), ("ntxent", "0", "1"), ("ice", "0", "0"), ("ice", "0", "1")]
    summary = (Path(out) / "summary.md").read_text()
    assert "| `ice` | 1 |" in summary and "| `ntxent` | 1 |" in summary


def test_two_commands_at_once_on_one_out_keep_both_sets_of_rows(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    processes = [
        subprocess.Popen([sys.executable, "-m", "benchmarks.run", *TINY, "--losses", losses, "--out", str(out)],
                         cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for losses in ("ice", "supcon")
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-2000:]
    assert sorted(run_rows(out / "results.csv")) == [
        (loss, "0", epoch) for loss in ("ice", "supcon") for epoch in ("0", "1")]


@pytest.mark.parametrize("broken_file, content", [("checkpoint.pth", b"PK\x03\x04trunc"), ("failed.json", b"")])
def test_broken_run_file_restarts_that_run_and_the_others_carry_on(tmp_path, capsys, broken_file, content):
    out = tmp_path / "out"
    argv = TINY + ["--losses", "ice,triplet", "--out", str(out)]
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
    assert run.main(TINY + ["--losses", "triplet", "--out", str(out)]) == 0
    assert f"earlier run: {broken} cannot be read" in capsys.readouterr().out
    assert broken.read_bytes() == content


def test_broken_feature_cache_is_computed_again(tmp_path, capsys):
    out = tmp_path / "out"
    argv = TINY + ["--freeze-trunk", "--losses", "ice", "--out", str(out)]
    assert run.main(argv) == 0
    expected = (out / "results.csv").read_text()
    cache = out / "cache" / "trunk_features.pt"
    cache.write_bytes(b"")
    (out / "runs" / "ice" / "seed0" / "checkpoint.pth").unlink()
    capsys.readouterr()
    assert run.main(argv) == 0
    assert f"{cache} cannot be read" in capsys.readouterr().out
    assert (out / "results.csv").read_text() == expected


def test_broken_config_json_names_the_file_and_what_to_do(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text('{"dataset": "dig')
    assert run.main(TINY + ["--losses", "ice", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert f"{out / 'config.json'} cannot be read" in error and "delete it" in error
    assert "Traceback" not in error


def test_output_files_respect_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        assert run.main(TINY + ["--epochs", "0", "--losses", "ice", "--out", str(tmp_path / "out")]) == 0
    finally:
        os.umask(previous)
    for name in ("results.csv", "summary.md", "config.json", "runs/ice/seed0/checkpoint.pth"):
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == 0o644, name


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--m-per-class", "1", "--batch-size", "16"], "--m-per-class must be an integer >= 2"),
        (["--device", "foo"], "--device must be cpu, cuda, cuda:N or auto, got 'foo'"),
        (["--verbose", "--quiet"], "--verbose and --quiet exclude each other"),
        (["--model", "resnet18"], "model 'resnet18' takes RGB images, dataset 'digits' has 1 channel(s)"),
    ],
)
def test_bad_option_values_are_refused(capsys, tmp_path, argv, message):
    assert run.main(["--dataset", "digits"] + argv + ["--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
    assert not (tmp_path / "out").exists()


def test_out_naming_an_existing_file_is_refused(capsys, tmp_path):
    existing = tmp_path / "results.txt"
    existing.write_text("keep me")
    assert run.main(["--out", str(existing)]) == 2
    assert f"--out {existing} is a file, not a folder" in capsys.readouterr().err
    assert existing.read_text() == "keep me"


@pytest.mark.parametrize(
    "line, message",
    [
        ("losses = 5", "--losses must be text such as 'ice,ntxent:temperature=0.05' or a list of such texts, got 5"),
        ("out = 5", "--out must be a path (text), got 5"),
        ("data-root = [1]", "--data-root must be a path (text), got [1]"),
        ("epochs = {a = 1}", "--epochs must be an integer >= 0, got {'a': 1}"),
        ("seeds = true", "--seeds must be an integer >= 1, got True"),
        ('no-pretrained = "no"', "'no-pretrained' must be true or false, got 'no'"),
        ('device = "foo"', "--device must be cpu, cuda, cuda:N or auto"),
        ('amp = "fp8"', "--amp must be one of bf16, fp16, got 'fp8'"),
    ],
)
def test_config_values_of_the_wrong_type(tmp_path, line, message):
    with pytest.raises(settings.UsageError) as error:
        settings.resolve(write_config(tmp_path, line))
    assert message in str(error.value)


def test_no_pretrained_in_a_config_file(tmp_path):
    assert settings.resolve(write_config(tmp_path, "no-pretrained = true")).pretrained is False
    assert settings.resolve(write_config(tmp_path, "no-pretrained = false")).pretrained is True


def test_record_keeper_logs_hold_each_epoch_once_after_a_resume(tmp_path, monkeypatch):
    """Killed after PML's hook logged epoch 2 but before its checkpoint was written."""
    out = tmp_path / "out"
    argv = TINY + ["--epochs", "3", "--losses", "ice", "--out", str(out)]
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
    for split in ("TEST", "VAL"):
        (accuracies,) = logs.glob(f"accuracies_*_{split}_vs_self.csv")
        with open(accuracies, newline="") as f:
            assert [row["epoch"] for row in csv.DictReader(f)] == ["0", "1", "2", "3"]
    with open(logs / "loss_histories.csv", newline="") as f:
        iterations = [row["~iteration~"] for row in csv.DictReader(f)]
    assert len(iterations) == len(set(iterations))
    with sqlite3.connect(logs / "logs.db") as db:
        table = next(name for (name,) in db.execute("SELECT name FROM sqlite_master") if name.endswith("TEST_vs_self"))
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
    assert run.main(TINY + ["--losses", "ice", "--out", str(out)]) == 0
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
    assert run.main(TINY + ["--losses", "ice", "--out", str(out)]) == 2
    assert f"{out / '.lock'} is a symbolic link" in capsys.readouterr().err
    assert victim.read_text() == "precious\n"
