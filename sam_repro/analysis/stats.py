"""Confidence intervals over seeds, as the paper reports them.

The paper's "±" is a 95% confidence interval over 5 independent runs (§3.1), i.e. the Student-t interval
mean ± t(0.975, n-1) · s / sqrt(n). This module computes that interval for one cell, and for the difference
SAM − SGD between two cells:

* paired by seed when both arms ran exactly the same seeds (the differences d_i = a_i − b_i get the one-sample
  interval; seed-matched runs share data order and initialisation, so this removes their common noise);
* Welch's unequal-variance interval otherwise, with the Welch-Satterthwaite degrees of freedom.

An interval needs at least two runs; with fewer, the half-width is None (never a made-up zero).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from scipy import stats as scipy_stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    """Mean of `n` runs and the half-width of its t-interval (None when n < 2)."""

    mean: float
    half_width: float | None
    n: int


@dataclass(frozen=True)
class Difference:
    """A − B with the half-width of its interval, and how it was computed.

    method: "paired" (n = number of seeds in common) or "welch" (n = n_a + n_b runs); df is the t-distribution's
    degrees of freedom (n - 1 when paired; the Welch-Satterthwaite value otherwise), None without an interval.
    """

    mean: float
    half_width: float | None
    method: str
    n: int
    df: float | None


def t_quantile(df: float, confidence: float = CONFIDENCE) -> float:
    """Two-sided critical value t((1 + confidence) / 2, df)."""
    return float(scipy_stats.t.ppf(0.5 + confidence / 2, df))


def _variance(values: Sequence[float], mean: float) -> float:
    """Unbiased sample variance (ddof = 1)."""
    return math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)


def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE) -> Estimate:
    """Mean and t-interval half-width of `values`: t(0.975, n-1) · s / sqrt(n) at 95%."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci needs at least one value")
    mean = math.fsum(values) / n
    if n < 2:
        return Estimate(mean, None, n)
    standard_error = math.sqrt(_variance(values, mean) / n)
    return Estimate(mean, t_quantile(n - 1, confidence) * standard_error, n)


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], confidence: float = CONFIDENCE) -> Difference:
    """Interval of mean(a_s − b_s) over the seeds s of `a`; `b` must hold the same seeds."""
    if set(a) != set(b):
        raise ValueError(f"paired difference needs the same seeds (got {sorted(a)} and {sorted(b)})")
    differences = [a[seed] - b[seed] for seed in sorted(a)]
    estimate = mean_ci(differences, confidence)
    df = float(estimate.n - 1) if estimate.half_width is not None else None
    return Difference(estimate.mean, estimate.half_width, "paired", estimate.n, df)


def welch_difference(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> Difference:
    """Welch's interval of mean(a) − mean(b) for independent samples with unequal variances."""
    mean_a, mean_b = math.fsum(a) / len(a), math.fsum(b) / len(b)
    n = len(a) + len(b)
    if len(a) < 2 or len(b) < 2:
        return Difference(mean_a - mean_b, None, "welch", n, None)
    share_a, share_b = _variance(a, mean_a) / len(a), _variance(b, mean_b) / len(b)
    variance = share_a + share_b
    if variance == 0.0:
        # Both arms constant: no spread to scale, and the Satterthwaite formula is 0/0.
        return Difference(mean_a - mean_b, 0.0, "welch", n, None)
    df = variance**2 / (share_a**2 / (len(a) - 1) + share_b**2 / (len(b) - 1))
    return Difference(mean_a - mean_b, t_quantile(df, confidence) * math.sqrt(variance), "welch", n, df)


def difference(
    a: Mapping[Any, Sequence[float]], b: Mapping[Any, Sequence[float]], confidence: float = CONFIDENCE
) -> Difference:
    """A − B from values keyed by seed: paired when both ran exactly the same seeds once each, else Welch.

    A seed that appears more than once in an arm (a rerun kept beside the original) cannot be paired, so such
    arms fall back to Welch over all their runs.
    """
    once = all(len(values) == 1 for values in (*a.values(), *b.values()))
    if once and set(a) == set(b):
        return paired_difference({s: v[0] for s, v in a.items()}, {s: v[0] for s, v in b.items()}, confidence)
    flat_a = [v for seed in sorted(a) for v in a[seed]]
    flat_b = [v for seed in sorted(b) for v in b[seed]]
    return welch_difference(flat_a, flat_b, confidence)
