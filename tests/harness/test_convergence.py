"""The convergence rule: early stopping, the warm-up before it, and what counts as stopped by the cap."""

import csv

import torch

from benchmarks import run
from benchmarks.core.query_scores import KeepEmbeddingsTester
from benchmarks.core.convergence import stopped_by_cap, warming_up

VAL = "val_mean_average_precision_at_r"


def rows(*values):
    """One run's rows: epoch 0 (untrained) first."""
    return [{"epoch": epoch, VAL: value} for epoch, value in enumerate(values)]


def test_a_run_warms_up_until_a_trained_epoch_beats_the_untrained_model():
    assert warming_up(rows(0.07))
    assert warming_up(rows(0.07, 0.03, 0.05, 0.07))  # a tie does not beat it
    assert not warming_up(rows(0.07, 0.03, 0.08))
    assert not warming_up(rows(0.07, 0.08, 0.02))  # once beaten, the warm-up is over


def test_stopped_by_the_cap():
    assert not stopped_by_cap(rows(0.1, 0.2, 0.3), epochs=4, patience=1)  # ended before the cap
    assert stopped_by_cap(rows(0.1, 0.2, 0.3, 0.4), epochs=3, patience=1)  # still improving
    assert not stopped_by_cap(rows(0.1, 0.4, 0.3, 0.3), epochs=3, patience=1)  # the patience rule stopped it
    assert stopped_by_cap(rows(0.1, 0.4, 0.3, 0.3), epochs=3, patience=None)  # a fixed budget
    assert stopped_by_cap(rows(0.4, 0.1, 0.2, 0.3), epochs=3, patience=1)  # never left its warm-up


def script_validation_map(monkeypatch, values):
    """Every validation evaluation scores ``values(epoch)`` MAP@R, for PML's hooks and the rows alike."""
    real = KeepEmbeddingsTester.do_knn_and_accuracies

    def scripted(self, accuracies, embeddings_and_labels, query_split_name, reference_split_names):
        real(self, accuracies, embeddings_and_labels, query_split_name, reference_split_names)
        if query_split_name == "val":
            accuracies[self.accuracies_keyname("mean_average_precision_at_r")] = values(accuracies["epoch"])

    monkeypatch.setattr(KeepEmbeddingsTester, "do_knn_and_accuracies", scripted)


def train_digits(out, epochs, patience):
    argv = ["--dataset", "digits", "--limit-per-class", "20", "--batch-size", "16", "--m-per-class", "4",
            "--seeds", "1", "--losses", "ntxent", "--epochs", str(epochs), "--patience", str(patience),
            "--lr", "0.001", "--lr-decay", "0.5", "--lr-patience", "0", "--out", str(out)]
    assert run.main(argv) == 0
    with open(out / "results.csv", newline="") as f:
        epochs_run = [int(r["epoch"]) for r in csv.DictReader(f)]
    checkpoint = torch.load(out / "runs" / "ntxent" / "seed0" / "checkpoint.pth", weights_only=True)
    lrs = {group["lr"] for o in checkpoint["optimizers"].values() for group in o["param_groups"]}
    return epochs_run, lrs, (out / "summary.md").read_text()


def test_a_run_still_warming_up_neither_stops_nor_decays_its_learning_rate(tmp_path, monkeypatch):
    """Every trained epoch scores below the untrained model: patience 0 and --lr-patience 0
    would stop and decay after the first epoch, but the run trains to its cap at its learning
    rate, and the cap line counts it."""
    script_validation_map(monkeypatch, lambda epoch: 0.5 if epoch == 0 else 0.1)
    epochs_run, lrs, summary = train_digits(tmp_path / "warm", epochs=3, patience=0)
    assert epochs_run == [0, 1, 2, 3] and lrs == {0.001}
    assert "runs stopped by the epoch cap: 1 of 1" in summary


def test_once_the_warm_up_is_over_the_patience_and_the_decay_apply(tmp_path, monkeypatch):
    """Epoch 3 is the first to beat the untrained model and the best: patience 1 stops the run
    at epoch 5, and --lr-patience 0 halves the learning rate after epochs 4 and 5 only (not
    after epoch 2, which did not improve on epoch 1)."""
    script_validation_map(monkeypatch, lambda epoch: {0: 0.5, 1: 0.1, 2: 0.1, 3: 0.9}.get(epoch, 0.2))
    epochs_run, lrs, summary = train_digits(tmp_path / "plateau", epochs=8, patience=1)
    assert epochs_run == [0, 1, 2, 3, 4, 5] and lrs == {0.00025}
    assert "runs stopped by the epoch cap: 0 of 1" in summary
