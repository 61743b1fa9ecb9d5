"""Markdown of paired tests: a difference with its interval and p, a verdict, the comparison table."""

from typing import Mapping, Optional

from .metrics import PRIMARY_METRIC, SHORT_NAMES
from .paired_tests import ALPHA, PairedDifference, compare_losses, pooled_mean
from .query_scores import QUERY_METRICS, QueryScores


def _points(x: float) -> str:
    return f"{100 * x:+.1f}"


def p_text(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def difference_text(difference: PairedDifference) -> str:
    """``"+1.2 [+0.8, +1.6], p < 0.001"``: the difference and its interval in points, and p."""
    return (f"{_points(difference.mean)} [{_points(difference.ci_low)}, {_points(difference.ci_high)}], "
            f"p {p_text(difference.p_value)}")


def verdict(a: str, b: str, difference: PairedDifference, metric: str = PRIMARY_METRIC) -> str:
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
            cells = [f"`{label}`", f"`{baseline}` ({role})", str(seeds), str(differences[PRIMARY_METRIC].num_queries)]
            for metric in QUERY_METRICS:
                d = differences[metric]
                cells += [_points(d.mean), f"[{_points(d.ci_low)}, {_points(d.ci_high)}]", p_text(d.p_value)]
            lines.append("| " + " | ".join(cells) + " |")
            verdicts.append(verdict(f"`{label}`", f"`{baseline}`", differences[PRIMARY_METRIC]))
        sentences.append(f"Against `{baseline}` ({role}), on test MAP@R: " + "; ".join(verdicts) + ".")
    notes = ("Δ = loss minus the loss it is compared with, in points of %; paired over test queries, "
             "each query's difference averaged over the seeds both losses finished; 95 % percentile "
             "bootstrap interval over queries; p from the Wilcoxon signed-rank test (two-sided); "
             f"called a difference when p < {ALPHA} and the interval excludes 0, without correction "
             "for the number of comparisons.")
    return "\n".join(lines + ["", notes, "", *sentences])
