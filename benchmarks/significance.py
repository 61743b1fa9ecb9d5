"""Per-query retrieval scores and paired tests between losses.

A finished run keeps, for its best validation epoch, the score of every test query
(``test_scores.npz`` in its run folder). Two losses are compared on the same queries:

- AP@R of query q (PML's ``mean_average_precision_at_r`` before averaging), with the other
  test images as references and R_q the number of other images of q's class:
  ``AP@R_q = (1/R_q) * sum_{i <= R_q} [n_i has q's class] * P@i``, n_i its i-th neighbour.
- hit@1 (PML's ``precision_at_1`` before averaging): ``[n_1 has q's class]``.

The paired difference of loss A and loss B on query q is ``d_q = mean_s (A_sq - B_sq)``
over the seeds s that both finished (query q of seed s of A against query q of seed s of
B). The query is the unit of the test, so a query counts once whatever the number of
seeds. The reported difference is ``mean_q d_q`` (the difference of the pooled means),
with a 95 % percentile bootstrap interval over queries (fixed seed) and the two-sided
p-value of scipy's Wilcoxon signed-rank test on the ``d_q``. A difference is called
significant when p < 0.05 and the interval excludes 0; several comparisons in one table
are not corrected for multiplicity.
"""

import dataclasses
import io
import math
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from pytorch_metric_learning import testers
from pytorch_metric_learning.utils.accuracy_calculator import (
    AccuracyCalculator,
    get_label_match_counts,
    get_lone_query_labels,
    get_relevance_mask,
)
from scipy import stats

from .files import atomic_write_bytes

SCORES_FILE = "test_scores.npz"
QUERY_METRICS = ("mean_average_precision_at_r", "precision_at_1")
SHORT_NAMES = {"mean_average_precision_at_r": "MAP@R", "precision_at_1": "P@1"}
HEADLINE_METRIC = "mean_average_precision_at_r"
VALIDATION_METRIC = "val_mean_average_precision_at_r"
ALPHA = 0.05
BOOTSTRAP_RESAMPLES = 2_000  # a table of 6 losses x 5 seeds x 60,000 queries: 23 s on 2 busy cores

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


def keep_best_test_scores(run_dir, tester, rows: Sequence[dict]) -> None:
    """Write the test split's per-query scores to ``run_dir/test_scores.npz`` (atomically)
    when the last evaluated epoch in ``rows`` is the best so far on validation MAP@R (the
    earliest best, as the summary picks it). Call after each evaluation, before the
    checkpoint is saved, so that a resumed run rewrites scores a kill left ahead of it.
    ``tester`` is a ``KeepEmbeddingsTester``; nothing is written when it evaluated no test
    split (tuning)."""
    if "test" not in tester.last_embeddings_and_labels:
        return
    earlier = [row[VALIDATION_METRIC] for row in rows[:-1]]
    best_before = max((v for v in earlier if math.isfinite(v)), default=-math.inf)
    if earlier and not rows[-1][VALIDATION_METRIC] > best_before:
        return
    embeddings, labels = tester.last_embeddings_and_labels["test"]
    scores = per_query_scores(embeddings, labels)
    buffer = io.BytesIO()
    np.savez(buffer, epoch=rows[-1]["epoch"], **scores)
    atomic_write_bytes(Path(run_dir) / SCORES_FILE, buffer.getvalue())


def load_run_scores(run_dirs: Mapping[Tuple[str, int], Path]) -> Dict[str, Dict[int, QueryScores]]:
    """``{loss label: {seed: scores}}`` of every (label, seed) -> run folder holding scores."""
    found: Dict[str, Dict[int, QueryScores]] = {}
    for (label, seed), run_dir in run_dirs.items():
        path = Path(run_dir) / SCORES_FILE
        if path.is_file():
            with np.load(path) as stored:
                found.setdefault(label, {})[seed] = {name: stored[name] for name in stored.files}
    return found


@dataclasses.dataclass(frozen=True)
class PairedDifference:
    """Difference A - B of one metric over paired queries (fractions, not %)."""

    mean: float
    ci_low: float
    ci_high: float
    p_value: float
    num_queries: int

    @property
    def significant(self) -> bool:
        return self.p_value < ALPHA and not self.ci_low <= 0.0 <= self.ci_high


