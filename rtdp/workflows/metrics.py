"""Small statistics used by every measuring verb."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a success rate.

    Args:
        successes: number of successful episodes.
        n: number of episodes (0 gives the uninformative interval [0, 1]).
    """
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)  # exact ends, not 0.9999999999999999
    return (low, high)


def percentiles_ms(samples_s: Sequence[float]) -> tuple[float, float]:
    """Median and p99 of durations given in seconds, returned in milliseconds."""
    arr = np.asarray(samples_s, dtype=np.float64) * 1e3
    return float(np.median(arr)), float(np.percentile(arr, 99))
