"""A data order that can be resumed: batch k of a run is a pure function of (seed, k, rank, world size).

Batches are lists of (index, flip) pairs. Drawing the horizontal flip here, with the order, rather than inside a
worker makes augmentation independent of the number of workers and lets a resumed run see exactly the batches an
uninterrupted run would have seen.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

Batch = list[tuple[int, bool]]


class ResumableBatchSampler(Sampler[Batch]):
    """Batches of (index, flip) for one rank.

    train (infinite=True): epoch e is a permutation drawn from (seed, e), cut to a multiple of
    world_size * batch_size so every rank gets the same number of full batches; rank r takes every world_size-th
    item. Iteration starts at global batch `start_batch` and never ends.
    eval (infinite=False, shuffle=False, random_flip=False): one ordered pass, rank r takes items r, r + W, ...,
    the last batch may be short.
    """

    def __init__(self, num_items: int, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 random_flip: bool = True, rank: int = 0, world_size: int = 1, start_batch: int = 0,
                 infinite: bool = True):
        if num_items <= 0:
            raise ValueError("cannot sample from an empty data set")
        if batch_size < 1 or world_size < 1:  # an empty batch would make the epoch loop below spin for ever
            raise ValueError(f"batch_size ({batch_size}) and world_size ({world_size}) must be at least 1")
        if infinite and num_items < batch_size * world_size:
            raise ValueError(f"{num_items} items are fewer than one global batch ({batch_size} x {world_size} ranks)")
        self.num_items, self.batch_size = num_items, batch_size
        self.seed, self.shuffle, self.random_flip = seed, shuffle, random_flip
        self.rank, self.world_size = rank, world_size
        self.start_batch, self.infinite = start_batch, infinite

    @property
    def batches_per_epoch(self) -> int:
        if self.infinite:
            return self.num_items // (self.batch_size * self.world_size)
        per_rank = len(range(self.rank, self.num_items, self.world_size))
        return -(-per_rank // self.batch_size)

    def epoch_items(self, epoch: int) -> list[tuple[int, bool]]:
        """This rank's (index, flip) pairs of one epoch, in order."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        if self.shuffle:
            order = torch.randperm(self.num_items, generator=generator)
        else:
            order = torch.arange(self.num_items)
        flips = torch.rand(self.num_items, generator=generator) < 0.5 if self.random_flip else None
        if self.infinite:
            order = order[: self.batches_per_epoch * self.batch_size * self.world_size]
        mine = order[self.rank :: self.world_size].tolist()
        return [(index, bool(flips[index]) if flips is not None else False) for index in mine]

    def __iter__(self) -> Iterator[Batch]:
        epoch, skip = divmod(self.start_batch, self.batches_per_epoch) if self.infinite else (0, 0)
        while True:
            items = self.epoch_items(epoch)
            for start in range(skip * self.batch_size, len(items), self.batch_size):
                yield items[start : start + self.batch_size]
            if not self.infinite:
                return
            epoch, skip = epoch + 1, 0

    def __len__(self) -> int:
        if self.infinite:
            raise TypeError("an infinite sampler has no length")
        return self.batches_per_epoch
