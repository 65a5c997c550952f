"""One comparison of ours against theirs: `Context.side_by_side` times both and turns the times into a `Row`."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig
from torch import nn

from pipelines.bench.timing import count_flops, seconds_side_by_side
from shared.runtime import Runtime


@dataclass
class Row:
    """One comparison: throughput of ours and theirs in `unit` (items per second, of the fastest calls), their FLOP/s
    fractions, and the range of ours / theirs over the rounds of alternating calls (None for a single rate)."""

    name: str
    unit: str
    ours: float
    theirs: float
    ours_flops: int | None = None  # per call
    theirs_flops: int | None = None
    ours_flops_fraction: float | None = None
    theirs_flops_fraction: float | None = None
    target: float | None = None
    note: str = ""
    ratio_range: list[float] | None = None
    ratio: float = field(init=False)

    def __post_init__(self):
        self.ratio = self.ours / self.theirs

    @property
    def missed(self) -> bool:
        return self.target is not None and self.ratio < self.target


@dataclass
class Context:
    """What every section needs: the bench settings, the runtime and the machine's measured FLOP/s limit."""

    bench: DictConfig
    runtime: Runtime
    peak_flops: float

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    def side_by_side(self, name: str, unit: str, items: int, ours: Callable[[], object],
                     theirs: Callable[[], object], *, flops: tuple[int, int] | None = None, warmup: int | None = None,
                     repeats: int | None = None, **extra) -> Row:
        """Time ours against theirs (each call handles `items` items) and turn the times into a Row.

        flops: FLOPs per call of ours and theirs; counted by running each once more when not given.
        warmup, repeats: instead of bench.warmup / bench.repeats, for calls that are long and already warm."""
        with self.runtime.autocast():
            if flops is None:
                flops = count_flops(ours), count_flops(theirs)
            ours_times, theirs_times = seconds_side_by_side(
                ours, theirs, self.device, self.bench.warmup if warmup is None else warmup,
                self.bench.repeats if repeats is None else repeats)
        ours_seconds, theirs_seconds = min(ours_times), min(theirs_times)
        self.runtime.log.info("%s: ours %.4g s, theirs %.4g s per call", name, ours_seconds, theirs_seconds)
        round_ratios = [theirs_time / ours_time for ours_time, theirs_time in zip(ours_times, theirs_times)]
        return Row(name, unit, items / ours_seconds, items / theirs_seconds, flops[0], flops[1],
                   flops[0] / ours_seconds / self.peak_flops, flops[1] / theirs_seconds / self.peak_flops,
                   ratio_range=[min(round_ratios), max(round_ratios)], **extra)

    def prepare(self, model: nn.Module, convolutional: bool = False) -> nn.Module:
        """On the device, optionally compiled; a convolutional network channels-last (NHWC), which suits both
        cuDNN's tensor cores and oneDNN on the CPU (about 20% faster SD-VAE decoding here)."""
        model = model.to(self.device, memory_format=torch.channels_last if convolutional else torch.contiguous_format)
        return torch.compile(model) if self.bench.compile else model
