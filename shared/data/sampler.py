"""A data order that can be resumed: batch k of a run is a pure function of (seed, k, rank, world size).

Batches are lists of (index, flip) pairs. Drawing the horizontal flip here, with the order, rather than inside a
worker makes augmentation independent of the number of workers and lets a resumed run see exactly the batches an
uninterrupted run would have seen.

A training step's global batch is split across processes and gradient-accumulation micro-steps (`BatchSplit`). Global
batch k is the same set of items, with the same flips, however it is split: a run resumed on another number of
processes, or with another accumulation, keeps its data order.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import Sampler

from shared.errors import ConfigError

Batch = list[tuple[int, bool]]


@dataclass(frozen=True)
class BatchSplit:
    """One optimiser step's `global_batch` items: `world_size` processes x `grad_accum` micro-steps x `per_rank`."""

    global_batch: int
    world_size: int
    grad_accum: int

    def __post_init__(self):
        if isinstance(self.grad_accum, bool) or not isinstance(self.grad_accum, int) or self.grad_accum < 1:
            raise ConfigError(f"train.grad_accum={self.grad_accum!r} must be a whole number >= 1")
        if self.global_batch % (self.world_size * self.grad_accum):
            raise ConfigError(f"the global batch train.batch_size={self.global_batch} does not split into "
                              f"{self.world_size} processes x {self.grad_accum} micro-steps (train.grad_accum): "
                              f"make it a multiple of {self.world_size * self.grad_accum}")

    @property
    def per_rank(self) -> int:
        """Items of one process in one micro-step."""
        return self.global_batch // (self.world_size * self.grad_accum)

    def first_micro_batch(self, step: int) -> int:
        """The index of step `step`'s first micro-batch in a process's stream of micro-batches."""
        return step * self.grad_accum

    def describe(self) -> dict[str, int]:
        return {"global_batch": self.global_batch, "world_size": self.world_size, "per_rank_batch": self.per_rank,
                "grad_accum": self.grad_accum}


class ResumableBatchSampler(Sampler[Batch]):
    """Batches of (index, flip) for one rank.

    train (infinite=True): epoch e is a permutation drawn from (seed, e), cut to a multiple of the global batch
    world_size * batch_size * micro_steps so every rank gets the same number of full batches and every global batch
    lies in one epoch. Batch j of rank r is items [(j W + r) b, (j W + r + 1) b) of the epoch's order: global batch
    k (the batches k M ... k M + M - 1 of every rank) is the same items for any split of it, and its part number
    m W + r (micro-step m, rank r) the same items for any split with the same W M.
    Iteration starts at this rank's batch `start_batch` and never ends.
    eval (infinite=False, shuffle=False, random_flip=False): one ordered pass, rank r takes items r, r + W, ...,
    the last batch may be short.
    """

    def __init__(self, num_items: int, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 random_flip: bool = True, rank: int = 0, world_size: int = 1, micro_steps: int = 1,
                 start_batch: int = 0, infinite: bool = True):
        if num_items <= 0:
            raise ValueError("cannot sample from an empty data set")
        if batch_size < 1 or world_size < 1:  # an empty batch would make the epoch loop below spin for ever
            raise ValueError(f"batch_size ({batch_size}) and world_size ({world_size}) must be at least 1")
        if infinite and num_items < batch_size * world_size * micro_steps:
            raise ValueError(f"{num_items} items are fewer than one global batch ({batch_size} x {world_size} ranks x "
                             f"{micro_steps} micro-steps)")
        self.num_items, self.batch_size, self.micro_steps = num_items, batch_size, micro_steps
        self.seed, self.shuffle, self.random_flip = seed, shuffle, random_flip
        self.rank, self.world_size = rank, world_size
        self.start_batch, self.infinite = start_batch, infinite

    @property
    def batches_per_epoch(self) -> int:
        if self.infinite:
            return self.num_items // (self.batch_size * self.world_size * self.micro_steps) * self.micro_steps
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
            mine = order.view(-1, self.world_size, self.batch_size)[:, self.rank].flatten().tolist()
        else:
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
