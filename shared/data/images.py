"""Labelled image batches from config alone: `data.kind` = synthetic | imagefolder | webdataset (the sources are
shared/data/synthetic.py, image_folder.py and webdataset_images.py; this module reads the config and builds them).

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
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from shared.data.decoding import Item, collate_images
from shared.data.image_folder import ImageFolder, check_same_classes_as_train, scan_image_folder
from shared.data.sampler import ResumableBatchSampler
from shared.data.synthetic import SyntheticImages
from shared.data.webdataset_images import expand_shard_urls, webdataset_loader
from shared.errors import DataError
from shared.preemption import leave_signals_to_the_main_process

KINDS = ("synthetic", "imagefolder", "webdataset")


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
        check_same_classes_as_train(Path(root) / (data_cfg.get("train_split") or "train"), index,
                                    None if class_map is None else str(class_map))
        return ImageFolder(index, resolution)
    raise DataError("data.kind=webdataset is a stream of shards with no random access: use make_image_loader")


# ---------------------------------------------------------------------------------------------- loaders
def make_image_loader(data_cfg: DictConfig | Mapping, split: str, batch_size: int, *, train: bool, seed: int = 0,
                      rank: int = 0, world_size: int = 1, micro_steps: int = 1, start_batch: int = 0,
                      num_workers: int | None = None, pin_memory: bool = False,
                      indices: np.ndarray | None = None) -> DataLoader:
    """Batches {"image": (B, 3, R, R) float in [-1, 1], "label": (B,) int64, "skipped": int} of one rank.

    train: infinite, shuffled, flipped if data.random_flip, starting at batch `start_batch` (exact for
    synthetic/imagefolder; `micro_steps` batches of each rank make one global batch, shared/data/sampler.py). eval: one ordered pass without flips, rank r taking items r, r + world_size, ...
    of the whole split, or of `indices` (an evaluation subset, shared.data.subsets; synthetic/imagefolder only).
    `loader.dataset.num_classes` / `.class_names` describe the labels.
    """
    data_cfg = _as_config(data_cfg)
    kind = _kind(data_cfg)
    workers = int(data_cfg.get("num_workers", 0)) if num_workers is None else num_workers
    if kind == "webdataset":
        num_classes = data_cfg.get("num_classes")
        return webdataset_loader(expand_shard_urls(_required(data_cfg, f"{split}_urls")), split,
                                 int(_required(data_cfg, "resolution")), batch_size, train=train, seed=seed, rank=rank,
                                 world_size=world_size, start_batch=start_batch, num_workers=workers,
                                 pin_memory=pin_memory, random_flip=bool(data_cfg.get("random_flip", True)),
                                 shuffle_buffer=int(data_cfg.get("shuffle_buffer", 1000)),
                                 num_classes=None if num_classes is None else int(num_classes))
    dataset = build_image_dataset(data_cfg, split)
    if indices is not None:
        if train:
            raise ValueError("indices select an evaluation subset: they are for train=False loaders")
        dataset = IndexedSubset(dataset, indices)
    if train and len(dataset) < batch_size * world_size * micro_steps:
        raise DataError(f"the {split} split has {len(dataset)} images, fewer than one global batch: {micro_steps} "
                        f"micro-steps of {batch_size} on each of {world_size} ranks")
    sampler = ResumableBatchSampler(len(dataset), batch_size, seed=seed, shuffle=train,
                                    random_flip=train and bool(data_cfg.get("random_flip", True)), rank=rank,
                                    world_size=world_size, micro_steps=micro_steps, start_batch=start_batch,
                                    infinite=train)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                      collate_fn=functools.partial(collate_images, resolution=dataset.resolution),
                      persistent_workers=workers > 0, worker_init_fn=leave_signals_to_the_main_process)
