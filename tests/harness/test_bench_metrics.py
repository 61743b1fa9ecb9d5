"""Recall@K of the harness's AccuracyCalculator against a brute-force computation."""

import numpy as np
import pytest
import torch

from benchmarks.core.metrics import METRICS, RecallAccuracyCalculator, recall_at_k


def brute_force_recall(query, query_labels, reference, reference_labels, k, ref_includes_query):
    """Mean over queries with another same-label reference of [a same label among the k nearest]."""
    hits = []
    for i, (q, label) in enumerate(zip(query, query_labels)):
        distances = ((reference - q) ** 2).sum(axis=1)
        candidates = [j for j in range(len(reference)) if not (ref_includes_query and j == i)]
        if not any(reference_labels[j] == label for j in candidates):
            continue
        nearest = sorted(candidates, key=lambda j: distances[j])[:k]
        hits.append(any(reference_labels[j] == label for j in nearest))
    return float(np.mean(hits))


@pytest.mark.parametrize("ref_includes_query", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_at_k_matches_brute_force(seed, ref_includes_query):
    rng = np.random.default_rng(seed)
    query = rng.normal(size=(120, 6)).astype(np.float32)
    query_labels = rng.integers(0, 15, size=120)
    query_labels[0] = 99  # a lone label: its query must be left out
    if ref_includes_query:
        reference, reference_labels = query, query_labels
    else:
        reference = rng.normal(size=(150, 6)).astype(np.float32)
        reference_labels = rng.integers(0, 15, size=150)
    calculator = RecallAccuracyCalculator(device=torch.device("cpu"), include=("recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "precision_at_1"))
    result = calculator.get_accuracy(query, query_labels, reference, reference_labels, ref_includes_query)
    for k in (1, 2, 4, 8):
        expected = brute_force_recall(query, query_labels, reference, reference_labels, k, ref_includes_query)
        assert result[f"recall_at_{k}"] == pytest.approx(expected, abs=1e-12)
    assert result["recall_at_1"] == pytest.approx(result["precision_at_1"])
    assert result["recall_at_1"] <= result["recall_at_2"] <= result["recall_at_4"] <= result["recall_at_8"]


def test_recall_needs_more_neighbours_than_the_largest_class():
    # Classes of two images: max_bin_count alone would give k = 1, Recall@8 needs 8.
    rng = np.random.default_rng(3)
    embeddings = rng.normal(size=(40, 4)).astype(np.float32)
    labels = np.repeat(np.arange(20), 2)
    result = RecallAccuracyCalculator(device=torch.device("cpu")).get_accuracy(embeddings, labels)
    expected = brute_force_recall(embeddings, labels, embeddings, labels, 8, True)
    assert result["recall_at_8"] == pytest.approx(expected)
    assert set(result) == set(METRICS)


def test_recall_at_k_function():
    knn_labels = torch.tensor([[1, 2, 3], [2, 2, 1], [3, 3, 3]])
    query_labels = torch.tensor([3, 1, 0])
    assert recall_at_k(knn_labels, query_labels, 1) == 0.0
    assert recall_at_k(knn_labels, query_labels, 3) == pytest.approx(2 / 3)
