"""Per-query retrieval scores of a run's test split, kept for paired tests between losses.

A finished run keeps, for its best validation epoch, the score of every test query
(``test_scores.npz`` in its run folder):

- AP@R of query q (PML's ``mean_average_precision_at_r`` before averaging), with the other
  test images as references and R_q the number of other images of q's class:
  ``AP@R_q = (1/R_q) * sum_{i <= R_q} [n_i has q's class] * P@i``, n_i its i-th neighbour.
- hit@1 (PML's ``precision_at_1`` before averaging): ``[n_1 has q's class]``.
"""

import io
import zipfile
from pathlib import Path
from typing import Dict, Mapping, Tuple

import numpy as np
import torch
from pytorch_metric_learning import testers
from pytorch_metric_learning.utils.accuracy_calculator import (
    AccuracyCalculator,
    get_label_match_counts,
    get_lone_query_labels,
    get_relevance_mask,
)

from ..storage.files import BrokenFile, atomic_write_bytes

SCORES_FILE = "test_scores.npz"
QUERY_METRICS = ("mean_average_precision_at_r", "precision_at_1")

QueryScores = Dict[str, np.ndarray]


def per_query_scores(embeddings, labels) -> QueryScores:
    """AP@R and hit@1 of every query that has another image of its class.

    References are the queries themselves, each query excluded from its own list, with
    PML's default FaissKNN (L2 neighbours) and ``k="max_bin_count"``: the harness's tester
    setting. Returns ``labels`` and one float64 array per name of ``QUERY_METRICS``, in
    query order; queries alone in their class are left out, as PML leaves them out.
    """
    embeddings = torch.as_tensor(embeddings, dtype=torch.float32)
    labels = torch.as_tensor(labels).to(embeddings.device)
    if labels.ndim == 2:  # the tester's (N, label levels) labels: level 0
        labels = labels[:, 0]
    if len(embeddings) != len(labels):
        raise ValueError(f"{len(embeddings)} embeddings but {len(labels)} labels")
    calculator = AccuracyCalculator(k="max_bin_count")
    label_counts = get_label_match_counts(labels, labels, calculator.label_comparison_fn)
    _, not_lone = get_lone_query_labels(labels, label_counts, True, calculator.label_comparison_fn)
    if not not_lone.any():
        raise ValueError("no query has another image of its class: per-query scores are undefined")
    k = calculator.determine_k(label_counts[1], len(labels), True)
    _, knn_indices = calculator.knn_func(embeddings, k, embeddings, True)
    knn_labels = labels[knn_indices.to(labels.device)]
    relevant, r = get_relevance_mask(knn_labels.shape, labels, True, label_counts)
    hits = (knn_labels == labels[:, None]) & relevant
    precision_at_i = hits.cumsum(dim=1).double() / torch.arange(1, k + 1, dtype=torch.float64, device=hits.device)
    average_precision = (precision_at_i * hits).sum(dim=1) / r.clamp(min=1)
    hit_at_1 = (knn_labels[:, 0] == labels).double()
    return {
        "labels": labels[not_lone].cpu().numpy(),
        "mean_average_precision_at_r": average_precision[not_lone].cpu().numpy(),
        "precision_at_1": hit_at_1[not_lone].cpu().numpy(),
    }


class KeepEmbeddingsTester(testers.GlobalEmbeddingSpaceTester):
    """PML's GlobalEmbeddingSpaceTester that keeps the embeddings and labels of its last
    ``test`` call in ``last_embeddings_and_labels`` (PML deletes them when testing ends)."""

    last_embeddings_and_labels: dict = {}

    def get_all_embeddings_for_all_splits(self, *args, **kwargs):
        self.last_embeddings_and_labels = super().get_all_embeddings_for_all_splits(*args, **kwargs)
        return self.last_embeddings_and_labels


def save_test_scores(run_dir, tester, epoch: int) -> None:
    """Write the test split's per-query scores of the evaluation just made (at ``epoch``) to
    ``run_dir/test_scores.npz``, atomically. ``tester`` is a ``KeepEmbeddingsTester``;
    nothing is written when it evaluated no test split (tuning)."""
    if "test" not in tester.last_embeddings_and_labels:
        return
    embeddings, labels = tester.last_embeddings_and_labels["test"]
    scores = per_query_scores(embeddings, labels)
    buffer = io.BytesIO()
    np.savez(buffer, epoch=epoch, **scores)
    atomic_write_bytes(Path(run_dir) / SCORES_FILE, buffer.getvalue())


def read_scores(path) -> QueryScores:
    """The scores stored in ``path`` by ``save_test_scores``, read without pickle; ``BrokenFile``
    naming the file when it cannot be read or lacks equal-length numeric labels and scores."""
    try:
        stored = np.load(path, allow_pickle=False)
        if not isinstance(stored, np.lib.npyio.NpzFile):
            raise ValueError("not an .npz archive")
        with stored:
            scores = {name: stored[name] for name in stored.files}
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as error:
        raise BrokenFile(f"{path} cannot be read ({type(error).__name__}: {error})") from error
    arrays = [scores.get(name) for name in ("labels", *QUERY_METRICS)]
    if (any(a is None or a.ndim != 1 or a.dtype.kind not in "iuf" for a in arrays)
            or len({len(a) for a in arrays}) != 1):
        raise BrokenFile(f"{path} does not hold the labels and per-query scores of a test split")
    return scores


def load_run_scores(run_dirs: Mapping[Tuple[str, int], Path]
                    ) -> Tuple[Dict[str, Dict[int, QueryScores]], Dict[Tuple[str, int], str]]:
    """``{loss label: {seed: scores}}`` of every (label, seed) -> run folder, and for each run
    whose scores are missing or cannot be read, a note naming the file: that run is left out."""
    found: Dict[str, Dict[int, QueryScores]] = {}
    left_out: Dict[Tuple[str, int], str] = {}
    for (label, seed), run_dir in run_dirs.items():
        path = Path(run_dir) / SCORES_FILE
        try:
            if not path.is_file():
                raise BrokenFile(f"{path} is missing")
            found.setdefault(label, {})[seed] = read_scores(path)
        except BrokenFile as error:
            left_out[label, seed] = (f"{error}: `{label}` seed {seed} is left out of the paired comparisons "
                                     f"(restore the file, or delete {run_dir} and run the command again to "
                                     "train that run again)")
    return found, left_out
