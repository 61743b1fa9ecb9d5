"""The seed-aware comparison of two losses: the unit of evidence is a trained model.

``a[s, q]`` and ``b[s, q]`` are the scores (AP@R or hit@1) of test query q under the
models that losses A and B trained with seed s. A seed gives both losses the same initial
weights, the same batches and the same test queries, so runs are paired by seed:

- per-seed difference ``D_s = mean_q (a_sq - b_sq)`` (the two models' difference in MAP@R),
  over the S seeds both losses finished; the estimate is ``D = mean_s D_s``;
- its standard error sees both levels of noise, training runs and test queries (the
  two-way random-effects decomposition of the seeds x queries table of differences):
  ``SE^2 = var_s(D_s) / S + max(0, var_q(d_q) - v / S) / Q``, with
  ``d_q = mean_s (a_sq - b_sq)`` and ``v`` the residual variance of the table. The first
  term is the spread of paired training runs, which carries each run's query noise; the
  second is the part of the query-to-query spread that repeats in every seed, the
  sampling error of the Q shared test queries (0 when losses differ alike on every query);
- the 95 % interval is ``D ± t(0.975, S-1) SE`` and p is two-sided from Student's t with
  S - 1 degrees of freedom (the seeds are the scarce level);
- the smallest difference this design detects with 80 % power at alpha 0.05 is
  ``(t(0.975, S-1) + t(0.80, S-1)) SE``.

A difference is called when p < 0.05 (the interval then excludes 0); several comparisons
in one table are not corrected for their number.
"""

import dataclasses

import numpy as np
from scipy import stats

from .paired_tests import ALPHA

POWER = 0.80


@dataclasses.dataclass(frozen=True)
class SeedPairedDifference:
    """Difference A - B of one metric over seed-paired runs (fractions, not %)."""

    mean: float
    ci_low: float
    ci_high: float
    p_value: float
    detectable: float  # smallest |A - B| detected with POWER at ALPHA, at this SE
    num_seeds: int
    num_queries: int

    @property
    def significant(self) -> bool:
        return self.p_value < ALPHA


def seed_paired_difference(a, b) -> SeedPairedDifference:
    """Compare scores ``a`` and ``b`` of shape (seeds, queries), paired by seed and by query."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"paired scores must be two (seeds, queries) arrays of one shape, got {a.shape} and {b.shape}")
    seeds, queries = a.shape
    if seeds < 2 or queries < 2:
        raise ValueError(f"a seed-paired test needs at least 2 seeds and 2 queries, got {seeds} and {queries}")
    difference = a - b
    per_seed, per_query = difference.mean(axis=1), difference.mean(axis=0)
    mean = float(per_seed.mean())
    residual = difference - per_seed[:, None] - per_query[None, :] + mean
    residual_variance = (residual**2).sum() / ((seeds - 1) * (queries - 1))
    query_part = max(0.0, per_query.var(ddof=1) - residual_variance / seeds)
    standard_error = float(np.sqrt(per_seed.var(ddof=1) / seeds + query_part / queries))
    critical = stats.t.ppf(1 - ALPHA / 2, seeds - 1)
    detectable = float((critical + stats.t.ppf(POWER, seeds - 1)) * standard_error)
    if standard_error == 0.0:  # every run and query differs by the same amount
        return SeedPairedDifference(mean, mean, mean, 1.0 if mean == 0 else 0.0, 0.0, seeds, queries)
    p_value = float(2 * stats.t.sf(abs(mean) / standard_error, seeds - 1))
    half_width = critical * standard_error
    return SeedPairedDifference(mean, mean - half_width, mean + half_width, p_value, detectable, seeds, queries)
