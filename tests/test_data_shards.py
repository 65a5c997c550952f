"""stage=shards and the webdataset loader: folder → shards → batches equal to the folder's own batches."""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from shared.data import make_image_loader
from shared.data.shards import main as shards_main
from shared.data.shards import write_shards
from shared.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]


def image_bytes(seed: int, fmt="JPEG", mode="RGB", size=(36, 28)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture
def folder(tmp_path) -> Path:
    """train/<3 classes>/ with 4 JPEGs each, one greyscale, one PNG named .JPEG, and one corrupt file."""
    root = tmp_path / "images"
    for c, wnid in enumerate(("n01", "n02", "n03")):
        (root / "train" / wnid).mkdir(parents=True)
        for i in range(4):
            (root / "train" / wnid / f"{wnid}_{i}.JPEG").write_bytes(image_bytes(10 * c + i))
    (root / "train" / "n02" / "n02_grey.JPEG").write_bytes(image_bytes(99, mode="L"))
    (root / "train" / "n03" / "n03_png.JPEG").write_bytes(image_bytes(98, fmt="PNG"))
    (root / "train" / "n01" / "n01_broken.JPEG").write_bytes(b"definitely not an image")
    return root


def webdataset_cfg(urls, **overrides) -> dict:
    return {"kind": "webdataset", "train_urls": urls, "val_urls": urls, "resolution": 16, "num_classes": 3,
            "random_flip": True, "shuffle_buffer": 8, "num_workers": 0, **overrides}


def folder_cfg(root: Path) -> dict:
    return {"kind": "imagefolder", "root": str(root), "resolution": 16, "train_split": "train", "val_split": "val",
            "class_map": None, "num_classes": None, "random_flip": True, "num_workers": 0}


def shard_paths(manifest: dict, out_dir: Path) -> list[str]:
    return [str(out_dir / shard["name"]) for shard in manifest["shards"]]


def concat(loader):
    batches = list(loader)
    return (torch.cat([b["image"] for b in batches]), torch.cat([b["label"] for b in batches]),
            sum(b["skipped"] for b in batches))


def test_write_shards_manifest_and_original_bytes(folder, tmp_path):
    out = tmp_path / "shards"
    manifest = write_shards(folder, out, "train", shard_size=5, progress=False)
    readable = 14  # 12 JPEGs + the greyscale + the PNG; the broken file is listed as skipped
    assert manifest["total"] == readable and [s["count"] for s in manifest["shards"]] == [5, 5, 4]
    assert manifest["skipped"] == ["n01/n01_broken.JPEG"] and manifest["split"] == "train"
    assert manifest["class_to_index"] == {"n01": 0, "n02": 1, "n03": 2}
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train-000000.tar", "train-000001.tar",
                                                     "train-000002.tar"]  # no temporary file is left
    members = {}
    for path in shard_paths(manifest, out):
        with tarfile.open(path) as tar:
            members.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    png = next(name for name in members if "n03_png" in name)
    assert png.endswith(".png") and members[png] == (folder / "train/n03/n03_png.JPEG").read_bytes()
    grey = next(name for name in members if "n02_grey" in name)
    assert grey.endswith(".jpg") and members[grey.replace(".jpg", ".cls")] == b"1"
    assert sum(name.endswith(".cls") for name in members) == readable


def test_rewriting_with_larger_shards_removes_stale_ones(folder, tmp_path):
    out = tmp_path / "shards"
    write_shards(folder, out, "train", shard_size=3, progress=False)
    manifest = write_shards(folder, out, "train", shard_size=10, progress=False)
    assert sorted(p.name for p in out.glob("*.tar")) == [s["name"] for s in manifest["shards"]]
    shutil.copytree(folder / "train", folder / "val")
    with pytest.raises(DataError, match="another split"):
        write_shards(folder, out, "val", shard_size=10, progress=False)


def test_round_trip_gives_the_folder_loader_batches(folder, tmp_path):
    manifest = write_shards(folder, tmp_path / "shards", "train", shard_size=4, progress=False)
    urls = shard_paths(manifest, tmp_path / "shards")
    images, labels, skipped = concat(make_image_loader(folder_cfg(folder), "train", 4, train=False))
    stream = make_image_loader(webdataset_cfg(urls), "train", 4, train=False)
    stream_images, stream_labels, stream_skipped = concat(stream)
    assert skipped == 1 and stream_skipped == 0  # the broken file is dropped when sharding
    assert torch.equal(stream_labels, labels) and torch.equal(stream_images, images)
    assert stream.dataset.class_names == ["n01", "n02", "n03"]  # from the manifest beside the shards


