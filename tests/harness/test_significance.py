"""Per-query scores against PML's AccuracyCalculator, paired tests on known cases, and
the comparison table of a real (tiny) benchmark run."""

import csv
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from benchmarks import run
from benchmarks.storage.files import BrokenFile
from benchmarks.core import query_scores
from benchmarks.report import paired_tests, tables
from benchmarks.report.comparisons import Comparison
from benchmarks.report.seed_paired import seed_paired_difference


def test_per_query_means_equal_pml_accuracy_calculator():
    generator = torch.Generator().manual_seed(0)
    labels = torch.cat([torch.arange(7).repeat_interleave(torch.arange(2, 9)), torch.tensor([7])])  # sizes 2..8, one lone
    embeddings = torch.randn(len(labels), 6, generator=generator)
    scores = query_scores.per_query_scores(embeddings, labels)
    expected = AccuracyCalculator(k="max_bin_count", include=query_scores.QUERY_METRICS).get_accuracy(embeddings, labels)
    assert len(scores["labels"]) == len(labels) - 1  # the lone query is left out, as PML does
    for metric in query_scores.QUERY_METRICS:
        assert scores[metric].mean() == pytest.approx(expected[metric], abs=1e-12)
    assert set(np.unique(scores["precision_at_1"])) <= {0.0, 1.0}


def test_per_query_scores_need_a_class_with_two_images():
    with pytest.raises(ValueError, match="no query has another image of its class"):
        query_scores.per_query_scores(torch.randn(3, 2), torch.tensor([0, 1, 2]))


def synthetic(seeds=3, queries=400, seed=0):
    return np.random.default_rng(seed).uniform(size=(seeds, queries))


def both(a, b):
    return Comparison(seed_paired_difference(a, b), paired_tests.paired_difference(a, b))