def paired_difference(a, b, seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES) -> PairedDifference:
    """Compare per-query scores ``a`` and ``b`` of shape (seeds, queries), paired by index.

    d_q = mean over seeds of a - b; returns mean_q d_q, its 95 % percentile bootstrap
    interval (``resamples`` resamplings of the queries, ``seed``) and the two-sided
    Wilcoxon signed-rank p-value of the d_q (1 when every d_q is 0).
    """
    a, b = np.atleast_2d(np.asarray(a, dtype=np.float64)), np.atleast_2d(np.asarray(b, dtype=np.float64))
    if a.shape != b.shape:
        raise ValueError(f"paired scores must have the same shape, got {a.shape} and {b.shape}")
    d = (a - b).mean(axis=0)
    if len(d) < 2:
        raise ValueError(f"a paired test needs at least 2 queries, got {len(d)}")
    if np.all(d == d[0]):  # no spread: the bootstrap interval is the point, Wilcoxon is undefined
        p_value = 1.0 if d[0] == 0 else 0.0
        return PairedDifference(float(d[0]), float(d[0]), float(d[0]), p_value, len(d))
    interval = stats.bootstrap(
        (d,), np.mean, n_resamples=resamples, confidence_level=1 - ALPHA, method="percentile",
        batch=max(1, 2**24 // len(d)), rng=np.random.default_rng(seed),
    ).confidence_interval
    p_value = stats.wilcoxon(d).pvalue  # zero differences dropped (zero_method='wilcox')
    return PairedDifference(float(d.mean()), float(interval.low), float(interval.high), float(p_value), len(d))


def _stack(runs: Mapping[int, QueryScores], seeds: Sequence[int], metric: str) -> np.ndarray:
    return np.stack([runs[s][metric] for s in seeds])


def compare_losses(scores: Mapping[str, Mapping[int, QueryScores]], a: str, b: str) -> Dict[str, PairedDifference]:
    """Paired differences a - b for each of ``QUERY_METRICS`` over the seeds both finished."""
    seeds = sorted(set(scores[a]) & set(scores[b]))
    if not seeds:
        raise ValueError(f"'{a}' and '{b}' have no finished seed in common")
    for s in seeds:
        if not np.array_equal(scores[a][s]["labels"], scores[b][s]["labels"]):
            raise ValueError(f"'{a}' and '{b}' seed {s} were tested on different queries")
    return {m: paired_difference(_stack(scores[a], seeds, m), _stack(scores[b], seeds, m)) for m in QUERY_METRICS}


def pooled_mean(runs: Mapping[int, QueryScores], metric: str = HEADLINE_METRIC) -> float:
    """Mean of a metric over the queries of every seed (the mean of the per-seed means)."""
    return float(np.mean(_stack(runs, sorted(runs), metric)))


def _points(x: float) -> str:
    return f"{100 * x:+.1f}"


def p_text(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def difference_text(difference: PairedDifference) -> str:
    """``"+1.2 [+0.8, +1.6], p < 0.001"``: the difference and its interval in points, and p."""
    return (f"{_points(difference.mean)} [{_points(difference.ci_low)}, {_points(difference.ci_high)}], "
            f"p {p_text(difference.p_value)}")


def verdict(a: str, b: str, difference: PairedDifference, metric: str = HEADLINE_METRIC) -> str:
    """``"a is better than b (…)"``, ``"b is better than a (…)"`` or ``"no detectable difference …"``;
    the difference in brackets is the better loss minus the other (a - b when none is)."""
    sign = -1.0 if difference.significant and difference.mean < 0 else 1.0
    low, high = sorted((sign * difference.ci_low, sign * difference.ci_high))
    p = p_text(difference.p_value)
    details = (f"Δ{SHORT_NAMES[metric]} {_points(sign * difference.mean)} points, 95 % CI "
               f"[{_points(low)}, {_points(high)}], p {p if p.startswith('<') else '= ' + p}")
    if not difference.significant:
        return f"no detectable difference between {a} and {b} ({details})"
    better, worse = (a, b) if sign > 0 else (b, a)
    return f"{better} is better than {worse} ({details})"


def comparison_table(scores: Mapping[str, Mapping[int, QueryScores]], ice_label: Optional[str]) -> str:
    """Markdown: each loss against ICE (``ice_label``) and against the best loss (highest
    pooled test MAP@R), with ΔMAP@R and ΔP@1 in points, 95 % CI and p, then one sentence
    per baseline with the verdict on MAP@R. Empty text when fewer than two losses have scores."""
    labels = list(scores)
    if len(labels) < 2:
        return ""
    best = max(labels, key=lambda label: pooled_mean(scores[label]))
    baselines = [label for label in dict.fromkeys([ice_label, best]) if label in scores]
    header = ["loss", "against", "seeds", "queries"]
    for metric in QUERY_METRICS:
        name = SHORT_NAMES[metric]
        header += [f"Δ{name}", f"{name} 95 % CI", f"{name} p"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    sentences = []
    for baseline in baselines:
        role = "ICE" if baseline == ice_label else "the best loss"
        verdicts = []
        for label in labels:
            if label == baseline:
                continue
            differences = compare_losses(scores, label, baseline)
            seeds = len(set(scores[label]) & set(scores[baseline]))
            cells = [f"`{label}`", f"`{baseline}` ({role})", str(seeds), str(differences[HEADLINE_METRIC].num_queries)]
            for metric in QUERY_METRICS:
                d = differences[metric]
                cells += [_points(d.mean), f"[{_points(d.ci_low)}, {_points(d.ci_high)}]", p_text(d.p_value)]
            lines.append("| " + " | ".join(cells) + " |")
            verdicts.append(verdict(f"`{label}`", f"`{baseline}`", differences[HEADLINE_METRIC]))
        sentences.append(f"Against `{baseline}` ({role}), on test MAP@R: " + "; ".join(verdicts) + ".")
    notes = ("Δ = loss minus the loss it is compared with, in points of %; paired over test queries, "
             "each query's difference averaged over the seeds both losses finished; 95 % percentile "
             "bootstrap interval over queries; p from the Wilcoxon signed-rank test (two-sided); "
             f"called a difference when p < {ALPHA} and the interval excludes 0, without correction "
             "for the number of comparisons.")
    return "\n".join(lines + ["", notes, "", *sentences])
