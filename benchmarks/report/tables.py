"""Markdown of comparisons: a difference with its interval and p, a verdict, the comparison table.

Every verdict comes from the seed-paired test (``seed_paired``); the query-level interval
is shown beside it as a statement about these particular trained models.
"""

from typing import Mapping, Optional, Tuple

from ..core.convergence import cap_note

from .comparisons import Comparison, compare_losses, pooled_mean
from ..core.metrics import PRIMARY_METRIC, SHORT_NAMES
from .paired_tests import ALPHA
from ..core.query_scores import QUERY_METRICS, QueryScores
from .seed_paired import POWER

NOT_TESTED = "not tested: fewer than 2 seeds in common"


def _points(x: float) -> str:
    return f"{100 * x:+.1f}"


def p_text(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def interval_text(difference) -> str:
    return f"[{_points(difference.ci_low)}, {_points(difference.ci_high)}]"


def difference_text(comparison: Comparison) -> str:
    """``"+1.2 [+0.8, +1.6], p < 0.001"``: the seed-paired difference, its interval in points, and p."""
    difference = comparison.seeds
    if difference is None:
        return NOT_TESTED
    return f"{_points(difference.mean)} {interval_text(difference)}, p {p_text(difference.p_value)}"


def verdict(a: str, b: str, comparison: Comparison, metric: str = PRIMARY_METRIC) -> str:
    """``"a is better than b (…)"``, ``"b is better than a (…)"`` or ``"no detectable difference …"``
    from the seed-paired test; the difference in brackets is the better loss minus the other
    (a - b when none is), and "no detectable difference" names the smallest difference these
    seeds would have detected."""
    difference = comparison.seeds
    if difference is None:
        return f"{a} and {b}: {NOT_TESTED}"
    sign = -1.0 if difference.significant and difference.mean < 0 else 1.0
    low, high = sorted((sign * difference.ci_low, sign * difference.ci_high))
    p = p_text(difference.p_value)
    details = (f"Δ{SHORT_NAMES[metric]} {_points(sign * difference.mean)} points, 95 % CI "
               f"[{_points(low)}, {_points(high)}], p {p if p.startswith('<') else '= ' + p}")
    if not difference.significant:
        return (f"no detectable difference between {a} and {b} ({details}; {difference.num_seeds} seeds detect "
                f"{100 * difference.detectable:.1f} points with {100 * POWER:.0f} % power)")
    better, worse = (a, b) if sign > 0 else (b, a)
    return f"{better} is better than {worse} ({details})"


def comparison_table(scores: Mapping[str, Mapping[int, QueryScores]], ice_label: Optional[str],
                     capped: Mapping[str, Tuple[int, int]] = {}, converged: bool = True) -> str:
    """Markdown: each loss against ICE (``ice_label``) and against the best loss (highest
    pooled test MAP@R): per metric the seed-paired difference in points, its 95 % CI and p,
    for MAP@R the smallest detectable difference and the query-level interval, then one
    sentence per baseline with the verdict on MAP@R, naming the losses whose runs the epoch
    cap stopped (``capped``: label -> (runs stopped by the cap, runs)). Without ``converged``
    (a fixed budget) no verdict is drawn. Empty text when fewer than two losses have scores."""
    labels = list(scores)
    if len(labels) < 2:
        return ""
    best = max(labels, key=lambda label: pooled_mean(scores[label]))
    baselines = [label for label in dict.fromkeys([ice_label, best]) if label in scores]
    header = ["loss", "against", "seeds", "queries"]
    for metric in QUERY_METRICS:
        name = SHORT_NAMES[metric]
        header += [f"Δ{name}", f"{name} 95 % CI", f"{name} p"]
        if metric == PRIMARY_METRIC:
            header += [f"{name} detectable", f"{name} query-level 95 % CI (these models)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    sentences = []
    for baseline in baselines:
        role = "ICE" if baseline == ice_label else "the best loss"
        verdicts = []
        for label in labels:
            if label == baseline:
                continue
            comparisons = compare_losses(scores, label, baseline)
            seeds = len(set(scores[label]) & set(scores[baseline]))
            cells = [f"`{label}`", f"`{baseline}` ({role})", str(seeds), str(comparisons[PRIMARY_METRIC].queries.num_queries)]
            for metric in QUERY_METRICS:
                by_seed = comparisons[metric].seeds
                cells += [_points(by_seed.mean), interval_text(by_seed), p_text(by_seed.p_value)] if by_seed else ["", "", ""]
                if metric == PRIMARY_METRIC:
                    cells += [f"{100 * by_seed.detectable:.1f}" if by_seed else "",
                              interval_text(comparisons[metric].queries)]
            lines.append("| " + " | ".join(cells) + " |")
            verdicts.append(verdict(f"`{label}`", f"`{baseline}`", comparisons[PRIMARY_METRIC])
                            + cap_note(label, capped))
        sentences.append(f"Against `{baseline}` ({role}), on test MAP@R: " + "; ".join(verdicts)
                         + cap_note(baseline, capped) + ".")
    if not converged:
        sentences = ["Not trained to convergence (a fixed budget): no verdict about which loss is better is "
                     "drawn from these differences."]
    notes = ("Δ = loss minus the loss it is compared with, in points of %, from runs paired by seed (same "
             "initial weights, batches and test queries): the mean over seeds of each seed's difference, "
             "with a 95 % Student-t interval whose standard error sees both the seed-to-seed spread and the "
             f"sampling of the test queries; called a difference when p < {ALPHA}, without correction for "
             f"the number of comparisons. Detectable = the smallest difference these seeds detect with "
             f"{100 * POWER:.0f} % power. The query-level interval (bootstrap over queries, seeds pooled) "
             "is about these particular trained models, not about the losses.")
    return "\n".join(lines + ["", notes, "", *sentences])
