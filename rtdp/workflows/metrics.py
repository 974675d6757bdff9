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


def paired_comparison(reference: Sequence[bool], other: Sequence[bool]) -> dict[str, float | int]:
    """Two configurations' successes on the same episodes (same seeds), compared pair by pair.

    Over the same seeds most episodes succeed or fail under both; only the
    discordant pairs carry the difference. McNemar's exact test asks how likely
    a split at least this uneven is if neither configuration were better: a
    two-sided binomial test of the discordant pairs at p = 1/2. A 2-point
    difference over 50 episodes is one episode, and this says so.

    Args:
        reference: per-episode success of the reference configuration.
        other: the same episodes under the other configuration.

    Returns:
        ``{"only_reference", "only_other", "p_value"}``: episodes only the
        reference solved, episodes only the other solved, and the exact p-value.

    Raises:
        ValueError: the two lists cover different numbers of episodes.
    """
    if len(reference) != len(other):
        raise ValueError(f"paired comparison needs the same episodes, got {len(reference)} and {len(other)}")
    only_ref = sum(1 for a, b in zip(reference, other) if a and not b)
    only_other = sum(1 for a, b in zip(reference, other) if b and not a)
    n = only_ref + only_other
    tail = sum(math.comb(n, k) for k in range(min(only_ref, only_other) + 1)) / 2.0**n
    return {"only_reference": only_ref, "only_other": only_other, "p_value": min(1.0, 2.0 * tail)}


def percentiles_ms(samples_s: Sequence[float]) -> tuple[float, float]:
    """Median and p99 of durations given in seconds, returned in milliseconds."""
    arr = np.asarray(samples_s, dtype=np.float64) * 1e3
    return float(np.median(arr)), float(np.percentile(arr, 99))
