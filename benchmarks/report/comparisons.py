"""Two losses compared on the runs they both finished, seed by seed and query by query.

For each metric of ``QUERY_METRICS`` a ``Comparison`` holds the seed-paired test, which sees
training runs and test queries and gives every verdict (``seed_paired``), and the
query-level difference of these particular trained models (``paired_tests``).
"""

import dataclasses
from typing import Dict, Mapping, Optional, Sequence

import numpy as np

from ..core.metrics import PRIMARY_METRIC
from .paired_tests import PairedDifference, paired_difference
from ..core.query_scores import QUERY_METRICS, QueryScores
from .seed_paired import SeedPairedDifference, seed_paired_difference


def _stack(runs: Mapping[int, QueryScores], seeds: Sequence[int], metric: str) -> np.ndarray:
    return np.stack([runs[s][metric] for s in seeds])


@dataclasses.dataclass(frozen=True)
class Comparison:
    """A - B of one metric: ``seeds``, the seed-paired test that gives the verdict (None with
    fewer than 2 seeds in common), and ``queries``, the query-level difference of these
    particular trained models."""

    seeds: Optional[SeedPairedDifference]
    queries: PairedDifference


def compare_losses(scores: Mapping[str, Mapping[int, QueryScores]], a: str, b: str) -> Dict[str, Comparison]:
    """Both comparisons a - b for each of ``QUERY_METRICS`` over the seeds both finished."""
    seeds = sorted(set(scores[a]) & set(scores[b]))
    if not seeds:
        raise ValueError(f"'{a}' and '{b}' have no finished seed in common")
    for s in seeds:
        if not np.array_equal(scores[a][s]["labels"], scores[b][s]["labels"]):
            raise ValueError(f"'{a}' and '{b}' seed {s} were tested on different queries")
    comparisons = {}
    for m in QUERY_METRICS:
        a_scores, b_scores = _stack(scores[a], seeds, m), _stack(scores[b], seeds, m)
        by_seed = seed_paired_difference(a_scores, b_scores) if len(seeds) >= 2 else None
        comparisons[m] = Comparison(by_seed, paired_difference(a_scores, b_scores))
    return comparisons


def pooled_mean(runs: Mapping[int, QueryScores], metric: str = PRIMARY_METRIC) -> float:
    """Mean of a metric over the queries of every seed (the mean of the per-seed means)."""
    return float(np.mean(_stack(runs, sorted(runs), metric)))
