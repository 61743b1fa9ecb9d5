"""Mean ± standard deviation over seeds, the form of every table's cells."""

import math
from typing import Sequence


def mean_std(values: Sequence[float]):
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def mean_std_text(rows: Sequence[dict], metric: str) -> str:
    """``"mean ± std"`` of a metric over rows, in %."""
    mean, std = mean_std([100 * r[metric] for r in rows])
    return f"{mean:.1f} ± {std:.1f}"
