"""Interval maths on constructed inputs with known answers, and the verdict rule."""
import math

import numpy as np
import pytest
from scipy import stats

from shared.metrics.fid import feature_statistics, frechet_distance
from shared.metrics.fid_bootstrap import FrechetBootstrap, difference
from shared.metrics.intervals import (log_step_trend, mean_interval, normal_interval, paired_image_differences,
                                      proportion_interval, replicate_evaluation_variance, seeded_difference,
                                      seeded_difference_of_differences, steps_to_match, steps_to_reach, verdict)


def test_mean_interval_of_a_textbook_sample():
    # 1..5: mean 3, s = sqrt(2.5), t(0.975, 4) = 2.7764451 -> half width 2.7764451 * sqrt(2.5) / sqrt(5) = 1.9632
    interval = mean_interval([1, 2, 3, 4, 5])
    assert interval["mean"] == 3 and interval["n"] == 5
    assert interval["ci95"] == pytest.approx([3 - 1.963243, 3 + 1.963243], abs=1e-5)
    assert mean_interval([2.0, np.inf, 4.0])["n"] == 2  # a perfect reconstruction's infinite PSNR is left out
    assert mean_interval([7.0])["ci95"] is None and mean_interval([])["mean"] is None


def test_mean_interval_covers_the_true_mean_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    covered = [low <= 1.5 <= high for low, high in
               (mean_interval(rng.normal(1.5, 2.0, size=12))["ci95"] for _ in range(2000))]
    assert abs(np.mean(covered) - 0.95) < 0.015


@pytest.mark.parametrize("successes, n", [(0, 10), (3, 10), (10, 10), (81, 263), (499, 500)])
def test_proportion_interval_is_wilsons(successes, n):
    expected = stats.binomtest(successes, n).proportion_ci(0.95, method="wilson")
    assert proportion_interval(successes, n) == pytest.approx([expected.low, expected.high], abs=1e-9)
    assert proportion_interval(0, 0) is None


def test_normal_interval_and_verdicts():
    assert normal_interval(10.0, 1.0) == pytest.approx([8.04, 11.96], abs=1e-3)
    assert verdict([-3.0, -1.0], "lower") == "reproduced"
    assert verdict([1.0, 3.0], "lower") == "contradicted"
    assert verdict([-1.0, 3.0], "lower") == "inconclusive"
    assert verdict([0.5, 2.0], "higher") == "reproduced"
    assert verdict([-2.0, -0.5], "higher") == "contradicted"
    assert verdict(None, "higher") == "inconclusive"
    with pytest.raises(ValueError):
        verdict([0.0, 1.0], "sideways")


@pytest.mark.parametrize("count, dim", [(30, 48), (60, 12)])  # the Gram path (n <= D) and the covariance path
def test_bootstrap_fids_equal_the_fids_of_the_resampled_images(count, dim):
    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(count, dim)), rng.normal(0.3, 1.2, size=(count, dim))
    mu, sigma = feature_statistics(rng.normal(size=(500, dim)))
    against_reference = FrechetBootstrap(fake, reference=(mu, sigma))
    paired = FrechetBootstrap(fake, real=real)
    assert against_reference.fid() == pytest.approx(frechet_distance(mu, sigma, *feature_statistics(fake)), rel=1e-6)
    assert paired.fid() == pytest.approx(frechet_distance(*feature_statistics(real), *feature_statistics(fake)),
                                         rel=1e-6)
    counts = against_reference.resample(np.random.default_rng(2))
    rows = np.repeat(np.arange(count), counts.numpy().astype(int))
    assert counts.sum() == count
    assert against_reference.fid(counts) == pytest.approx(
        frechet_distance(mu, sigma, *feature_statistics(fake[rows])), rel=1e-6)
    assert paired.fid(counts) == pytest.approx(
        frechet_distance(*feature_statistics(real[rows]), *feature_statistics(fake[rows])), rel=1e-6)


def test_each_reference_gets_its_own_root_when_several_are_in_use():
    # the root of a reference's covariance is kept between sample sets: a different reference (even one differing
    # in a single entry, or more references than are kept) must not be measured with another one's root
    rng = np.random.default_rng(4)
    fake = rng.normal(size=(12, 16))  # fewer images than dimensions: the path that uses the root
    references = [feature_statistics(rng.normal(scale, 1.0, size=(200, 16))) for scale in (0.0, 0.5, 1.0, 1.5, 2.0, 2.5)]
    nudged_sigma = references[0][1].copy()
    nudged_sigma[3, 3] += 0.5
    references.append((references[0][0], nudged_sigma))
    for mu, sigma in references * 2:
        assert FrechetBootstrap(fake, reference=(mu, sigma)).fid() == pytest.approx(
            frechet_distance(mu, sigma, *feature_statistics(fake)), rel=1e-6)


