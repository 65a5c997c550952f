"""stage=shards: an ImageNet-layout image folder → webdataset tar shards that `data=webdataset` reads.

    python pipelines/run.py stage=shards data=imagefolder data.root=/data/imagenet shards.split=train \
        shards.out_dir=/data/imagenet-shards shards.shard_size=1000

Each sample is `<key>.<ext>` holding the ORIGINAL file bytes (no re-encoding: shards are lossless and as small as
the folder; `ext` follows the content, so a PNG named .JPEG is stored as .png) and `<key>.cls` holding the class
index as text, with the labels the imagefolder loader would give (sorted wnids, or data.class_map). A shard is
written under a temporary name and renamed when complete, so a reader never sees half a shard. `manifest.json`
records the shards, their sample counts, the class map and the files that could not be identified as images.
Write each split to its own out_dir.
"""
from __future__ import annotations

import io
import json
import logging
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

from omegaconf import DictConfig
from PIL import Image
from tqdm import tqdm

from shared.data.decoding import IMAGE_READ_ERRORS
from shared.data.image_folder import FolderIndex
from shared.errors import ConfigError, DataError
from shared.files import atomic_file, write_atomically

log = logging.getLogger("epsvae.data")

# Pillow's format name → the extension (webdataset key) the loader reads; MPO is a multi-picture JPEG.
FORMAT_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif",
                     "TIFF": "tiff"}

Sample = tuple[str, str, bytes, int]  # key, extension, file bytes, label


def image_extension(data: bytes) -> str | None:
    """The extension that matches the content of an image file, or None if it is not an image the loader reads."""
    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            return FORMAT_EXTENSIONS.get(image.format)
    except IMAGE_READ_ERRORS:
        return None


def sample_key(number: int, relative_path: str) -> str:
    """A tar-safe, unique key that names its source: webdataset splits a member name at its first dot."""
    return f"{number:08d}_" + re.sub(r"[^A-Za-z0-9-]+", "_", relative_path.rsplit(".", 1)[0])


def _readable_samples(index: FolderIndex, skipped: list[str], progress: bool) -> Iterator[Sample]:
    for number in tqdm(range(len(index)), desc=f"shards {index.split_dir.name}", unit="img", disable=not progress):
        relative_path = index.relative_path(number)
        data = index.path(number).read_bytes()
        extension = image_extension(data)
        if extension is None:
            log.warning("skipping %s: not an image the loader can read", index.path(number))
            skipped.append(relative_path)
            continue
        yield sample_key(number, relative_path), extension, data, int(index.labels[number])


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0  # fixed metadata: the same input gives the same bytes
    tar.addfile(info, io.BytesIO(data))


def _write_shard(path: Path, samples: list[Sample]) -> None:
    """The shard appears complete or not at all (shared.files.atomic_file)."""
    with atomic_file(path) as file, tarfile.open(fileobj=file, mode="w") as tar:
        for key, extension, data, label in samples:
            _add_member(tar, f"{key}.{extension}", data)
            _add_member(tar, f"{key}.cls", str(label).encode())


def _chunks(samples: Iterator[Sample], size: int) -> Iterator[list[Sample]]:
    chunk: list[Sample] = []
    for sample in samples:
        chunk.append(sample)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def url_pattern(out_dir: Path, split: str, num_shards: int) -> str:
    """The brace pattern naming every shard, e.g. /data/train-{000000..000127}.tar."""
    if num_shards == 1:
        return str(out_dir / f"{split}-000000.tar")
    return str(out_dir / f"{split}-{{000000..{num_shards - 1:06d}}}.tar")


def write_shards(dataset_root: str | Path, out_dir: str | Path, split: str, shard_size: int,
                 class_map: str | Path | None = None, progress: bool = True) -> dict:
    """Shard `dataset_root/split/<wnid>/*` into `out_dir/<split>-000000.tar, ...` of `shard_size` samples each
    (the last one shorter) and write `out_dir/manifest.json`; returns the manifest."""
    if shard_size <= 0:
        raise ConfigError(f"shards.shard_size must be positive, got {shard_size}")
    index = FolderIndex(dataset_root, split, class_map)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / "manifest.json"
    if manifest_path.is_file() and json.loads(manifest_path.read_text()).get("split") != split:
        raise DataError(f"{out_dir} already holds the shards of another split (see {manifest_path}); write each "
                        f"split to its own shards.out_dir")

    skipped: list[str] = []
    shards = []
    for number, samples in enumerate(_chunks(_readable_samples(index, skipped, progress), shard_size)):
        name = f"{split}-{number:06d}.tar"
        _write_shard(out_dir / name, samples)
        shards.append({"name": name, "count": len(samples)})
    if not shards:
        raise DataError(f"none of the {len(index)} files in {index.split_dir} is a readable image")
    _remove_stale_shards(out_dir, split, keep={shard["name"] for shard in shards})

    manifest = {
        "split": split,
        "source_root": str(Path(dataset_root).resolve()),
        "shard_size": shard_size,
        "shards": shards,
        "total": sum(shard["count"] for shard in shards),
        "num_classes": index.num_classes,
        "class_to_index": index.class_to_index,
        "skipped": skipped,
        "url_pattern": url_pattern(out_dir.resolve(), split, len(shards)),
    }
    write_atomically(manifest_path, json.dumps(manifest, indent=1) + "\n")
    return manifest


def _remove_stale_shards(out_dir: Path, split: str, keep: set[str]) -> None:
    """Shards of an earlier, larger run into the same folder would be read by a glob: remove them."""
    for path in sorted(out_dir.glob(f"{split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar")):
        if path.name not in keep:
            log.info("removing %s, left by an earlier run with more shards", path)
            path.unlink()


def main(cfg: DictConfig) -> dict:
    from shared.runtime import setup

    if cfg.data.kind != "imagefolder":
        raise ConfigError(f"stage=shards reads an image folder, but data.kind={cfg.data.kind}: "
                          f"use data=imagefolder data.root=...")
    with setup(cfg) as runtime:
        split = cfg.shards.split
        folder = cfg.data.get(f"{split}_split") or split
        manifest = write_shards(cfg.data.root, cfg.shards.out_dir, folder, int(cfg.shards.shard_size),
                                class_map=cfg.data.get("class_map"), progress=bool(cfg.progress))
        runtime.log.info("wrote %d samples in %d shards to %s (%d files skipped, listed in manifest.json)",
                         manifest["total"], len(manifest["shards"]), cfg.shards.out_dir, len(manifest["skipped"]))
        print(f"Read them with:\n  data=webdataset 'data.{split}_urls=\"{manifest['url_pattern']}\"' "
              f"data.num_classes={manifest['num_classes']} data.resolution={cfg.data.resolution}")
        return runtime.finish(manifest)
