"""The timing harness: calls timed with the device synchronised around them, alternating calls of ours and theirs,
FLOPs per call, the machine's measured FLOP/s limit, and the rate of a data loader.

Every timed call is kept: the fastest is the estimate of a call's own cost (noise from other processes only ever
adds time), the slowest bounds what the load on the machine did to it, and a ratio comes with the range of its
values over the timed calls."""
from __future__ import annotations

import time
from collections.abc import Callable

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from shared.runtime import synchronize

LIMIT_REPEATS = 10  # cheap (a 2048² matmul is 17 GFLOP), and the limit is their best


def timed_call(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def seconds_side_by_side(ours: Callable[[], object], theirs: Callable[[], object], device: torch.device,
                         warmup: int, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds of each of `repeats` calls of `ours` and of `theirs`, timed alternately: call i of each ran in the
    same round, back to back, under the same load."""
    for _ in range(warmup):
        ours()
        theirs()
    ours_times, theirs_times = [], []
    for _ in range(repeats):
        ours_times.append(timed_call(ours, device))
        theirs_times.append(timed_call(theirs, device))
    return ours_times, theirs_times


def count_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def call_seconds(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    return [timed_call(fn, device) for _ in range(repeats)]


def best_flops_per_second(fn: Callable[[], object], flops: int, device: torch.device, warmup: int,
                          repeats: int) -> float:
    """FLOP/s of `fn` from its fastest call: a limit is the best the machine does."""
    return flops / min(call_seconds(fn, device, warmup, repeats))


@torch.no_grad()
def measured_limits(device: torch.device, dtype: torch.dtype, bench: DictConfig) -> dict:
    """FLOP/s of a square matmul and of a channels-last 3×3 convolution, and the better of the two."""
    size = bench.matmul_size
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    matmul = best_flops_per_second(lambda: a @ b, 2 * size**3, device, bench.warmup, LIMIT_REPEATS)
    channels, side = bench.conv_channels, bench.conv_size
    conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(device, dtype, memory_format=torch.channels_last)
    x = torch.randn(1, channels, side, side, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    conv_flops = 2 * channels * channels * 9 * side * side
    convolution = best_flops_per_second(lambda: conv(x), conv_flops, device, bench.warmup, LIMIT_REPEATS)
    return {"dtype": str(dtype), "matmul": {"size": size, "flops_per_second": matmul},
            "conv3x3": {"channels": channels, "size": side, "flops_per_second": convolution},
            "flops_per_second": max(matmul, convolution)}


def loader_items_per_second(loader, key: str, warmup_batches: int, *, items: int | None = None,
                            batches: int | None = None) -> float:
    """Draw `warmup_batches` untimed (worker start-up, first reads), then time `batches` batches or, given `items`,
    enough batches for that many items; the rate counts the items of `batch[key]`."""
    iterator = iter(loader)
    for _ in range(warmup_batches):
        next(iterator)
    start, seen, drawn = time.perf_counter(), 0, 0
    while (seen < items) if items is not None else (drawn < batches):
        seen += len(next(iterator)[key])
        drawn += 1
    return seen / (time.perf_counter() - start)
