"""Labelled images streamed from webdataset tar shards (written by stage=shards): split by rank and worker,
shuffled per epoch, unreadable samples and shards skipped and counted."""
from __future__ import annotations

import io
import itertools
import json
import logging
import random
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shared.data.decoding import Item, collate_images, decode_image
from shared.data.transforms import IMAGE_EXTENSIONS, preprocess
from shared.errors import DataError
from shared.preemption import leave_signals_to_the_main_process

log = logging.getLogger("epsvae.data")


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


def webdataset_loader(urls: list[str], split: str, resolution: int, batch_size: int, *, train: bool, seed: int,
                      rank: int, world_size: int, start_batch: int, num_workers: int, pin_memory: bool,
                      random_flip: bool, shuffle_buffer: int, num_classes: int | None) -> DataLoader:
    """The loader of WebDatasetImages over `urls` (expanded) of `split`, one rank's share."""
    missing = [url for url in urls if _is_local(url) and not Path(url).is_file()]
    if missing:
        raise DataError(f"data.{split}_urls: {len(missing)} of {len(urls)} shards do not exist, e.g. {missing[0]}")
    if train and start_batch > 0:
        log.warning("webdataset streams cannot resume exactly: restarting at batch %d with shuffle seed %d + %d",
                    start_batch, seed, start_batch)
        seed += start_batch
    dataset = WebDatasetImages(urls, resolution, batch_size, train=train, seed=seed, rank=rank, world_size=world_size,
                               random_flip=random_flip, shuffle_buffer=shuffle_buffer, num_classes=num_classes)
    shards_per_rank = len(dataset.shards_of_rank(0))
    if shards_per_rank < max(num_workers, 1):
        log.warning("rank %d has %d shards for %d loader workers: some workers will idle", rank, shards_per_rank,
                    num_workers)
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0, worker_init_fn=leave_signals_to_the_main_process)