def test_bootstrap_spread_shrinks_with_more_samples_and_differences_of_equal_sets_vanish():
    rng = np.random.default_rng(3)
    mu, sigma = np.zeros(8), np.eye(8)
    small = FrechetBootstrap(rng.normal(size=(40, 8)), reference=(mu, sigma)).spread(100, seed=0)
    large = FrechetBootstrap(rng.normal(size=(640, 8)), reference=(mu, sigma)).spread(100, seed=0)
    assert large["std"] < small["std"] / 2  # about 1/sqrt(16) of it
    assert small["ci95"] == pytest.approx(normal_interval(small["fid"], small["std"]))
    real, fake = rng.normal(size=(50, 8)), rng.normal(size=(50, 8))
    same = difference(FrechetBootstrap(fake, real=real), FrechetBootstrap(fake.copy(), real=real), paired=True,
                      resamples=20)
    assert same["difference"] == pytest.approx(0, abs=1e-9) and same["std"] == pytest.approx(0, abs=1e-9)
    shifted = difference(FrechetBootstrap(fake + 1.0, reference=(mu, sigma)), FrechetBootstrap(fake, reference=(mu, sigma)),
                         paired=False, resamples=50)
    assert verdict(shifted["ci95"], "lower") == "contradicted"  # moving the samples off the reference is worse


def two_arm_experiments(experiments, seeds, images, *, seed_std, image_std, interaction_std, difference, rng):
    """Per-image metric values (experiments, seeds, images) of two arms from a two-level model: the arms share each
    image's difficulty; ours − baseline = difference + seed effect u_s + image effect v_i + seed × image noise."""
    difficulty = rng.normal(30.0, 3.0, size=(experiments, 1, images))
    baseline = difficulty + rng.normal(0, interaction_std / np.sqrt(2), size=(experiments, seeds, images))
    ours = (difficulty + difference + rng.normal(0, seed_std, size=(experiments, seeds, 1))
            + rng.normal(0, image_std, size=(experiments, 1, images))
            + rng.normal(0, interaction_std / np.sqrt(2), size=(experiments, seeds, images)))
    return ours, baseline


@pytest.mark.parametrize("seed_std", [0.2, 0.6])
def test_seeded_difference_covers_the_true_difference_and_an_image_only_interval_does_not(seed_std):
    # S = 3, N = 200, image part σ²_v/N = 0.02 beside a seed part σ²_u/S of 0.013 (alike) or 0.12 (6 x, where an
    # interval of √(a + b) with a Welch–Satterthwaite ν covers only ~92%); the seed-averaged per-image differences
    # alone (mean_interval) cover far less.
    truth = 0.5
    ours, baseline = two_arm_experiments(2000, 3, 200, seed_std=seed_std, image_std=2.0, interaction_std=1.0,
                                         difference=truth, rng=np.random.default_rng(0))
    seeded, image_only = [], []
    for ours_values, baseline_values in zip(ours, baseline):
        low, high = seeded_difference(*paired_image_differences(ours_values, baseline_values))["ci95"]
        seeded.append(low <= truth <= high)
        low, high = mean_interval((ours_values - baseline_values).mean(axis=0))["ci95"]
        image_only.append(low <= truth <= high)
    assert 0.94 <= np.mean(seeded) <= 0.99
    assert np.mean(image_only) < 0.91 and np.mean(seeded) - np.mean(image_only) > 0.04


def test_without_seed_variance_the_interval_is_the_normal_interval_of_the_evaluation_part():
    result = seeded_difference([0.4, 0.4, 0.4], 0.01)
    assert result["ci95"] == pytest.approx(normal_interval(0.4, 0.1))
    assert result["dof"] == 2 and result["seed_variance"] == 0 and result["evaluation_std"] == pytest.approx(0.1)
    # per-image values whose ours − baseline has no seed part: the same d_s (up to rounding) in every seed
    rng = np.random.default_rng(4)
    baseline = rng.normal(25.0, 2.0, size=(3, 50))
    effect = rng.normal(0.5, 1.0, size=50)
    differences, evaluation_variance = paired_image_differences(baseline + effect, baseline)
    assert evaluation_variance == pytest.approx(effect.var(ddof=1) / 50)
    assert seeded_difference(differences, evaluation_variance)["ci95"] == pytest.approx(
        normal_interval(effect.mean(), np.sqrt(evaluation_variance)))


