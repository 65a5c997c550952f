"""Labelled image batches from config alone: `data.kind` = synthetic | imagefolder | webdataset.

    dataset = build_image_dataset(cfg.data, "train")       # map-style: synthetic, imagefolder
    loader = make_image_loader(cfg.data, "train", 64, train=True, seed=cfg.seed, start_batch=step)
    for batch in loader:                                   # {"image": (B, 3, R, R) in [-1, 1], "label": (B,) int64,
        ...                                                #  "skipped": int}

Map-style kinds draw their order from `ResumableBatchSampler`, so batch k of a training run is the same whether
or not the run was interrupted before it. An unreadable image (corrupt, truncated, not an image) is logged and
dropped from its batch, and counted in "skipped", so one bad file never ends an epoch: a batch may therefore be
shorter than asked, or even empty.

webdataset is a stream of tar shards and cannot resume exactly: a run resumed at batch k > 0 restarts the stream
with the shuffle seed `seed + k` (logged), so it sees a fresh shuffle instead of replaying the batches it saw.
"""
from __future__ import annotations

import functools
import io
import itertools
import json
import logging
import os
import random
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from shared.data.sampler import ResumableBatchSampler
from shared.data.synthetic import SyntheticImages
from shared.data.transforms import IMAGE_EXTENSIONS, preprocess, to_rgb
from shared.errors import DataError
from shared.preemption import leave_signals_to_the_main_process

log = logging.getLogger("epsvae.data")

KINDS = ("synthetic", "imagefolder", "webdataset")
# What Pillow raises for a file that is not an image, is truncated or is corrupt.
IMAGE_READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)

Item = dict[str, torch.Tensor | int]


# ---------------------------------------------------------------------------------------------- config helpers
def _as_config(data_cfg: DictConfig | Mapping) -> DictConfig:
    return data_cfg if isinstance(data_cfg, DictConfig) else OmegaConf.create(dict(data_cfg))


def _required(data_cfg: DictConfig, key: str):
    if key not in data_cfg or OmegaConf.is_missing(data_cfg, key) or data_cfg[key] is None:
        raise DataError(f"data.{key} is required for data.kind={data_cfg.get('kind')} (set data.{key}=...)")
    return data_cfg[key]


def _kind(data_cfg: DictConfig) -> str:
    kind = _required(data_cfg, "kind")
    if kind not in KINDS:
        raise DataError(f"data.kind={kind!r} is not one of {', '.join(KINDS)}")
    return kind


# ---------------------------------------------------------------------------------------------- decoding
def decode_image(source: str | Path | IO[bytes], name: str) -> Image.Image | None:
    """The fully decoded image in RGB (to_rgb), or None (with a warning naming `name`) if it cannot be read."""
    try:
        with Image.open(source) as image:
            image.load()  # decode now: a truncated file fails here rather than later in a resize
            return to_rgb(image)  # here, so that a mode Pillow cannot convert counts as unreadable
    except IMAGE_READ_ERRORS as error:
        log.warning("skipping unreadable image %s: %s", name, error)
        return None


def collate_images(items: list[Item | None], resolution: int) -> dict[str, torch.Tensor | int]:
    """Stack the readable items of a batch; the unreadable ones (None) are dropped and counted in "skipped"."""
    kept = [item for item in items if item is not None]
    if kept:
        images = torch.stack([item["image"] for item in kept])
        labels = torch.tensor([item["label"] for item in kept], dtype=torch.int64)
    else:
        images = torch.empty(0, 3, resolution, resolution)
        labels = torch.empty(0, dtype=torch.int64)
    return {"image": images, "label": labels, "skipped": len(items) - len(kept)}


# ---------------------------------------------------------------------------------------------- image folders
class _StringTable:
    """Many strings in two numpy arrays (UTF-8 bytes and offsets) instead of a Python list.

    DataLoader workers are forked: reading a Python list touches the reference counts of its items and copies
    their memory pages into every worker (GBs for ImageNet's 1.28M paths); a numpy buffer stays shared.
    """

    def __init__(self, strings: list[str]):
        encoded = [s.encode() for s in strings]
        self._offsets = np.cumsum([0] + [len(e) for e in encoded], dtype=np.int64)
        self._buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> str:
        return self._buffer[self._offsets[index] : self._offsets[index + 1]].tobytes().decode()