def test_webdataset_two_workers_cover_every_sample_once(folder, tmp_path):
    manifest = write_shards(folder, tmp_path / "shards", "train", shard_size=3, progress=False)
    urls = shard_paths(manifest, tmp_path / "shards")
    images, labels, _ = concat(make_image_loader(folder_cfg(folder), "train", 4, train=False))
    stream_images, stream_labels, _ = concat(make_image_loader(webdataset_cfg(urls), "train", 4, train=False,
                                                               num_workers=2))
    key = lambda x: x.flatten(1).sum(1).sort().values  # an order-free fingerprint of a set of images
    assert torch.allclose(key(stream_images), key(images)) and torch.equal(stream_labels.sort().values,
                                                                           labels.sort().values)
    per_rank = [concat(make_image_loader(webdataset_cfg(urls), "train", 4, train=False, rank=r, world_size=2))[1]
                for r in range(2)]
    assert len(per_rank[0]) + len(per_rank[1]) == len(labels)

    loader = make_image_loader(webdataset_cfg(urls), "train", 4, train=True, num_workers=2)
    batches = [batch for _, batch in zip(range(12), loader)]  # 48 samples: several epochs of 14
    assert all(len(b["image"]) == 4 and b["image"].shape[1:] == (3, 16, 16) for b in batches)
    seen = torch.cat([b["image"] for b in batches])
    flipped = {tuple(x.flip(-1).flatten()[:8].tolist()) for x in images}
    assert any(tuple(x.flatten()[:8].tolist()) in flipped for x in seen)  # random flips happen


def test_webdataset_skips_corrupt_samples_and_shards(folder, tmp_path, caplog):
    manifest = write_shards(folder, tmp_path / "shards", "train", shard_size=20, progress=False)
    urls = shard_paths(manifest, tmp_path / "shards")
    broken_shard = tmp_path / "shards" / "broken.tar"
    with tarfile.open(broken_shard, "w") as tar:
        for name, data in (("a.jpg", b"garbage"), ("a.cls", b"0"), ("b.jpg", image_bytes(5)), ("b.cls", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    truncated_shard = tmp_path / "shards" / "truncated.tar"
    truncated_shard.write_bytes(Path(urls[0]).read_bytes()[:1500])
    not_a_tar = tmp_path / "shards" / "nonsense.tar"
    not_a_tar.write_bytes(b"this is not a tar file" * 40)

    cfg = webdataset_cfg(urls + [str(broken_shard), str(truncated_shard), str(not_a_tar)])
    logging.getLogger("epsvae.data").addHandler(caplog.handler)
    try:
        images, labels, skipped = concat(make_image_loader(cfg, "train", 4, train=False))
    finally:
        logging.getLogger("epsvae.data").removeHandler(caplog.handler)
    assert len(images) >= manifest["total"] and skipped >= 2  # a.jpg garbage, b.cls not an integer
    assert "broken.tar" in caplog.text and "nonsense.tar" in caplog.text


def test_webdataset_errors_and_inexact_resume(tmp_path, folder, caplog):
    with pytest.raises(DataError, match="do not exist"):
        make_image_loader(webdataset_cfg(str(tmp_path / "train-{000000..000002}.tar")), "train", 4, train=True)
    with pytest.raises(DataError, match="train_urls"):
        make_image_loader(webdataset_cfg(None), "train", 4, train=True)
    manifest = write_shards(folder, tmp_path / "shards", "train", shard_size=20, progress=False)
    urls = shard_paths(manifest, tmp_path / "shards")
    with pytest.raises(DataError, match="ranks"):
        make_image_loader(webdataset_cfg(urls), "train", 4, train=True, world_size=2)
    logging.getLogger("epsvae.data").addHandler(caplog.handler)
    try:
        make_image_loader(webdataset_cfg(urls), "train", 4, train=True, start_batch=10)
    finally:
        logging.getLogger("epsvae.data").removeHandler(caplog.handler)
    assert "cannot resume exactly" in caplog.text


def test_stage_needs_an_image_folder():
    with pytest.raises(ConfigError, match="data=imagefolder"):
        shards_main(OmegaConf.create({"data": {"kind": "synthetic"}}))


@pytest.mark.slow
def test_stage_shards_from_the_command_line(folder, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(REPO / "pipelines" / "run.py"), "stage=shards", "data=imagefolder",
         f"data.root={folder}", f"shards.out_dir={out}", "shards.shard_size=6", f"output_root={tmp_path / 'runs'}",
         "wandb.mode=disabled", "progress=false"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["count"] for s in manifest["shards"]] == [6, 6, 2]
    assert f"data.train_urls=\"{out.resolve()}/train-{{000000..000002}}.tar\"" in result.stdout