def test_without_evaluation_variance_the_interval_is_the_student_t_interval_over_seeds():
    differences = [0.9, 1.4, 0.6, 1.1]
    result = seeded_difference(differences, 0.0)
    assert result["ci95"] == pytest.approx(mean_interval(differences)["ci95"])
    assert result["dof"] == pytest.approx(3) and result["seeds"] == 4 and result["evaluation_std"] == 0
    assert result["seed_std"] == pytest.approx(np.std(differences, ddof=1))
    # both parts, each with its own quantile: t with S − 1 dof for the seeds, normal for the evaluation
    both = seeded_difference(differences, 0.01)
    a = np.var(differences, ddof=1) / 4
    assert both["seed_variance"] == pytest.approx(a) and both["std"] == pytest.approx(np.sqrt(a + 0.01))
    half_width = np.sqrt(stats.t.ppf(0.975, 3) ** 2 * a + stats.norm.ppf(0.975) ** 2 * 0.01)
    assert both["ci95"] == pytest.approx([np.mean(differences) - half_width, np.mean(differences) + half_width])
    # more evaluation variance never narrows the interval
    widths = [np.diff(seeded_difference(differences, b)["ci95"])[0] for b in (0.0, 0.001, 0.01, 0.1)]
    assert widths == sorted(widths)


def test_a_single_seed_is_flagged_and_uses_the_evaluation_part_alone():
    result = seeded_difference([0.7], 0.04)
    assert result["seeds"] == 1 and result["seed_variance"] is None and result["seed_std"] is None
    assert result["dof"] is None and result["ci95"] == pytest.approx(normal_interval(0.7, 0.2))
    differences, evaluation_variance = paired_image_differences([3.0, 5.0, 4.0], [1.0, 2.0, 3.0])  # one seed, 1-D
    assert differences == pytest.approx([2.0]) and evaluation_variance == pytest.approx(1.0 / 3)
    assert seeded_difference(differences, evaluation_variance)["seeds"] == 1


def test_paired_image_differences_average_over_the_same_finite_images():
    ours = np.array([[3.0, 5.0, np.inf, 6.0], [4.0, 4.0, 7.0, 8.0]])
    baseline = np.array([[1.0, 2.0, 3.0, 3.0], [1.0, 3.0, 5.0, 4.0]])
    differences, evaluation_variance = paired_image_differences(ours, baseline)
    # image 2 is left out of both seeds: d = [mean(2, 3, 3), mean(3, 1, 4)], seed-averaged per image (2.5, 2, 3.5)
    assert differences == pytest.approx([8 / 3, 8 / 3])
    assert evaluation_variance == pytest.approx(np.var([2.5, 2.0, 3.5], ddof=1) / 3)
    with pytest.raises(ValueError):
        paired_image_differences(ours, baseline[:, :3])
    with pytest.raises(ValueError):
        paired_image_differences([[1.0, np.nan]], [[0.0, 0.0]])
    with pytest.raises(ValueError):
        seeded_difference([], 0.1)
    with pytest.raises(ValueError):
        seeded_difference([1.0, 2.0], -0.1)


def test_replicate_evaluation_variance_is_the_variance_of_the_seed_averaged_replicates():
    rng = np.random.default_rng(5)
    shift = rng.normal(size=100)  # the image resample's effect on the difference, shared by the seeds
    replicates = np.array([1.0, 2.0, 4.0])[:, None] + shift[None, :] * np.array([0.5, 1.0, 1.5])[:, None]
    assert replicate_evaluation_variance(replicates) == pytest.approx(shift.var(ddof=1))
    # seeds whose resample effects cancel: the seed average does not move, whatever each seed's own spread
    assert replicate_evaluation_variance(np.stack([shift, -shift])) == pytest.approx(0, abs=1e-12)
    assert replicate_evaluation_variance(shift) == pytest.approx(shift.var(ddof=1))  # one seed
    with pytest.raises(ValueError):
        replicate_evaluation_variance(np.ones((3, 1)))