def test_identical_scores_show_no_difference():
    a = synthetic()
    d = paired_tests.paired_difference(a, a.copy())
    assert (d.mean, d.ci_low, d.ci_high, d.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert not d.significant
    assert tables.verdict("A", "B", both(a, a.copy())).startswith("no detectable difference between A and B")


def test_noisy_copy_with_zero_mean_shift_is_not_significant():
    a = synthetic()
    noise = np.random.default_rng(1).normal(0, 0.05, size=a.shape)
    d = paired_tests.paired_difference(a + noise - noise.mean(), a)
    assert d.ci_low < 0 < d.ci_high and d.p_value > 0.05 and not d.significant


def test_shifted_copy_is_significant_in_the_right_direction():
    a = synthetic()
    noise = np.random.default_rng(1).normal(0, 0.05, size=a.shape)
    d = paired_tests.paired_difference(a + noise + 0.02, a)
    assert d.ci_low < 0.02 + noise.mean() < d.ci_high and d.ci_low > 0
    assert d.p_value < 1e-6 and d.significant
    forward, reverse = both(a + noise + 0.02, a), both(a, a + noise + 0.02)
    assert tables.verdict("A", "B", forward).startswith("A is better than B (ΔMAP@R +")
    assert tables.verdict("A", "B", reverse).startswith("B is better than A (ΔMAP@R +")
    assert tables.verdict("A", "B", reverse).replace("B is better than A", "") == \
        tables.verdict("A", "B", forward).replace("A is better than B", "")


def test_a_verdict_without_a_detectable_difference_names_what_the_seeds_could_detect():
    a = synthetic()
    noise = np.random.default_rng(1).normal(0, 0.05, size=a.shape)
    comparison = both(a + noise - noise.mean(), a)
    assert tables.verdict("A", "B", comparison).endswith(
        f"; 3 seeds detect {100 * comparison.seeds.detectable:.1f} points with 80 % power)")


def test_one_seed_is_not_tested():
    a = synthetic(seeds=1)
    comparison = Comparison(None, paired_tests.paired_difference(a + 0.1, a))
    assert tables.verdict("A", "B", comparison) == "A and B: not tested: fewer than 2 seeds in common"
    assert tables.difference_text(comparison) == "not tested: fewer than 2 seeds in common"


def test_paired_inputs_must_match():
    with pytest.raises(ValueError, match="same shape"):
        paired_tests.paired_difference(np.zeros((2, 5)), np.zeros((3, 5)))


def as_runs(matrix, labels):
    return {s: {"labels": labels, "mean_average_precision_at_r": row, "precision_at_1": (row > 0.5).astype(float)}
            for s, row in enumerate(matrix)}


def test_comparison_table_against_ice_and_the_best_loss():
    base = synthetic()
    labels = np.arange(base.shape[1]) % 10
    scores = {"ice": as_runs(base, labels), "tied": as_runs(base.copy(), labels),
              "better": as_runs(np.clip(base + 0.1, 0, 1), labels)}
    text = tables.comparison_table(scores, "ice")
    assert "| `tied` | `ice` (ICE) | 3 | 400 | +0.0 | [+0.0, +0.0] | 1.000 |" in text
    assert "| `ice` | `better` (the best loss) | 3 | 400 |" in text
    assert "Against `ice` (ICE), on test MAP@R: no detectable difference between `tied` and `ice`" in text
    assert "`better` is better than `ice` (ΔMAP@R +" in text
    assert "Against `better` (the best loss), on test MAP@R: `better` is better than `ice`" in text
    scores["other"] = as_runs(base, labels[::-1])
    with pytest.raises(ValueError, match="tested on different queries"):
        tables.comparison_table(scores, "ice")


def test_test_scores_are_those_of_the_evaluation_just_made(tmp_path):
    labels = torch.tensor([0, 0, 1, 1])
    tester = SimpleNamespace(last_embeddings_and_labels={"test": (torch.randn(4, 3), labels[:, None])})
    query_scores.save_test_scores(tmp_path, tester, 3)
    assert int(np.load(tmp_path / query_scores.SCORES_FILE)["epoch"]) == 3
    (tmp_path / query_scores.SCORES_FILE).unlink()
    query_scores.save_test_scores(tmp_path, SimpleNamespace(last_embeddings_and_labels={"val": None}), 0)
    assert not (tmp_path / query_scores.SCORES_FILE).exists()


@pytest.mark.slow
def test_benchmark_run_keeps_scores_and_writes_the_comparison(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--dataset", "digits", "--epochs", "2", "--seeds", "2", "--limit-per-class", "30", "--batch-size", "32", "--m-per-class", "8",
            "--patience", "1", "--out", str(out)]
    assert run.main(argv + ["--losses", "ice"]) == 0
    assert "## Paired comparisons" not in (out / "summary.md").read_text()  # one loss: nothing to compare
    capsys.readouterr()
    # A later command with another loss: the comparison reads every run folder on disk, as the table does.
    assert run.main(argv + ["--losses", "contrastive"]) == 0
    assert "| `contrastive` | `ice` (ICE) | 2 | 150 |" in capsys.readouterr().out
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for loss in ("ice", "contrastive"):
        for seed in (0, 1):
            stored = np.load(out / "runs" / loss / f"seed{seed}" / query_scores.SCORES_FILE)
            run_rows = [r for r in rows if (r["loss"], r["seed"]) == (loss, str(seed))]
            best = max(run_rows, key=lambda r: (float(r["val_mean_average_precision_at_r"]), -int(r["epoch"])))
            assert int(stored["epoch"]) == int(best["epoch"])  # the test split at the best validation epoch
            tested = [r["epoch"] for r in run_rows if r["mean_average_precision_at_r"] != ""]
            assert tested == sorted({"0", best["epoch"]})  # and, besides the untrained model, nowhere else
            row = best
            for metric in query_scores.QUERY_METRICS:  # the stored queries reproduce the harness's test metrics
                assert stored[metric].mean() == pytest.approx(float(row[metric]), abs=1e-6)
    summary = (out / "summary.md").read_text()
    assert "## Paired comparisons" in summary
    assert "| `contrastive` | `ice` (ICE) | 2 | 150 |" in summary
    assert "Against `ice` (ICE), on test MAP@R: " in summary


def write_object_array_scores(path):
    np.savez(path, epoch=1, labels=np.array([0, "a"], dtype=object), mean_average_precision_at_r=np.ones(2),
             precision_at_1=np.ones(2))


@pytest.mark.parametrize("damage", ["truncated", "object array", "no labels", "not a zip"])
def test_test_scores_that_cannot_be_read_are_named(tmp_path, damage):
    path = tmp_path / query_scores.SCORES_FILE
    if damage == "object array":
        write_object_array_scores(path)
    elif damage == "no labels":
        np.savez(path, epoch=1, mean_average_precision_at_r=np.ones(2), precision_at_1=np.ones(2))
    else:
        tester = SimpleNamespace(last_embeddings_and_labels={"test": (torch.randn(4, 3), torch.tensor([0, 0, 1, 1]))})
        query_scores.save_test_scores(tmp_path, tester, 3)
        path.write_bytes(path.read_bytes()[:100] if damage == "truncated" else b"\x80\x04K\x01.")
    with pytest.raises(BrokenFile, match=str(path)):
        query_scores.read_scores(path)
    scores, left_out = query_scores.load_run_scores({("ice", 0): tmp_path})
    assert scores == {} and str(path) in left_out["ice", 0] and "left out of the paired comparisons" in left_out["ice", 0]


@pytest.mark.slow
def test_a_run_without_readable_test_scores_is_named_and_left_out_of_the_comparisons(tmp_path, capsys):
    """A deleted, truncated or object-array test_scores.npz: the rerun says which run its
    comparisons leave out (before: silently one seed fewer, or a crash on every rerun)."""
    out = tmp_path / "out"
    argv = ["--dataset", "digits", "--epochs", "1", "--seeds", "2", "--limit-per-class", "20", "--batch-size", "16",
            "--m-per-class", "4", "--patience", "-1", "--losses", "ice,ntxent", "--quiet", "--out", str(out)]
    assert run.main(argv) == 0
    assert "Left out" not in (out / "summary.md").read_text()
    path = out / "runs" / "ntxent" / "seed1" / query_scores.SCORES_FILE
    intact = path.read_bytes()
    for damage in ("deleted", "truncated", "object array"):
        if damage == "deleted":
            path.unlink()
        elif damage == "truncated":
            path.write_bytes(intact[:200])
        else:
            write_object_array_scores(path)
        damaged = path.read_bytes() if path.exists() else None
        capsys.readouterr()
        assert run.main(argv) == 0
        printed, summary = capsys.readouterr().out, (out / "summary.md").read_text()
        note = f"{path} {'is missing' if damage == 'deleted' else 'cannot be read'}"
        assert note in printed and note in summary, damage
        assert "`ntxent` seed 1 is left out of the paired comparisons" in summary
        assert "| `ntxent` | `ice` (ICE) | 1 |" in summary  # one seed compared; the table keeps both
        assert "| `ntxent` | 2 |" in summary
        assert (path.read_bytes() if path.exists() else None) == damaged  # the file is left as it was
    path.write_bytes(intact)
    assert run.main(argv) == 0 and "Left out" not in (out / "summary.md").read_text()
