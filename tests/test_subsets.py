"""Evaluation subsets: seeded, class-stratified, every class in proportion, the same images on every call."""
import numpy as np
import pytest

from shared.data.images import make_image_loader
from shared.data.subsets import evaluation_subset, stratified_indices
from shared.errors import DataError
from tests.helpers import load_config


def class_ordered_labels() -> np.ndarray:
    """A split listed in sorted class order with unequal classes, as an ImageNet folder is."""
    return np.repeat(np.arange(5), [300, 250, 200, 150, 100])


@pytest.mark.parametrize("size", [10, 99, 333, 999])
def test_every_class_is_in_the_subset_in_proportion(size):
    labels = class_ordered_labels()
    chosen = stratified_indices(labels, size, seed=0)
    assert len(chosen) == size and len(np.unique(chosen)) == size and np.all(np.diff(chosen) > 0)
    counts = np.bincount(labels[chosen], minlength=5)
    exact = size * np.bincount(labels) / len(labels)
    assert np.all(np.abs(counts - exact) < 1)  # each class within one image of its exact share


def test_the_subset_is_random_within_classes_and_fixed_by_its_seed():
    labels = class_ordered_labels()
    first = stratified_indices(labels, 100, seed=0)
    np.testing.assert_array_equal(first, stratified_indices(labels, 100, seed=0))
    assert not np.array_equal(first, stratified_indices(labels, 100, seed=1))
    # not the first files of each class: a truncation would take indices 0..29 of class 0
    assert not np.array_equal(first[labels[first] == 0], np.arange(30))


def test_impossible_sizes_are_refused():
    with pytest.raises(ValueError):
        stratified_indices(class_ordered_labels(), 0, seed=0)
    with pytest.raises(ValueError):
        stratified_indices(class_ordered_labels(), 1001, seed=0)


def test_evaluation_subset_of_synthetic_data_and_its_record(tmp_path):
    cfg = load_config(["data=synthetic", "data.val_size=100"], tmp_path)
    subset = evaluation_subset(cfg.data, "val", 30, seed=3)
    record = subset.record()
    assert record["images"] == 30 and record["of"] == 100 and record["seed"] == 3
    assert record["selection"] == "class-stratified random subset"
    assert record["indices_sha256"] == evaluation_subset(cfg.data, "val", 30, seed=3).digest()
    batches = list(make_image_loader(cfg.data, "val", 8, train=False, indices=subset.indices))
    labels = np.concatenate([batch["label"].numpy() for batch in batches])
    np.testing.assert_array_equal(labels, subset.indices % 10)  # the loader reads exactly the chosen images
    assert np.all(np.bincount(labels, minlength=10) == 3)
    whole = evaluation_subset(cfg.data, "val", None, seed=3)
    assert whole.indices is None and whole.record()["selection"] == "all"
    assert evaluation_subset(cfg.data, "val", 500, seed=3).indices is None  # more than there are: all of them


def test_a_stream_cannot_be_subsampled_by_class(tmp_path):
    cfg = load_config(["data=webdataset", "data.train_urls=/nowhere/shard.tar"], tmp_path)
    with pytest.raises(DataError, match="stratified subset"):
        evaluation_subset(cfg.data, "train", 100, seed=0)
    assert evaluation_subset(cfg.data, "train", None, seed=0).indices is None


def test_the_imagenet_subset_is_stratified_across_its_classes(tmp_path, imagenette):
    cfg = load_config(["data=imagefolder", f"data.root={imagenette}"], tmp_path)
    subset = evaluation_subset(cfg.data, "train", 2000, seed=0)
    from shared.data.images import build_image_dataset

    labels = build_image_dataset(cfg.data, "train").index.labels
    counts = np.bincount(labels[subset.indices], minlength=10)
    assert np.all(np.abs(counts - 2000 * np.bincount(labels) / len(labels)) < 1)  # not 2 classes of 10