def test_verdicts_of_seeded_differences():
    # PSNR (higher is better): a clear win, a clear loss, a tie
    assert verdict(seeded_difference([1.0, 1.2, 0.9], 0.01)["ci95"], "higher") == "reproduced"
    assert verdict(seeded_difference([-1.0, -1.2, -0.9], 0.01)["ci95"], "higher") == "contradicted"
    assert verdict(seeded_difference([0.3, -0.2, 0.1], 0.01)["ci95"], "higher") == "inconclusive"
    # FID (lower is better), the evaluation part from paired-bootstrap replicates
    replicates = np.array([-2.0, -2.5, -1.8])[:, None] + np.random.default_rng(6).normal(0, 0.3, size=(1, 200))
    fid = seeded_difference(replicates.mean(axis=1), replicate_evaluation_variance(replicates))
    assert verdict(fid["ci95"], "lower") == "reproduced"
    assert verdict(seeded_difference([2.0, 2.5, 1.8], fid["evaluation_std"] ** 2)["ci95"], "lower") == "contradicted"
    # seeds that disagree: the images alone would call it, the seeds do not
    assert verdict(normal_interval(np.mean([1.0, 0.1, 0.6]), 0.05), "higher") == "reproduced"
    assert verdict(seeded_difference([1.0, 0.1, 0.6], 0.0025)["ci95"], "higher") == "inconclusive"


def test_a_difference_of_seeded_differences_adds_the_seed_parts_and_borrows_a_missing_one():
    high, low = np.array([-3.0, -2.0, -2.6]), np.array([-1.0, -1.4, -0.7])
    both = seeded_difference_of_differences(high, low, 0.02)
    parts = [np.var(high, ddof=1) / 3, np.var(low, ddof=1) / 3]
    dof = sum(parts) ** 2 / sum(part ** 2 / 2 for part in parts)
    half_width = np.sqrt(stats.t.ppf(0.975, dof) ** 2 * sum(parts) + stats.norm.ppf(0.975) ** 2 * 0.02)
    assert both["estimate"] == pytest.approx(high.mean() - low.mean()) and both["dof"] == pytest.approx(dof)
    assert both["ci95"] == pytest.approx([both["estimate"] - half_width, both["estimate"] + half_width])
    assert not both["borrowed_seed_variance"] and both["seeds"] == 3
    # a lower group without spread: the same interval as the higher group's own seeded difference
    flat = seeded_difference_of_differences(high, np.zeros(3), 0.02)
    assert flat["ci95"] == pytest.approx(seeded_difference(high, 0.02)["ci95"])
    # one seed at the higher compression: it takes the lower group's seed variance, with that group's dof
    single = seeded_difference_of_differences([-2.5], low, 0.02)
    borrowed = np.var(low, ddof=1) * (1 + 1 / 3)
    half_width = np.sqrt(stats.t.ppf(0.975, 2) ** 2 * borrowed + stats.norm.ppf(0.975) ** 2 * 0.02)
    assert single["borrowed_seed_variance"] and single["seed_variance"] == pytest.approx(borrowed)
    assert single["ci95"] == pytest.approx([-2.5 - low.mean() - half_width, -2.5 - low.mean() + half_width])
    # one seed in both: the evaluation part alone, flagged as ignoring seed variance
    alone = seeded_difference_of_differences([-2.5], [-1.0], 0.04)
    assert alone["seeds"] == 1 and alone["seed_variance"] is None
    assert alone["ci95"] == pytest.approx(normal_interval(-1.5, 0.2))


BUDGETS = np.array([600, 1200, 2400, 4800, 9600])


def per_image_trend(slope: float, intercept: float, images: int, seed: int, resamples: int = 200) -> dict:
    """log_step_trend of per-image differences d_ik = intercept + slope·log2(steps_k / 600) + v_i + e_ik (v_i an
    image's lasting offset, the same at every budget; e_ik its budget-to-budget noise), with replicates from image
    resamples drawn once for all budgets, as the budget stage makes them."""
    generator = np.random.default_rng(seed)
    line = intercept + slope * np.log2(BUDGETS / 600)
    per_image = line[:, None] + generator.normal(0, 2.0, images)[None] + generator.normal(0, 1.0, (5, images))
    counts = generator.multinomial(images, np.full(images, 1 / images), size=resamples)  # (R, N)
    return log_step_trend(BUDGETS, per_image.mean(axis=1), counts @ per_image.T / images)


def test_a_trend_recovers_the_slope_and_extrapolates_where_the_line_reaches_zero():
    exact = log_step_trend(BUDGETS, 4.0 - 0.5 * np.log2(BUDGETS / 600),
                           np.tile(4.0 - 0.5 * np.log2(BUDGETS / 600), (10, 1)) + np.arange(10)[:, None] * 0.01)
    # 4 at 600 steps, 0.5 less per doubling: 0 after 8 doublings, at 600 · 2⁸ steps. A shift common to all budgets
    # (an image resample that favours one arm at every budget) moves no slope.
    assert exact["slope"] == pytest.approx(-0.5) and exact["slope_std"] == pytest.approx(0, abs=1e-12)
    assert exact["at_last"] == pytest.approx(2.0) and exact["crossing_steps"] == pytest.approx(600 * 2 ** 8)
    noisy = per_image_trend(-0.5, 4.0, images=400, seed=0)
    assert noisy["slope_ci95"][0] < -0.5 < noisy["slope_ci95"][1] < 0
    assert noisy["crossing_ci95"][0] < noisy["crossing_steps"] < noisy["crossing_ci95"][1]