def read_class_map(path: str | Path) -> tuple[dict[str, int], dict[str, str]]:
    """({wnid: class index}, {wnid: human-readable name}) from a class-map file.

    JSON: {wnid: index}. TSV/CSV: a header naming a `wnid` column and an index column (the first whose name
    contains "index", "idx" or "label"), optionally a `name` column, e.g. `wnid  imagenet1k_index  name`;
    without such a header the first two columns are wnid and index.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data.class_map: no file {path}")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            return {str(wnid): int(index) for wnid, index in json.loads(text).items()}, {}
        delimiter = "\t" if "\t" in text.splitlines()[0] else ","
        rows = [[cell.strip() for cell in line.split(delimiter)] for line in text.splitlines() if line.strip()]
        header = [cell.lower() for cell in rows[0]]
        if "wnid" in header:
            wnid_col = header.index("wnid")
            index_col = next(i for i, cell in enumerate(header) if any(k in cell for k in ("index", "idx", "label")))
            name_col = header.index("name") if "name" in header else None
            rows = rows[1:]
        else:
            wnid_col, index_col, name_col = 0, 1, None
        indices = {row[wnid_col]: int(row[index_col]) for row in rows}
        names = {row[wnid_col]: row[name_col] for row in rows} if name_col is not None else {}
    except (ValueError, IndexError, StopIteration, AttributeError) as error:
        raise DataError(f"data.class_map {path} is not a JSON {{wnid: index}} nor a TSV/CSV with wnid and index "
                        f"columns ({type(error).__name__}: {error})") from None
    return indices, names


def _entries(directory: Path, keep) -> tuple[list[str], list[str]]:
    """(sorted names of the entries of `directory` that `keep(entry)` accepts, unreadable entries as messages).

    Any OS error (permissions, a symlink loop, a file removed while listing, a stale network mount) makes the entry
    unreadable rather than ending the listing; a directory that cannot be listed at all is one unreadable entry.
    """
    names, unreadable = [], []
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                try:
                    if keep(entry):
                        names.append(entry.name)
                except OSError as error:
                    unreadable.append(f"{directory / entry.name}: {error.strerror or error}")
    except OSError as error:
        unreadable.append(f"{directory}: {error.strerror or error}")
    return sorted(names), unreadable


def _class_folders(split_dir: Path) -> tuple[list[str], list[str]]:
    return _entries(split_dir, lambda entry: entry.is_dir())


def _image_files(class_dir: Path) -> tuple[list[str], list[str]]:
    def is_image(entry: os.DirEntry) -> bool:
        if entry.name.rsplit(".", 1)[-1].lower() not in IMAGE_EXTENSIONS:
            return False
        if not entry.is_file():
            entry.stat()  # a symlink loop or a dangling link raises here, and is reported as unreadable
            return False
        return True

    return _entries(class_dir, is_image)


class FolderIndex:
    """The sorted file list and labels of one ImageNet-layout split folder `root/<split>/<wnid>/*.JPEG`.

    Class index of a wnid: its position in the sorted list of class folders, or its entry in `class_map`.
    num_classes: the given one, or (number of folders | largest mapped index + 1).
    class_names[i]: the class map's name, else the wnid, for each index i (None where no folder maps to i).
    """

    def __init__(self, root: str | Path, split: str, class_map: str | Path | None = None,
                 num_classes: int | None = None):
        root = Path(root)
        self.split_dir = root / split
        if not root.is_dir():
            raise DataError(f"data.root {root} does not exist or is not a folder")
        if not self.split_dir.is_dir():
            raise DataError(f"no split folder {self.split_dir} (expected ImageNet layout {root}/{split}/<wnid>/*.JPEG)")
        self.wnids, unreadable = _class_folders(self.split_dir)
        files, empty = [], []
        for wnid in self.wnids:
            names, problems = _image_files(self.split_dir / wnid)
            files += [f"{wnid}/{name}" for name in names]
            unreadable += problems
            empty += [] if names else [wnid]
        self.unreadable_entries = len(unreadable)  # skipped while listing, beside images that fail to decode
        if unreadable:
            log.warning("%s: %d unreadable entries skipped, e.g. %s", self.split_dir, len(unreadable), unreadable[0])
        if empty and len(empty) < len(self.wnids):
            # An empty class folder keeps its index: labels are positions in the folder list, which must agree
            # with the other splits. The class simply has no images here.
            log.warning("%s: class folders without images (their class indices stay reserved): %s",
                        self.split_dir, ", ".join(empty[:5]) + (" ..." if len(empty) > 5 else ""))
        if not files:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the class folders of {self.split_dir}")

        if class_map is None:
            self.class_to_index, names = {wnid: i for i, wnid in enumerate(self.wnids)}, {}
        else:
            mapped, names = read_class_map(class_map)
            unmapped = [wnid for wnid in self.wnids if wnid not in mapped]
            if unmapped:
                raise DataError(f"class folders {unmapped[:5]} of {self.split_dir} are not in "
                                f"data.class_map {class_map}")
            self.class_to_index = {wnid: mapped[wnid] for wnid in self.wnids}
        largest = max(self.class_to_index.values())
        self.num_classes = largest + 1 if num_classes is None else int(num_classes)
        if self.num_classes <= largest:
            raise DataError(f"data.num_classes={self.num_classes} but {self.split_dir} has class index {largest}")
        self.class_names: list[str | None] = [None] * self.num_classes
        for wnid, index in self.class_to_index.items():
            self.class_names[index] = names.get(wnid, wnid)

        self._files = _StringTable(files)
        self.labels = np.array([self.class_to_index[f.split("/", 1)[0]] for f in files], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._files)

    def relative_path(self, index: int) -> str:
        """"<wnid>/<file name>" of item `index`."""
        return self._files[index]

    def path(self, index: int) -> Path:
        return self.split_dir / self._files[index]


@functools.lru_cache(maxsize=16)
def scan_image_folder(root: str, split: str, class_map: str | None = None,
                      num_classes: int | None = None) -> FolderIndex:
    """FolderIndex, listed once per process: rebuilding loaders (eval every N steps) does not rescan ImageNet."""
    return FolderIndex(root, split, class_map, num_classes)


class ImageFolder(Dataset):
    """Map-style data set over a FolderIndex: `dataset[(index, flip)]` → {"image", "label"} or None if unreadable."""

    def __init__(self, index: FolderIndex, resolution: int):
        self.index, self.resolution = index, resolution
        self.num_classes, self.class_names = index.num_classes, index.class_names

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: int | tuple[int, bool]) -> Item | None:
        index, flip = item if isinstance(item, tuple) else (item, False)
        path = self.index.path(index)
        image = decode_image(path, str(path))
        if image is None:
            return None
        return {"image": preprocess(image, self.resolution, flip), "label": int(self.index.labels[index])}


class IndexedSubset(Dataset):
    """The items `indices` of a map-style data set, addressed as the sampler addresses them: (position, flip)."""

    def __init__(self, dataset: SyntheticImages | ImageFolder, indices: np.ndarray):
        self.dataset, self.indices = dataset, np.asarray(indices, dtype=np.int64)
        self.resolution, self.num_classes = dataset.resolution, dataset.num_classes
        self.class_names = dataset.class_names

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int | tuple[int, bool]) -> Item | None:
        position, flip = item if isinstance(item, tuple) else (item, False)
        return self.dataset[(int(self.indices[position]), flip)]


def build_image_dataset(data_cfg: DictConfig | Mapping, split: str) -> SyntheticImages | ImageFolder:
    """The map-style data set of `split` ("train", "val", ...) for data.kind = synthetic | imagefolder.

    Every item is {"image": (3, R, R) float in [-1, 1], "label": int}, or None for an unreadable file; the data
    set has `num_classes` and `class_names`.
    """
    data_cfg = _as_config(data_cfg)
    kind = _kind(data_cfg)
    resolution = int(_required(data_cfg, "resolution"))
    if kind == "synthetic":
        return SyntheticImages(num_images=int(_required(data_cfg, f"{split}_size")), resolution=resolution,
                               num_classes=int(_required(data_cfg, "num_classes")), seed=int(data_cfg.get("seed", 0)),
                               split=split)
    if kind == "imagefolder":
        root = str(Path(_required(data_cfg, "root")).expanduser().resolve())
        folder = data_cfg.get(f"{split}_split") or split
        class_map = data_cfg.get("class_map")
        num_classes = data_cfg.get("num_classes")
        index = scan_image_folder(root, folder, None if class_map is None else str(class_map),
                                  None if num_classes is None else int(num_classes))
        _check_same_classes_as_train(data_cfg, root, index)
        return ImageFolder(index, resolution)
    raise DataError("data.kind=webdataset is a stream of shards with no random access: use make_image_loader")


def _check_same_classes_as_train(data_cfg: DictConfig, root: str, index: FolderIndex) -> None:
    """Without a class map, labels are positions in the sorted folder list: a split missing a class folder would
    silently get other labels than the training split."""
    train_dir = Path(root) / (data_cfg.get("train_split") or "train")
    if data_cfg.get("class_map") is None and train_dir.is_dir() and train_dir != index.split_dir:
        if _class_folders(train_dir)[0] != index.wnids:
            raise DataError(f"the class folders of {index.split_dir} differ from those of {train_dir}, so class "
                            f"indices would not agree; set data.class_map to a file mapping wnid to index")


# ---------------------------------------------------------------------------------------------- webdataset
def expand_shard_urls(urls: str | list[str]) -> list[str]:
    """Brace-expanded shard URLs (`/data/train-{000000..000127}.tar`, several joined by '::', or a list)."""
    from webdataset.shardlists import expand_urls

    patterns = [urls] if isinstance(urls, str) else list(urls)
    return [url for pattern in patterns for url in expand_urls(str(pattern))]


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def _class_names_from_manifest(url: str, num_classes: int | None) -> list[str | None] | None:
    """The wnids of the manifest.json that stage=shards writes beside its shards; None without one."""
    manifest_path = Path(url).parent / "manifest.json"
    if num_classes is None or not _is_local(url) or not manifest_path.is_file():
        return None
    names: list[str | None] = [None] * num_classes
    for wnid, index in json.loads(manifest_path.read_text()).get("class_to_index", {}).items():
        if index < num_classes:
            names[index] = wnid
    return names


class WebDatasetImages(IterableDataset):
    """Batches read from tar shards holding `<key>.{jpg,png,webp,...}` and `<key>.cls` (written by stage=shards).

    Shards are split by rank (explicitly, with the rank passed in, as webdataset's split_by_node would do with the
    process group) and then by DataLoader worker (webdataset's split_by_worker). train: an infinite stream,
    each epoch reshuffles the shard order (same on every rank) and shuffles samples in a buffer of
    `shuffle_buffer`, with random horizontal flips. eval: one ordered pass, the last batch of each worker short.
    Corrupt samples are skipped and counted in "skipped"; unreadable shards are skipped with a warning.
    class_names: the wnids of the manifest.json beside the shards (stage=shards writes one), else None.
    """

    def __init__(self, urls: list[str], resolution: int, batch_size: int, *, train: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1, random_flip: bool = True, shuffle_buffer: int = 1000,
                 num_classes: int | None = None):
        if len(urls) < world_size:
            raise DataError(f"{len(urls)} shards cannot be split over {world_size} ranks: write smaller shards")
        self.urls, self.resolution, self.batch_size = urls, resolution, batch_size
        self.train, self.seed, self.rank, self.world_size = train, seed, rank, world_size
        self.random_flip, self.shuffle_buffer = random_flip and train, shuffle_buffer
        self.num_classes, self.class_names = num_classes, _class_names_from_manifest(urls[0], num_classes)

    def shards_of_rank(self, epoch: int) -> list[str]:
        shards = list(self.urls)
        if self.train:  # the same permutation on every rank, so that the ranks' slices never overlap
            random.Random(f"shards/{self.seed}/{epoch}").shuffle(shards)
        return shards[self.rank :: self.world_size]

    def _skip_shard(self, error: Exception) -> bool:
        log.warning("skipping unreadable shard data: %s", error)
        return True  # webdataset handler protocol: True = go on with the next sample/shard

    def _decode(self, sample: dict, flip: bool) -> Item | None:
        name = f"{sample.get('__url__')}:{sample.get('__key__')}"
        image_key = next((key for key in IMAGE_EXTENSIONS if key in sample), None)
        if image_key is None or "cls" not in sample:
            log.warning("skipping sample %s without an image or a cls entry (keys: %s)", name, sorted(sample))
            return None
        try:
            label = int(sample["cls"])
        except ValueError:
            log.warning("skipping sample %s: its cls entry %r is not an integer", name, sample["cls"][:20])
            return None
        image = decode_image(io.BytesIO(sample[image_key]), name)
        if image is None:
            return None
        return {"image": preprocess(image, self.resolution, flip), "label": label}

    def _samples(self) -> Iterator[Item | None]:
        """This worker's decoded samples (None: unreadable): one pass (eval) or epoch after epoch (train)."""
        import webdataset as wds

        worker_info = get_worker_info()
        worker = worker_info.id if worker_info is not None else 0
        for epoch in itertools.count() if self.train else [0]:
            shards = list(wds.split_by_worker(self.shards_of_rank(epoch)))
            if not shards:  # more workers than this rank has shards: this worker idles
                return
            rng = random.Random(f"samples/{self.seed}/{self.rank}/{worker}/{epoch}")
            stages = [wds.SimpleShardList(shards), wds.tarfile_to_samples(handler=self._skip_shard)]
            if self.train:
                stages.append(wds.shuffle(self.shuffle_buffer, rng=rng))
            readable = 0
            for sample in wds.DataPipeline(*stages):
                item = self._decode(sample, flip=self.random_flip and rng.random() < 0.5)
                readable += item is not None
                yield item
            if self.train and readable == 0:  # would otherwise loop forever
                raise DataError(f"a whole pass over {len(shards)} shards ({shards[0]}, ...) gave no readable sample")

    def __iter__(self) -> Iterator[dict[str, torch.Tensor | int]]:
        items: list[Item | None] = []
        kept = 0
        for item in self._samples():
            items.append(item)
            kept += item is not None
            if kept == self.batch_size:  # stream batches are always full: unreadable samples are replaced
                yield collate_images(items, self.resolution)
                items, kept = [], 0
        if items:
            yield collate_images(items, self.resolution)


def _webdataset_loader(data_cfg: DictConfig, split: str, batch_size: int, *, train: bool, seed: int, rank: int,
                       world_size: int, start_batch: int, num_workers: int, pin_memory: bool) -> DataLoader:
    urls = expand_shard_urls(_required(data_cfg, f"{split}_urls"))
    missing = [url for url in urls if _is_local(url) and not Path(url).is_file()]
    if missing:
        raise DataError(f"data.{split}_urls: {len(missing)} of {len(urls)} shards do not exist, e.g. {missing[0]}")
    if train and start_batch > 0:
        log.warning("webdataset streams cannot resume exactly: restarting at batch %d with shuffle seed %d + %d",
                    start_batch, seed, start_batch)
        seed += start_batch
    num_classes = data_cfg.get("num_classes")
    dataset = WebDatasetImages(urls, int(_required(data_cfg, "resolution")), batch_size, train=train, seed=seed,
                               rank=rank, world_size=world_size, random_flip=bool(data_cfg.get("random_flip", True)),
                               shuffle_buffer=int(data_cfg.get("shuffle_buffer", 1000)),
                               num_classes=None if num_classes is None else int(num_classes))
    shards_per_rank = len(dataset.shards_of_rank(0))
    if shards_per_rank < max(num_workers, 1):
        log.warning("rank %d has %d shards for %d loader workers: some workers will idle", rank, shards_per_rank,
                    num_workers)
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0, worker_init_fn=leave_signals_to_the_main_process)


