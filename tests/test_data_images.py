"""The image data layer: transforms, the synthetic set, image folders (real Imagenette and broken files), resume."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shared.data import build_image_dataset, make_image_loader
from shared.data.image_folder import read_class_map
from shared.data.synthetic import SyntheticImages
from shared.data.transforms import center_crop_adm, preprocess
from shared.errors import DataError

IMAGENETTE = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenette2-224"
GREYSCALE_FILE = "n01440764/n01440764_15560.JPEG"  # one of the 242 mode-"L" images of Imagenette's val split


def jpeg_bytes(seed: int, size=(40, 30), mode="RGB") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, "JPEG")
    return buffer.getvalue()


def make_folder(root: Path, split="train", classes=("n001", "n002"), per_class=5) -> list[Path]:
    """An ImageNet-layout folder of real (random-pixel) JPEGs; returns the files."""
    files = []
    for c, wnid in enumerate(classes):
        (root / split / wnid).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = root / split / wnid / f"{wnid}_{i}.JPEG"
            path.write_bytes(jpeg_bytes(100 * c + i))
            files.append(path)
    return files


def folder_cfg(root: Path, **overrides) -> dict:
    return {"kind": "imagefolder", "root": str(root), "resolution": 16, "train_split": "train", "val_split": "val",
            "class_map": None, "num_classes": None, "random_flip": True, "num_workers": 0, **overrides}


def synthetic_cfg(**overrides) -> dict:
    return {"kind": "synthetic", "resolution": 16, "num_classes": 10, "train_size": 40, "val_size": 20, "seed": 0,
            "random_flip": True, "num_workers": 0, **overrides}


def collect(loader, num_batches=None):
    batches = []
    for batch in loader:
        batches.append(batch)
        if num_batches is not None and len(batches) == num_batches:
            break
    return batches


# ------------------------------------------------------------------------------------------- transforms
def test_adm_crop_keeps_the_centre_of_a_wide_image():
    # three vertical bands: red | green | blue; the centre crop of a 3:1 image sees only green
    bands = np.zeros((100, 300, 3), dtype=np.uint8)
    bands[:, :100, 0] = bands[:, 100:200, 1] = bands[:, 200:, 2] = 255
    crop = center_crop_adm(Image.fromarray(bands), 32)
    assert crop.size == (32, 32)
    pixels = np.asarray(crop).astype(int)
    assert pixels[..., 1].min() > 200 and pixels[..., 0].max() < 60 and pixels[..., 2].max() < 60


def test_preprocess_converts_to_rgb_range_and_flips():
    ramp = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (48, 1))  # greyscale, brighter to the right
    image = Image.fromarray(ramp, mode="L")
    x = preprocess(image, 24)
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32
    assert -1 <= x.min() and x.max() <= 1 and x[:, :, -1].mean() > x[:, :, 0].mean()
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    assert torch.equal(preprocess(image, 24, flip=True), x.flip(-1))


# ------------------------------------------------------------------------------------------- synthetic
def test_synthetic_is_deterministic_labelled_and_in_range():
    dataset = build_image_dataset(synthetic_cfg(resolution=24), "train")
    assert len(dataset) == 40 and dataset.num_classes == 10 and len(set(dataset.class_names)) == 10
    again = SyntheticImages(40, 24, num_classes=10, seed=0, split="train")
    for index in (0, 7, 39):
        item = dataset[index]
        assert item["label"] == index % 10
        assert item["image"].shape == (3, 24, 24) and -1 <= item["image"].min() and item["image"].max() <= 1
        assert torch.equal(item["image"], again[index]["image"])
        assert torch.equal(dataset[(index, True)]["image"], item["image"].flip(-1))
    assert not torch.equal(dataset[0]["image"], SyntheticImages(40, 24, seed=1)[0]["image"])
    assert not torch.equal(dataset[0]["image"], SyntheticImages(40, 24, split="val")[0]["image"])


def test_a_synthetic_split_kept_in_memory_gives_what_a_drawn_one_gives(monkeypatch):
    kept = SyntheticImages(40, 24)
    for index in (3, 3, 17):  # the second read of 3 comes from memory
        assert torch.equal(kept[(index, True)]["image"], kept[(index, True)]["image"])
    monkeypatch.setattr("shared.data.synthetic.DRAWN_CACHE_BYTES", 0)  # too large to keep: drawn on every read
    drawn = SyntheticImages(40, 24)
    assert all(torch.equal(kept[(index, flip)]["image"], drawn[(index, flip)]["image"])
               for index in (3, 17, 39) for flip in (False, True))


def test_synthetic_classes_are_recognisable_from_their_colour():
    """A nearest-class-mean classifier on the colour of each image's most saturated pixels (the object) must
    label unseen images far above chance (10%): class conditioning shows in the pictures."""
    def object_colour(image):  # (3, H, W) → (3,)
        saturation = (image.max(0).values - image.min(0).values).flatten()
        return image.flatten(1)[:, saturation >= saturation.quantile(0.9)].mean(1)

    train = SyntheticImages(200, 32, split="train")
    val = SyntheticImages(100, 32, split="val")
    features = torch.stack([object_colour(train[i]["image"]) for i in range(len(train))])
    labels = torch.tensor([i % 10 for i in range(len(train))])
    centroids = torch.stack([features[labels == c].mean(0) for c in range(10)])
    val_features = torch.stack([object_colour(val[i]["image"]) for i in range(len(val))])
    predicted = torch.cdist(val_features, centroids).argmin(1)
    accuracy = (predicted == torch.tensor([i % 10 for i in range(len(val))])).float().mean()
    assert accuracy >= 0.8


# ------------------------------------------------------------------------------------------- real Imagenette
@pytest.fixture
def imagenette():
    if not (IMAGENETTE / "val").is_dir():
        pytest.skip(f"the Imagenette subset is not at {IMAGENETTE}")
    return IMAGENETTE


def test_imagenette_labels_from_sorted_wnids(imagenette):
    dataset = build_image_dataset(folder_cfg(imagenette, resolution=32), "val")
    wnids = sorted(p.name for p in (imagenette / "val").iterdir() if p.is_dir())
    assert dataset.num_classes == len(wnids) == 10 and dataset.class_names == wnids
    assert len(dataset) == sum(1 for _ in (imagenette / "val").glob("*/*.JPEG"))
    for index in (0, len(dataset) // 2, len(dataset) - 1):
        wnid = dataset.index.relative_path(index).split("/")[0]
        item = dataset[index]
        assert item["label"] == wnids.index(wnid) and item["image"].shape == (3, 32, 32)


def test_imagenette_labels_from_class_map_and_greyscale_to_rgb(imagenette):
    class_map = imagenette / "classes.tsv"
    dataset = build_image_dataset(folder_cfg(imagenette, resolution=48, class_map=str(class_map)), "val")
    indices, names = read_class_map(class_map)
    assert dataset.num_classes == max(indices.values()) + 1
    for wnid, index in indices.items():
        assert dataset.class_names[index] == names[wnid]
    grey = next(i for i in range(len(dataset)) if dataset.index.relative_path(i) == GREYSCALE_FILE)
    with Image.open(dataset.index.path(grey)) as image:
        assert image.mode == "L"
    item = dataset[grey]
    assert item["label"] == indices[GREYSCALE_FILE.split("/")[0]]
    assert item["image"].shape == (3, 48, 48)
    assert torch.equal(item["image"][0], item["image"][1]) and torch.equal(item["image"][0], item["image"][2])


def test_class_map_json_and_unmapped_folder(tmp_path):
    make_folder(tmp_path, classes=("n001", "n002"), per_class=1)
    (tmp_path / "map.json").write_text('{"n001": 5, "n002": 3}')
    dataset = build_image_dataset(folder_cfg(tmp_path, class_map=str(tmp_path / "map.json")), "train")
    assert [dataset[i]["label"] for i in range(2)] == [5, 3] and dataset.num_classes == 6
    (tmp_path / "partial.csv").write_text("wnid,index\nn001,0\n")
    with pytest.raises(DataError, match="n002"):
        build_image_dataset(folder_cfg(tmp_path, class_map=str(tmp_path / "partial.csv")), "train")


# ------------------------------------------------------------------------------------------- broken data
def test_corrupt_truncated_and_non_image_files_are_skipped_and_counted(tmp_path, data_log):
    good = make_folder(tmp_path, per_class=5)
    class_dir = tmp_path / "train" / "n001"
    (class_dir / "corrupt.JPEG").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    (class_dir / "truncated.JPEG").write_bytes(jpeg_bytes(7)[:300])
    (class_dir / "notes.jpg").write_text("not an image")
    (class_dir / "README.txt").write_text("not listed: no image extension")
    bad = {"corrupt.JPEG", "truncated.JPEG", "notes.jpg"}

    loader = make_image_loader(folder_cfg(tmp_path), "train", 4, train=False)
    batches = collect(loader)
    assert sum(len(b["image"]) for b in batches) == len(good)
    assert sum(b["skipped"] for b in batches) == len(bad)
    assert all(b["image"].shape[1:] == (3, 16, 16) and len(b["label"]) == len(b["image"]) for b in batches)
    warned = " ".join(record.getMessage() for record in data_log)
    assert all(name in warned for name in bad)

    train_batches = collect(make_image_loader(folder_cfg(tmp_path), "train", 4, train=True, num_workers=2), 10)
    assert sum(b["skipped"] for b in train_batches) > 0  # 10 batches of 4 cover three epochs of 13 files


def test_missing_or_empty_data_gives_data_error_naming_the_path(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "nowhere")):
        build_image_dataset(folder_cfg(tmp_path / "nowhere"), "train")
    with pytest.raises(DataError, match=str(tmp_path / "train")):
        build_image_dataset(folder_cfg(tmp_path), "train")
    (tmp_path / "train" / "n001").mkdir(parents=True)
    (tmp_path / "train" / "n001" / "README.txt").write_text("no images here")
    with pytest.raises(DataError, match=str(tmp_path / "train")):
        build_image_dataset(folder_cfg(tmp_path), "train")


def test_config_errors():
    with pytest.raises(DataError, match="data.kind"):
        build_image_dataset({"kind": "lmdb", "resolution": 16}, "train")
    with pytest.raises(DataError, match="data.root"):
        build_image_dataset({"kind": "imagefolder", "resolution": 16, "root": "???"}, "train")
    with pytest.raises(DataError, match="data.test_size"):
        build_image_dataset(synthetic_cfg(), "test")


def test_val_split_with_other_class_folders_is_refused(tmp_path):
    make_folder(tmp_path, "train", classes=("n001", "n002"), per_class=1)
    make_folder(tmp_path, "val", classes=("n002",), per_class=1)
    with pytest.raises(DataError, match="class_map"):
        build_image_dataset(folder_cfg(tmp_path), "val")


# ------------------------------------------------------------------------------------------- order and resume
def test_train_loader_resumes_exactly():
    cfg = synthetic_cfg()  # 40 images, batches of 8: 5 per epoch, so batch 7 is inside the second epoch
    full = collect(make_image_loader(cfg, "train", 8, train=True, seed=3), 12)
    resumed = collect(make_image_loader(cfg, "train", 8, train=True, seed=3, start_batch=7, num_workers=2), 5)
    for expected, got in zip(full[7:], resumed):
        assert torch.equal(expected["label"], got["label"]) and torch.equal(expected["image"], got["image"])
    assert not torch.equal(full[0]["image"], full[5]["image"])  # a new epoch is a new permutation


def test_eval_loader_is_one_ordered_pass_sharded_by_rank():
    cfg = synthetic_cfg()
    dataset = build_image_dataset(cfg, "val")
    shards = [collect(make_image_loader(cfg, "val", 3, train=False, rank=r, world_size=2)) for r in range(2)]
    for rank, batches in enumerate(shards):
        images = torch.cat([b["image"] for b in batches])
        expected = torch.stack([dataset[i]["image"] for i in range(rank, len(dataset), 2)])
        assert torch.equal(images, expected)
