"""Confidence intervals and the verdict rule every claim of the toolkit is judged by.

- `mean_interval(values)`: mean of per-image values (PSNR, SSIM, LPIPS, or paired differences of two tokenizers on
  the same images) with its Student-t 95% interval.
- `proportion_interval(successes, n)`: the Wilson 95% interval of a share (e.g. the samples a class probe
  recognises), which stays inside [0, 1] and does not collapse at a share of 0 or 1 as the normal one does.
- `normal_interval(estimate, std)`: estimate ± 1.96 std, for statistics whose spread comes from a bootstrap (FID).
  Centred on the estimate on purpose: FID is biased upwards at small sample counts and a resample (with its
  duplicated images) is biased further, so a percentile interval of bootstrap FIDs can miss the estimate itself.
- `verdict(interval, direction)`: "reproduced" only when the interval of a difference (ours − baseline) excludes zero
  in the paper's direction, "contradicted" when it excludes zero the other way, "inconclusive" otherwise.
- `seeded_difference(per_seed_differences, evaluation_variance)`: the interval of (ours − baseline) for two arms
  trained with S seeds each and evaluated on the same N images; `paired_image_differences(ours, baseline)` gives its
  inputs for per-image metrics from (S, N) arrays, `replicate_evaluation_variance(replicates)` the evaluation
  variance of a statistic that is not a per-image mean (FID) from (S, R) paired-bootstrap replicate differences.

Differences between training arms. Seed s of both arms shares the data order and the encoder initialisation, so the
seeds pair up and the comparison works on the per-seed paired differences d_s = metric(ours, s) − metric(baseline, s).
Their mean is the estimate, with two parts of variance,
    a = var_s(d_s, ddof=1) / S   (training seeds),   b = V_eval   (image sampling),
and the 95% interval  estimate ± √(t²_{0.975, S−1} · a + z²_{0.975} · b): each part with the quantile of its own
degrees of freedom (S − 1 for the seeds; N images, N large, for the evaluation). Both parts are needed: the spread of
d_s over seeds holds no image-sampling variance, because every seed is evaluated on the same images (an image that
favours ours does so in every seed and moves every d_s alike), while an interval from the images alone (one seed,
or the seed-averaged per-image differences) holds no training-seed variance. With a two-level model
d_si = δ + u_s + v_i + w_si (seed, image, seed × image interaction), a estimates σ²_u/S + σ²_w/(SN) and b (for
per-image metrics: var_i(mean_s d_si, ddof=1)/N) estimates σ²_v/N + σ²_w/(SN), while the estimate's variance is
σ²_u/S + σ²_v/N + σ²_w/(SN): the interaction is counted twice, which overstates the variance slightly.
Why not √(a + b) with a Welch–Satterthwaite ν: that ν is itself estimated from S − 1 degrees of freedom, and a seed
part that comes out small by chance both narrows the interval and raises ν; simulated with S = 3, N = 200 it covered
the true difference in only about 92% of experiments where the seed part is 5–20 times the evaluation part, and
adding a small b could narrow the interval. The rule here never narrows with b and covered 95–98% in every setting
simulated (tests/test_intervals.py holds a coverage test): the honest price of three seeds is the t quantile of 2
degrees of freedom (4.30). A two-level bootstrap (resample seeds, then images) is no substitute: 3 seeds have only
10 distinct resampled multisets, and the variance of a resampled seed mean is (S − 1)/S of the unbiased estimate (a
third too small at S = 3) before the normal or percentile quantile drops the small-sample widening as well. With one
seed no seed part can be estimated: the interval is the evaluation part's alone and the result says so ("seeds": 1,
"seed_variance": None), for callers to report that it ignores training-seed variance.
`seeded_difference_of_differences` compares two such differences (e.g. the ε-VAE − VAE gap at f8 against f4): the
seed parts of the two groups add up (a group of one seed takes the other's seed variance, and says so).

`log_step_trend(steps, estimates, replicates)`: how a difference measured at several training budgets of one run
moves per doubling of the steps (a least-squares line on log2 steps), and where that line would reach zero. Every
budget is measured on the same images, so its spread comes from image resamples drawn once for all budgets (the
replicates), which keeps the budgets' correlation; it holds no training-seed variance (one run per arm).

`steps_to_match(steps, ours, baseline, ...)`: how many of the baseline's training steps ours needs to reach the
baseline's value at its last budget (a lower-is-better metric such as gFID, measured after each of `steps`): the
convergence-speed comparison, with an interval from sample resamples drawn once for every budget of both runs.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.special import ndtri, stdtrit  # the normal and Student-t quantiles (scipy.stats takes 1 s to import)

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
    half_width = stdtrit(n - 1, (1 + confidence) / 2) * values.std(ddof=1) / math.sqrt(n)
    return {"mean": mean, "ci95": [mean - half_width, mean + half_width], "n": n}


def proportion_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> list[float] | None:
    """The Wilson score interval [low, high] of the share successes / n (None for n = 0)."""
    if n == 0:
        return None
    z = float(ndtri((1 + confidence) / 2))
    share = successes / n
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half_width = z / (1 + z * z / n) * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n))
    return [max(0.0, centre - half_width), min(1.0, centre + half_width)]


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


def _seed_spread(differences: np.ndarray) -> float | None:
    """std(d_s, ddof=1); None for one seed, exactly 0 for identical d_s (their computed std can be 1e-17)."""
    if len(differences) == 1:
        return None
    return 0.0 if np.ptp(differences) == 0 else float(differences.std(ddof=1))


def _checked(per_seed_differences, evaluation_variance) -> tuple[np.ndarray, float]:
    differences = np.asarray(per_seed_differences, dtype=np.float64).reshape(-1)
    if len(differences) == 0:
        raise ValueError("no per-seed differences")
    if not np.all(np.isfinite(differences)):
        raise ValueError(f"per-seed differences must be finite, got {differences.tolist()}")
    evaluation_variance = float(evaluation_variance)
    if not (math.isfinite(evaluation_variance) and evaluation_variance >= 0):
        raise ValueError(f"the evaluation variance must be finite and >= 0, got {evaluation_variance}")
    return differences, evaluation_variance


def _two_part_interval(estimate: float, seed_variance: float, dof: int | None, evaluation_variance: float,
                       confidence: float) -> list[float]:
    """estimate ± √(t²_dof · a + z² · b): each part of the variance with the quantile of its degrees of freedom."""
    z = float(ndtri((1 + confidence) / 2))
    t = z if dof is None else float(stdtrit(dof, (1 + confidence) / 2))
    half_width = math.sqrt(t ** 2 * seed_variance + z ** 2 * evaluation_variance)
    return [estimate - half_width, estimate + half_width]


def seeded_difference(per_seed_differences, evaluation_variance: float, confidence: float = CONFIDENCE) -> dict:
    """The interval of the mean of per-seed paired differences d_s (S, ) (ours − baseline, seed s of both arms),
    widened by `evaluation_variance`, the image-sampling variance of the seed-averaged difference (module docstring).

    Returns {"estimate": mean d_s, "ci95": [low, high], "seeds": S, "seed_std": std(d_s, ddof=1),
    "seed_variance": a = seed_std² / S, "evaluation_std": √b, "std": √(a + b), "dof": S − 1 (None for one seed)}.
    S = 1: "seed_std" and "seed_variance" are None and the interval is the evaluation part's alone; it ignores the
    training-seed variance, which one seed cannot estimate.
    """
    differences, b = _checked(per_seed_differences, evaluation_variance)
    seeds, estimate, seed_std = len(differences), float(differences.mean()), _seed_spread(differences)
    seed_variance = None if seed_std is None else seed_std ** 2 / seeds
    dof = None if seed_std is None else seeds - 1
    return {"estimate": estimate, "ci95": _two_part_interval(estimate, seed_variance or 0.0, dof, b, confidence),
            "seeds": seeds, "seed_std": seed_std, "seed_variance": seed_variance, "evaluation_std": math.sqrt(b),
            "std": math.sqrt((seed_variance or 0.0) + b), "dof": dof}


def seeded_difference_of_differences(high, low, evaluation_variance: float, confidence: float = CONFIDENCE) -> dict:
    """The interval of mean(high) − mean(low), two groups of per-seed differences (e.g. ε-VAE − VAE at f8 and at
    f4) measured on the same images: `evaluation_variance` is that of the difference of their seed means.

    The seed parts add up, s²_high / S_high + s²_low / S_low, with the Welch–Satterthwaite degrees of freedom of
    that sum; a group of one seed takes the other group's seed variance ("borrowed_seed_variance": True), and two
    groups of one seed have no seed part (the interval then ignores training-seed variance, "seeds": 1)."""
    high, b = _checked(high, evaluation_variance)
    low, _ = _checked(low, 0.0)
    measured = [(spread ** 2, len(group)) for spread, group in ((_seed_spread(high), high), (_seed_spread(low), low))
                if spread is not None]
    borrowed = len(measured) == 1
    if not measured:
        seed_variance, dof = 0.0, None
    elif borrowed:  # one seed variance for both groups, known to its own degrees of freedom
        seed_variance, dof = measured[0][0] * (1 / len(high) + 1 / len(low)), measured[0][1] - 1
    else:
        parts = [(variance / seeds, seeds - 1) for variance, seeds in measured]
        seed_variance = sum(part for part, _ in parts)
        dof = None if seed_variance == 0 else seed_variance ** 2 / sum(part ** 2 / freedom for part, freedom in parts)
    estimate = float(high.mean() - low.mean())
    return {"estimate": estimate, "ci95": _two_part_interval(estimate, seed_variance, dof, b, confidence),
            "seeds": min(len(high), len(low)), "seeds_high": len(high), "seeds_low": len(low),
            "seed_variance": seed_variance if measured else None, "borrowed_seed_variance": borrowed,
            "evaluation_std": math.sqrt(b), "std": math.sqrt(seed_variance + b), "dof": dof}


def paired_image_differences(ours, baseline) -> tuple[np.ndarray, float]:
    """(per_seed_differences (S, ), evaluation_variance) of a per-image metric (PSNR, SSIM, LPIPS) for
    `seeded_difference`, from the arms' values of shape (S, N): row s is seed s, column i image i in both arms.

    d_s = mean_i (ours[s, i] − baseline[s, i]); evaluation variance = var_i(mean_s (ours − baseline)[:, i], ddof=1) / N.
    An image with a non-finite value in any seed of either arm (the infinite PSNR of an exact reconstruction) is left
    out of every seed, so that all d_s are means over the same images. A 1-D input is one seed.
    """
    ours, baseline = (np.asarray(values, dtype=np.float64) for values in (ours, baseline))
    if ours.shape != baseline.shape:
        raise ValueError(f"the arms' per-image values differ in shape: {ours.shape} vs {baseline.shape}")
    if ours.ndim == 1:
        ours, baseline = ours[None], baseline[None]
    if ours.ndim != 2:
        raise ValueError(f"per-image values must have the shape (seeds, images), got {ours.shape}")
    keep = np.all(np.isfinite(ours) & np.isfinite(baseline), axis=0)
    differences = ours[:, keep] - baseline[:, keep]
    images = differences.shape[1]
    if images < 2:
        raise ValueError(f"an evaluation variance needs at least 2 images with finite values, got {images}")
    return differences.mean(axis=1), float(differences.mean(axis=0).var(ddof=1) / images)


def replicate_evaluation_variance(replicate_differences) -> float:
    """The evaluation variance for `seeded_difference` of a statistic that is not a per-image mean (FID): the
    variance over image resamples r of the seed-averaged replicate difference, var_r(mean_s D[s, r], ddof=1).

    `replicate_differences` (S, R): D[s, r] = statistic(ours, seed s) − statistic(baseline, seed s) on image resample
    r, the same resample r for every seed and both arms (a paired bootstrap with the same generator seed on the
    same images: draw the counts of resample r once, e.g. with FrechetBootstrap.resample, and give them to the
    FIDs of both arms in every seed). A 1-D input is one seed.
    """
    replicates = np.asarray(replicate_differences, dtype=np.float64)
    if replicates.ndim == 1:
        replicates = replicates[None]
    if replicates.ndim != 2 or replicates.shape[0] == 0 or replicates.shape[1] < 2:
        raise ValueError(f"replicate differences must have the shape (seeds, resamples >= 2), got {replicates.shape}")
    if not np.all(np.isfinite(replicates)):
        raise ValueError("replicate differences must be finite")
    return float(replicates.mean(axis=0).var(ddof=1))


def bootstrap_counts(n: int, generator: np.random.Generator) -> np.ndarray:
    """Counts (n,) of one bootstrap resample: n items drawn with replacement."""
    return generator.multinomial(n, np.full(n, 1 / n))


def order_statistic_interval(log2_values, confidence: float = CONFIDENCE) -> list[float]:
    """[2^low, 2^high]: the order statistics at the tails of `log2_values` (resamples' log2 step counts or ratios,
    some possibly ±inf), not interpolated between them: between a finite value and an infinite one there is none."""
    values = np.asarray(log2_values, dtype=np.float64)
    tail = (1 - confidence) / 2
    return [float(2 ** np.quantile(values, tail, method="lower")),
            float(2 ** np.quantile(values, 1 - tail, method="higher"))]


def log_step_trend(steps, estimates, replicates, confidence: float = CONFIDENCE) -> dict:
    """The least-squares line of `estimates` (K,), a difference (ours − baseline) measured after `steps` (K,) training
    steps, on x = log2(steps); `replicates` (R, K) the same difference on R image resamples, resample r drawn once
    for every budget (e.g. FrechetBootstrap.resample counts given to every budget's FIDs, or the same counts
    weighting every budget's per-image differences).

    Returns {"slope": change per doubling of the steps, "slope_ci95": normal interval from the replicates' slopes,
    "slope_std", "at_last": the line's value at the last budget, "crossing_steps": the step count at which the line
    reaches 0, ahead of the last budget (None when the line moves away from 0, or reached it before the last budget),
    "crossing_ci95": [2.5%, 97.5%] percentiles of the replicates' crossings, each replicate that never reaches 0
    ahead counted as infinitely far (an upper bound of inf: the data do not exclude "never"), "replicates": R}.
    A crossing beyond the last budget is an extrapolation of the line, not a measurement.
    """
    x = np.log2(np.asarray(steps, dtype=np.float64))
    estimates = np.asarray(estimates, dtype=np.float64)
    replicates = np.asarray(replicates, dtype=np.float64)
    if x.ndim != 1 or len(x) < 2 or estimates.shape != x.shape:
        raise ValueError(f"a trend needs estimates at 2 or more budgets, one per step count; got steps {x.shape}, "
                         f"estimates {estimates.shape}")
    if replicates.ndim != 2 or replicates.shape[1] != len(x) or replicates.shape[0] < 2:
        raise ValueError(f"replicates must have the shape (resamples >= 2, {len(x)}), got {replicates.shape}")
    centred = x - x.mean()
    weights = centred / (centred ** 2).sum()  # slope = weights · y, the least-squares slope of y on x

    def crossing(values: np.ndarray) -> float:
        """log2 of the steps where the line through `values` reaches 0 ahead of the last budget; inf if never."""
        slope = weights @ values
        at_last = values.mean() + slope * centred[-1]
        if slope == 0 or np.sign(slope) == np.sign(at_last):  # moving away from 0 (or already past it)
            return math.inf
        return x[-1] - at_last / slope

    slope = float(weights @ estimates)
    slopes = replicates @ weights
    slope_std = float(slopes.std(ddof=1))
    quantile = ndtri((1 + confidence) / 2)
    ahead = crossing(estimates)
    bounds = order_statistic_interval([crossing(values) for values in replicates], confidence)
    return {"slope": slope, "slope_ci95": [slope - quantile * slope_std, slope + quantile * slope_std],
            "slope_std": slope_std, "at_last": float(estimates.mean() + slope * centred[-1]),
            "crossing_steps": None if math.isinf(ahead) else float(2 ** ahead), "crossing_ci95": bounds,
            "replicates": len(replicates)}


def steps_to_reach(steps, values, level: float) -> float:
    """log2 of the training steps at which `values` (K,), a lower-is-better metric measured after `steps` (K,), first
    reaches `level`, linear in log2 steps between budgets: log2(steps[0]) where the first budget has reached it
    already (so at most that many steps), inf where no budget has."""
    x = np.log2(np.asarray(steps, dtype=np.float64))
    values = np.asarray(values, dtype=np.float64)
    reached = np.flatnonzero(values <= level)
    if len(reached) == 0:
        return math.inf
    k = int(reached[0])
    if k == 0:
        return float(x[0])
    before, after = values[k - 1], values[k]  # before > level >= after
    return float(x[k - 1] + (before - level) / (before - after) * (x[k] - x[k - 1]))


def steps_to_match(steps, ours, baseline, ours_replicates, baseline_replicates,
                   confidence: float = CONFIDENCE) -> dict:
    """How many times the baseline's steps ours needs to reach the value the baseline has at its last budget.

    ours, baseline (K,): a lower-is-better metric (gFID) of each run after `steps` (K,) training steps;
    *_replicates (R, K): the same on R resamples, resample r drawn once for every budget. In each resample the level
    is the baseline's value at its last budget, and both runs' steps to it are `steps_to_reach` (the baseline's is
    its last budget unless its curve got there earlier): the same rule for both, so two identical curves give 1.

    Returns {"level", "steps" (ours' steps to the level; None where no budget reaches it), "baseline_steps", "ratio"
    (ours' steps / the baseline's: below 1 ours converges faster), "ratio_ci95" (order statistics of the resamples'
    ratios; an upper bound of inf where more than the tail of resamples never reaches the level: the data do not
    exclude "never"), "reached" (the fraction of resamples in which ours reaches the level), "at_first_budget"
    (ours had reached it at the first budget already: its steps and the ratio are then upper bounds),
    "replicates"}.
    """
    steps = np.asarray(steps, dtype=np.float64)
    ours_replicates = np.asarray(ours_replicates, dtype=np.float64)
    baseline_replicates = np.asarray(baseline_replicates, dtype=np.float64)
    if ours_replicates.shape != baseline_replicates.shape or ours_replicates.shape[1:] != steps.shape:
        raise ValueError(f"replicates of both runs must have the shape (resamples, {len(steps)}), got "
                         f"{ours_replicates.shape} and {baseline_replicates.shape}")

    def log_ratio(ours_values, baseline_values) -> float:
        level = baseline_values[-1]
        return steps_to_reach(steps, ours_values, level) - steps_to_reach(steps, baseline_values, level)

    level = float(baseline[-1])
    ahead, base_ahead = steps_to_reach(steps, ours, level), steps_to_reach(steps, baseline, level)
    log_ratios = np.array([log_ratio(o, b) for o, b in zip(ours_replicates, baseline_replicates)])
    bounds = order_statistic_interval(log_ratios, confidence)
    return {"level": level, "steps": None if math.isinf(ahead) else float(2 ** ahead),
            "baseline_steps": float(2 ** base_ahead), "ratio": float(2 ** (ahead - base_ahead)),
            "ratio_ci95": bounds, "reached": float(np.isfinite(log_ratios).mean()),
            "at_first_budget": bool(ours[0] <= level), "replicates": len(log_ratios)}
