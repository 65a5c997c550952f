"""Do class-conditional samples show their class? A nearest-centroid probe on Inception pool features.

Each class's centroid is the mean pool feature of its reference images (the training images a gFID is measured
against). An image is recognised when its feature lies nearer (Euclidean) the centroid of its class (the class it was
sampled for, or a real image's label) than any other centroid. The share recognised, with its 95% Wilson interval,
reads against real validation images' share (what the probe recognises at all) and chance (1 / classes). It puts a
number on what a one-row-per-class grid shows by eye; it is a probe, not a trained classifier, and an image can carry
its class's colours and textures without a recognisable object.
"""
from __future__ import annotations

import numpy as np

from shared.metrics.intervals import proportion_interval


def covers_every_class(labels: np.ndarray, num_classes: int) -> bool:
    """Whether the (N,) `labels` are classes 0..num_classes − 1 with every class at least once."""
    counts = np.bincount(labels, minlength=num_classes)
    return counts.size == num_classes and bool(counts.all())


def class_centroids(features: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, D) mean feature of each class of (N, D) `features` with (N,) `labels`; every class needs an image."""
    counts = np.bincount(labels, minlength=num_classes)
    if not covers_every_class(labels, num_classes):
        raise ValueError(f"labels must cover the classes 0..{num_classes - 1}, each at least once (counts {counts})")
    sums = np.zeros((num_classes, features.shape[1]))
    np.add.at(sums, labels, features.astype(np.float64))
    return sums / counts[:, None]


def recognised_share(features: np.ndarray, labels: np.ndarray, centroids: np.ndarray) -> dict:
    """{"share", "ci95", "n", "per_class"}: the share of the (N, D) `features` nearest the centroid of their (N,)
    `labels` among the (C, D) `centroids`, its 95% Wilson interval, and each class's share (None without images)."""
    features = features.astype(np.float64)
    # (N, C) squared distances, the |x|² term left out: it is the same for every centroid of a row
    distances = (centroids ** 2).sum(axis=1)[None, :] - 2 * features @ centroids.T
    recognised = distances.argmin(axis=1) == labels
    per_class = [float(recognised[labels == c].mean()) if (labels == c).any() else None
                 for c in range(len(centroids))]
    return {"share": float(recognised.mean()), "ci95": proportion_interval(int(recognised.sum()), len(labels)),
            "n": len(labels), "per_class": per_class}