# ---------------------------------------------------------------------------------------------- loaders
def make_image_loader(data_cfg: DictConfig | Mapping, split: str, batch_size: int, *, train: bool, seed: int = 0,
                      rank: int = 0, world_size: int = 1, start_batch: int = 0, num_workers: int | None = None,
                      pin_memory: bool = False, indices: np.ndarray | None = None) -> DataLoader:
    """Batches {"image": (B, 3, R, R) float in [-1, 1], "label": (B,) int64, "skipped": int} of one rank.

    train: infinite, shuffled, flipped if data.random_flip, starting at batch `start_batch` (exact for
    synthetic/imagefolder). eval: one ordered pass without flips, rank r taking items r, r + world_size, ...
    of the whole split, or of `indices` (an evaluation subset, shared.data.subsets; synthetic/imagefolder only).
    `loader.dataset.num_classes` / `.class_names` describe the labels.
    """
    data_cfg = _as_config(data_cfg)
    kind = _kind(data_cfg)
    workers = int(data_cfg.get("num_workers", 0)) if num_workers is None else num_workers
    if kind == "webdataset":
        return _webdataset_loader(data_cfg, split, batch_size, train=train, seed=seed, rank=rank,
                                  world_size=world_size, start_batch=start_batch, num_workers=workers,
                                  pin_memory=pin_memory)
    dataset = build_image_dataset(data_cfg, split)
    if indices is not None:
        if train:
            raise ValueError("indices select an evaluation subset: they are for train=False loaders")
        dataset = IndexedSubset(dataset, indices)
    if train and len(dataset) < batch_size * world_size:
        raise DataError(f"the {split} split has {len(dataset)} images, fewer than one batch of {batch_size} "
                        f"on each of {world_size} ranks")
    sampler = ResumableBatchSampler(len(dataset), batch_size, seed=seed, shuffle=train,
                                    random_flip=train and bool(data_cfg.get("random_flip", True)), rank=rank,
                                    world_size=world_size, start_batch=start_batch, infinite=train)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                      collate_fn=functools.partial(collate_images, resolution=dataset.resolution),
                      persistent_workers=workers > 0, worker_init_fn=leave_signals_to_the_main_process)
