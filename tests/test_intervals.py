"""Interval maths on constructed inputs with known answers, and the verdict rule."""
import numpy as np
import pytest

from shared.metrics.fid import feature_statistics, frechet_distance
from shared.metrics.fid_bootstrap import FrechetBootstrap, difference
from shared.metrics.intervals import mean_interval, normal_interval, verdict


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
