"""stage=sample's classes by name (stage2_ldm/classes.py): sample.labels as names or wnids, and the labelled grid."""
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from shared.config_check import config_problems
from shared.data.image_files import open_images, write_npz
from shared.errors import ConfigError
from stage2_ldm.classes import ClassNames
from stage2_ldm.sample import labels_to_sample, save_class_grid
from tests.helpers import load_config

WNIDS = ("n01440764", "n02102040", "n02979186")
NAMES = ("tench", "English springer", "cassette player")
IMAGENETTE = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenette2-224"


def image_folder(root: Path, class_map: bool) -> OmegaConf:
    """An ImageNet-layout training folder, one tiny PNG per class, and its data config (with a class map naming
    the classes, or without: then the wnids are the names)."""
    for wnid in WNIDS:
        (root / "train" / wnid).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / "train" / wnid / "0.png")
    table = root / "classes.tsv"
    table.write_text("wnid\tindex\tname\n" + "".join(f"{w}\t{i}\t{n}\n" for i, (w, n) in enumerate(zip(WNIDS, NAMES))))
    return OmegaConf.create({"kind": "imagefolder", "root": str(root), "resolution": 8, "train_split": "train",
                             "val_split": "val", "class_map": str(table) if class_map else None, "num_classes": None,
                             "random_flip": False, "num_workers": 0})


def sample_section(labels) -> OmegaConf:
    return OmegaConf.create({"labels": labels, "num_per_class": 1})


def test_labels_are_indices_wnids_or_names_in_any_case(tmp_path):
    classes = ClassNames.of_data(image_folder(tmp_path, class_map=True), num_classes=3)
    labels = labels_to_sample(sample_section([2, "tench", "N02102040", "english springer"]), 3, classes)
    assert labels.tolist() == [2, 0, 1, 1]
    assert classes.label(1) == "1 English springer"


def test_without_a_class_map_the_names_are_the_wnids(tmp_path):
    classes = ClassNames.of_data(image_folder(tmp_path, class_map=False), num_classes=3)
    assert labels_to_sample(sample_section(["n02979186"]), 3, classes).tolist() == [2]
    assert classes.label(0) == "0 n01440764"


def test_an_unknown_name_is_one_config_error_listing_known_ones(tmp_path):
    classes = ClassNames.of_data(image_folder(tmp_path, class_map=True), num_classes=3)
    with pytest.raises(ConfigError, match="no class 'goldfish'") as error:
        labels_to_sample(sample_section(["tench", "goldfish"]), 3, classes)
    assert "tench, English springer, cassette player" in str(error.value) and "\n" not in str(error.value)


def test_a_name_of_two_classes_must_be_given_as_an_index():
    classes = ClassNames(["crane", "crane", "tench"], {})
    with pytest.raises(ConfigError, match=r"'crane' names classes \[0, 1\]"):
        classes.index("crane")


def test_names_need_the_dits_data(tmp_path):
    with pytest.raises(ConfigError, match="3 classes and the DiT 1000"):
        ClassNames.of_data(image_folder(tmp_path, class_map=False), num_classes=1000)
    with pytest.raises(ConfigError, match="names classes"):
        labels_to_sample(sample_section(["tench"]), 1000, None)


def test_imagenette_classes_by_name():
    if not (IMAGENETTE / "train").is_dir():
        pytest.skip(f"the Imagenette subset is not at {IMAGENETTE}")
    data = load_config(["experiment=imagenette_mini", f"data.class_map={IMAGENETTE / 'classes.tsv'}"]).data
    classes = ClassNames.of_data(data, num_classes=702)  # ImageNet-1k indices up to parachute's 701
    assert [classes.index(name) for name in ("tench", "n03888257", "golf ball")] == [0, 701, 574]


def test_the_config_accepts_class_names_as_labels():
    assert config_problems(load_config(["stage=sample", "sample.labels=[3,tench,n01440764]"])) == []
    assert config_problems(load_config(["stage=sample", "sample.labels=[-1]"])) == [
        "sample.labels.0=-1 must be a whole number >= 0, or a name"]


def test_the_class_grid_writes_each_rows_class_beside_it(tmp_path):
    labels = torch.tensor([0, 0, 2, 2, 1, 1])
    samples = open_images(write_npz(tmp_path / "samples.npz", torch.zeros(6, 3, 16, 16), labels))
    save_class_grid(samples, labels, tmp_path / "plain.png", None)
    save_class_grid(samples, labels, tmp_path / "named.png", ClassNames(list(NAMES), {}))
    plain, named = (np.asarray(Image.open(tmp_path / f"{kind}.png")) for kind in ("plain", "named"))
    grid_width = 2 + 2 * 18  # two samples per class, 16 px each with 2 px gaps
    assert plain.shape[0] == named.shape[0] == 2 + 3 * 18
    assert named.shape[1] - grid_width > plain.shape[1] - grid_width > 0  # names take a wider column than indices
    column = named[:, : named.shape[1] - grid_width].max(axis=(1, 2))  # the brightest pixel of each line
    for row in range(3):
        assert column[2 + row * 18 : 2 + (row + 1) * 18].max() > 128  # text beside every row
