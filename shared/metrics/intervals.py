"""Confidence intervals and the verdict rule every claim of the toolkit is judged by.

- `mean_interval(values)`: mean of per-image values (PSNR, SSIM, LPIPS, or paired differences of two tokenizers on
  the same images) with its Student-t 95% interval.
- `normal_interval(estimate, std)`: estimate ± 1.96 std, for statistics whose spread comes from a bootstrap (FID).
  Centred on the estimate on purpose: FID is biased upwards at small sample counts and a resample (with its
  duplicated images) is biased further, so a percentile interval of bootstrap FIDs can miss the estimate itself.
- `verdict(interval, direction)`: "reproduced" only when the interval of a difference (ours − baseline) excludes zero
  in the paper's direction, "contradicted" when it excludes zero the other way, "inconclusive" otherwise.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile
DIRECTIONS = ("lower", "higher")


def mean_interval(values, confidence: float = CONFIDENCE) -> dict:
    """{"mean", "ci95": [low, high], "n"} of finite values (n, ) with the Student-t interval of their mean."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]  # PSNR of an exact reconstruction is +inf: it has no place in a mean
    n = len(values)
    if n == 0:
        return {"mean": None, "ci95": None, "n": 0}
    mean = float(values.mean())
    if n == 1:
        return {"mean": mean, "ci95": None, "n": 1}
    half_width = stats.t.ppf((1 + confidence) / 2, n - 1) * values.std(ddof=1) / math.sqrt(n)
    return {"mean": mean, "ci95": [mean - half_width, mean + half_width], "n": n}


def normal_interval(estimate: float, std: float) -> list[float]:
    """[estimate − 1.96 std, estimate + 1.96 std]."""
    return [estimate - Z_95 * std, estimate + Z_95 * std]


def format_interval(value: float | None, interval: list[float] | None, spec: str = ".1f") -> str:
    """'12.3 [11.0, 13.6]', the value alone where no interval was measured, 'n/a' where nothing was."""
    if value is None:
        return "n/a"
    if interval is None:
        return f"{value:{spec}}"
    return f"{value:{spec}} [{interval[0]:{spec}}, {interval[1]:{spec}}]"


def verdict(interval: list[float] | None, direction: str) -> str:
    """The computed claim rule for an interval of (ours − baseline); `direction` is the paper's: "lower" (e.g. FID)
    or "higher" (e.g. PSNR, throughput ratio − 1)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if interval is None:
        return "inconclusive"
    low, high = interval
    if direction == "lower":
        low, high = -high, -low  # "ours lower" is "−(ours − baseline) above zero"
    if low > 0:
        return "reproduced"
    if high < 0:
        return "contradicted"
    return "inconclusive"
