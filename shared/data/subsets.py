"""Evaluation subsets that represent the data: seeded, class-stratified random draws.

A split's files are listed in sorted class order, so "the first N images" of it are the first few classes only
(2,000 Imagenette training images are 2 of its 10 classes). Every evaluation that uses fewer than all the images of
a split therefore draws its images here:

    subset = evaluation_subset(cfg.data, "val", 1000, seed=0)   # .indices: sorted dataset indices, or None = all
    loader = make_image_loader(cfg.data, "val", 64, train=False, indices=subset.indices)
    record = subset.record()                                     # what the output says it measured

Each class gets its share of the subset in proportion to its share of the split (largest remainders break the
rounding), and within a class the images are drawn uniformly without replacement from a generator seeded by `seed`.
The same (data, split, size, seed) gives the same images on every machine, so two tokenizers evaluated with the same
settings see the same images and their per-image metrics pair up.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from omegaconf import DictConfig, OmegaConf

from shared.errors import DataError


def stratified_indices(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted indices of `size` items drawn per class in proportion to the class sizes of `labels` (N,).

    Class c of n_c items gets floor(size · n_c / N) items, plus one for the classes with the largest remainders
    until the total is `size` (Hamilton's apportionment), so every count is within one of its exact share.
    """
    labels = np.asarray(labels)
    total = len(labels)
    if not 0 < size <= total:
        raise ValueError(f"a subset of {size} items of {total} is not possible")
    classes, counts = np.unique(labels, return_counts=True)
    exact = size * counts / total
    quota = np.floor(exact).astype(np.int64)
    # Ties in the remainders go to the larger class, then the lower class index: deterministic without the seed.
    order = np.lexsort((classes, -counts, -(exact - quota)))
    quota[order[: size - quota.sum()]] += 1
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(labels == label), size=count, replace=False)
              for label, count in zip(classes, quota)]
    return np.sort(np.concatenate(chosen))


def dataset_labels(dataset) -> np.ndarray:
    """(N,) labels of a map-style data set of shared.data.images, read without decoding any image."""
    if hasattr(dataset, "index"):  # ImageFolder: the folder index holds them
        return dataset.index.labels
    return np.arange(len(dataset)) % dataset.num_classes  # SyntheticImages: image i has label i mod num_classes


@dataclass(frozen=True)
class EvaluationSubset:
    """Which images of `split` an evaluation uses: `indices` (sorted) or None for all `total` of them."""

    split: str
    total: int | None  # None: a stream, whose length is known only once read
    indices: np.ndarray | None
    seed: int | None

    def digest(self) -> str:
        """A short hash of the chosen indices: equal digests mean the same images."""
        chosen = np.arange(self.total) if self.indices is None else self.indices
        return hashlib.sha256(np.ascontiguousarray(chosen, dtype=np.int64).tobytes()).hexdigest()[:16]

    def record(self) -> dict:
        """What an output states about the images it measured."""
        if self.indices is None:
            return {"split": self.split, "images": self.total, "of": self.total, "selection": "all"}
        return {"split": self.split, "images": len(self.indices), "of": self.total,
                "selection": "class-stratified random subset", "seed": self.seed, "indices_sha256": self.digest()}


def evaluation_subset(data_cfg: DictConfig | Mapping, split: str, size: int | None, seed: int) -> EvaluationSubset:
    """The images of `split` an evaluation of `size` images uses (None, or at least the split's size: all)."""
    from shared.data.images import build_image_dataset

    data_cfg = data_cfg if isinstance(data_cfg, DictConfig) else OmegaConf.create(dict(data_cfg))
    if size is not None and int(size) < 1:
        raise DataError(f"an evaluation of {size} images is not possible: give a positive count, or null for all")
    if data_cfg.get("kind") == "webdataset":
        if size is not None:
            raise DataError(f"a webdataset stream has no random access, so a class-stratified subset of {size} "
                            f"images cannot be drawn from it: evaluate the whole {split} split (set the image count "
                            f"to null) or use data=imagefolder")
        return EvaluationSubset(split, None, None, None)
    dataset = build_image_dataset(data_cfg, split)
    if size is None or int(size) >= len(dataset):
        return EvaluationSubset(split, len(dataset), None, None)
    return EvaluationSubset(split, len(dataset), stratified_indices(dataset_labels(dataset), int(size), seed), seed)
