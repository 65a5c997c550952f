"""The nearest-centroid class probe on constructed features with known answers."""
import numpy as np
import pytest

from shared.metrics.class_probe import class_centroids, recognised_share


def clusters(generator, per_class: int, spread: float) -> tuple[np.ndarray, np.ndarray]:
    """(3 × per_class, 8) features around three far-apart class means, and their labels."""
    means = np.eye(3, 8) * 10.0
    labels = np.repeat(np.arange(3), per_class)
    return means[labels] + generator.normal(scale=spread, size=(len(labels), 8)), labels


def test_images_near_their_class_are_recognised_and_mislabelled_ones_are_not():
    generator = np.random.default_rng(0)
    reference, reference_labels = clusters(generator, 50, 1.0)
    centroids = class_centroids(reference, reference_labels, 3)
    assert centroids == pytest.approx(np.eye(3, 8) * 10.0, abs=0.6)
    samples, labels = clusters(generator, 20, 1.0)
    recognised = recognised_share(samples, labels, centroids)
    assert recognised["share"] == 1.0 and recognised["n"] == 60 and recognised["per_class"] == [1.0, 1.0, 1.0]
    assert 0.9 < recognised["ci95"][0] < 1.0  # Wilson: not collapsed to [1, 1]
    wrong = recognised_share(samples, (labels + 1) % 3, centroids)  # sampled "for" another class
    assert wrong["share"] == 0.0 and wrong["ci95"][0] == 0.0 and wrong["ci95"][1] > 0.0


def test_samples_whose_features_ignore_their_class_are_recognised_at_chance():
    generator = np.random.default_rng(1)
    centroids = class_centroids(*clusters(generator, 50, 1.0), 3)
    samples, _ = clusters(generator, 1000, 1.0)
    labels = generator.integers(0, 2, size=len(samples))  # drawn apart from the features, classes 0 and 1 only
    recognised = recognised_share(samples, labels, centroids)
    low, high = recognised["ci95"]
    assert low < 1 / 3 < high and recognised["per_class"][2] is None  # a class without samples has no share
    with pytest.raises(ValueError, match="each at least once"):
        class_centroids(samples, labels, 3)
