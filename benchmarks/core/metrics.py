"""PML's AccuracyCalculator extended with Recall@K, the retrieval metric of the DML literature.

Recall@K of a query is 1 when at least one of its K nearest references (itself excluded)
has the query's label, else 0; the reported value is the mean over queries whose label
has at least one other reference.
"""

import torch
from pytorch_metric_learning.utils.accuracy_calculator import (
    AccuracyCalculator,
    try_getting_not_lone_labels,
    nan_accuracy,
)

RECALL_KS = (1, 2, 4, 8)
METRICS = (
    "precision_at_1",
    "recall_at_1",
    "recall_at_2",
    "recall_at_4",
    "recall_at_8",
    "r_precision",
    "mean_average_precision_at_r",
    "NMI",
)
PRIMARY_METRIC = "mean_average_precision_at_r"
SHORT_NAMES = {
    "precision_at_1": "P@1",
    "recall_at_1": "R@1",
    "recall_at_2": "R@2",
    "recall_at_4": "R@4",
    "recall_at_8": "R@8",
    "r_precision": "RP",
    "mean_average_precision_at_r": "MAP@R",
    "NMI": "NMI",
}


def recall_at_k(knn_labels: torch.Tensor, query_labels: torch.Tensor, k: int) -> float:
    """Fraction of queries with a same-label neighbour among their first ``k`` neighbours."""
    hits = (knn_labels[:, :k] == query_labels[:, None]).any(dim=1)
    return hits.double().mean().item()


def _recall_method(k):
    def calculate(self, knn_labels, query_labels, not_lone_query_mask, label_counts, **kwargs):
        knn_labels, query_labels = try_getting_not_lone_labels(
            knn_labels, query_labels, not_lone_query_mask
        )
        if knn_labels is None:
            return nan_accuracy(label_counts[0], self.return_per_class)
        return recall_at_k(knn_labels, query_labels, k)

    calculate.__name__ = f"calculate_recall_at_{k}"
    calculate.__doc__ = f"Recall@{k}: a same-label reference among the {k} nearest."
    return calculate


class RecallAccuracyCalculator(AccuracyCalculator):
    """AccuracyCalculator with ``recall_at_{1,2,4,8}``; k covers at least 8 neighbours."""

    calculate_recall_at_1 = _recall_method(1)
    calculate_recall_at_2 = _recall_method(2)
    calculate_recall_at_4 = _recall_method(4)
    calculate_recall_at_8 = _recall_method(8)

    def __init__(self, **kwargs):
        kwargs.setdefault("k", "max_bin_count")
        kwargs.setdefault("include", METRICS)
        super().__init__(**kwargs)

    def requires_knn(self):
        return super().requires_knn() + [f"recall_at_{k}" for k in RECALL_KS]

    def determine_k(self, bin_counts, num_reference_embeddings, ref_includes_query):
        k = super().determine_k(bin_counts, num_reference_embeddings, ref_includes_query)
        available = num_reference_embeddings - int(ref_includes_query)
        return min(max(k, max(RECALL_KS)), available)
