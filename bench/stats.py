"""Summaries of raw samples, and the depths a sweep visits.

Pure functions with no I/O, so the numbers the report prints can be checked on
known samples (tests/test_bench_stats.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between ranks,
    the same rule as numpy's default, so results compare with notebooks."""
    if not samples:
        raise ValueError("percentile of no samples")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    ordered = sorted(samples)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(samples: Sequence[float]) -> dict[str, float]:
    """median, p95, min, max, mean and count of one series."""
    if not samples:
        return {"n": 0}
    return {
        "n": len(samples),
        "median": percentile(samples, 50),
        "p95": percentile(samples, 95),
        "min": min(samples),
        "max": max(samples),
        "mean": sum(samples) / len(samples),
    }


def ratio(numerator: float, denominator: float) -> float | None:
    """numerator / denominator, or None when the denominator is not positive."""
    return numerator / denominator if denominator > 0 else None


def depth_sweep(layers: int) -> list[int]:
    """Depths 1, 2, 4, … below `layers`, then `layers` itself.

    Geometric so that a 500-layer sweep costs ten points, not five hundred,
    while still showing whether cost grows with depth and how.
    """
    if layers < 1:
        raise ValueError("a sweep needs at least one layer")
    depths = []
    depth = 1
    while depth < layers:
        depths.append(depth)
        depth *= 2
    depths.append(layers)
    return depths