def test_a_difference_that_grows_never_reaches_zero_ahead():
    growing = per_image_trend(0.5, 1.0, images=400, seed=1)
    assert growing["crossing_steps"] is None and growing["crossing_ci95"][1] == np.inf
    flat = per_image_trend(0.0, 1.0, images=400, seed=2)  # no trend: "never" is not excluded
    assert flat["slope_ci95"][0] < 0 < flat["slope_ci95"][1] and flat["crossing_ci95"][1] == np.inf


def test_the_slope_interval_covers_the_true_slope_95_percent_of_the_time():
    covered = [(lambda ci: ci[0] < -0.3 < ci[1])(per_image_trend(-0.3, 2.0, images=100, seed=seed)["slope_ci95"])
               for seed in range(300)]
    assert 0.92 <= np.mean(covered) <= 0.98


def test_a_trend_needs_two_budgets_and_replicates_of_each():
    with pytest.raises(ValueError, match="2 or more budgets"):
        log_step_trend([600], [1.0], np.zeros((5, 1)))
    with pytest.raises(ValueError, match="replicates"):
        log_step_trend(BUDGETS, np.zeros(5), np.zeros((5, 4)))


def test_steps_to_reach_interpolates_in_log_steps():
    steps, values = [300, 600, 1200, 2400], [100.0, 80.0, 60.0, 40.0]
    assert 2 ** steps_to_reach(steps, values, 70.0) == pytest.approx(600 * 2 ** 0.5)  # half way, in log2 steps
    assert 2 ** steps_to_reach(steps, values, 60.0) == pytest.approx(1200)
    assert 2 ** steps_to_reach(steps, values, 150.0) == pytest.approx(300)  # reached at the first budget already
    assert steps_to_reach(steps, values, 30.0) == math.inf


def test_steps_to_match_finds_the_faster_run_and_says_when_one_never_gets_there():
    steps = np.array([300, 600, 1200, 2400])
    doublings = np.log2(steps / 300)
    baseline = 200 - 30 * doublings  # 200, 170, 140, 110
    faster = 170 - 30 * doublings  # one doubling ahead: the baseline's 110 at 1,200 steps
    rng = np.random.default_rng(0)
    shared = rng.normal(0, 2, size=(400, 1))  # resample noise common to every budget and both runs
    baseline_reps = baseline + shared + rng.normal(0, 2, size=(400, 4))
    faster_reps = faster + shared + rng.normal(0, 2, size=(400, 4))
    found = steps_to_match(steps, faster, baseline, faster_reps, baseline_reps)
    assert found["level"] == 110 and found["steps"] == pytest.approx(1200) and found["ratio"] == pytest.approx(0.5)
    assert found["ratio_ci95"][0] < 0.5 < found["ratio_ci95"][1] < 1 and found["reached"] == 1.0
    assert verdict([bound - 1 for bound in found["ratio_ci95"]], "lower") == "reproduced"
    slower = baseline + 40  # never reaches the baseline's last value
    never = steps_to_match(steps, slower, baseline, slower + shared + rng.normal(0, 2, size=(400, 4)), baseline_reps)
    assert never["steps"] is None and never["ratio"] == math.inf and never["reached"] == 0.0
    assert verdict([bound - 1 for bound in never["ratio_ci95"]], "lower") == "contradicted"
    ahead = steps_to_match(steps, baseline - 200, baseline, baseline_reps - 200, baseline_reps)
    assert ahead["at_first_budget"] and ahead["ratio"] == pytest.approx(300 / 2400)
    # identical runs need the same steps whatever the curve's shape, a plateau and an uptick at the end included
    for curve in (baseline, np.array([100.0, 60.0, 50.0, 52.0])):
        replicates = curve + shared + rng.normal(0, 2, size=(400, 4))
        same = steps_to_match(steps, curve, curve, replicates, replicates)
        assert same["ratio"] == 1.0 and same["ratio_ci95"] == [1.0, 1.0]
        assert verdict([bound - 1 for bound in same["ratio_ci95"]], "lower") == "inconclusive"
