"""The training loop of both stages.

A stage hands the loop a `TrainModule`: an nn.Module whose `forward(batch, step, phase)` returns `(loss, logs)` for
one optimiser ("phase": stage 1 has a generator and a discriminator phase, stage 2 a single one). The loop owns the
rest: data order and resume, device moves, autocast, backward, gradient accumulation, clipping, the non-finite
guard, optimiser steps, warm-up, EMA, logging, evaluations, checkpoints, pre-emption. Distribution is torch's DDP or
a DeepSpeed engine, never our own (shared/train/backends.py).

`LoopConfig.batch_size` is the global batch of one optimiser step, as in the papers: it is split across the
processes and `grad_accum` micro-steps (shared/data/sampler.py: BatchSplit), with the gradients of one step over
all of it (to fp32 rounding; the loss must be a mean over the batch's items). A run resumed with another number of
processes or micro-steps sees the same global batches. Each micro-step draws its randomness (noise, times, label
dropout) from a seed of (seed, step, phase, part of the global batch), so two splits with the same number of parts
(2 processes, or 1 with grad_accum=2) compute the same steps, and losses are logged averaged over the processes.

One host sync per phase and step remains on purpose: deciding to skip a step whose loss or gradient is not finite
needs the value on the host (as GradScaler does). Losses for logging stay on the device until a log step.
"""
from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from shared.data.sampler import BatchSplit
from shared.errors import ConfigError, UserError
from shared.preemption import Preempted, PreemptionFlag
from shared.runtime import Runtime, seed_everything
from shared.train.backends import OptimConfig, Update, make_backend
from shared.train.checkpoint import CheckpointDir, fit_weights
from shared.train.ema import EMA


class TrainModule(nn.Module):
    """What a stage gives the loop. Subclasses implement the four methods below."""

    def phases(self) -> list[str]:
        raise NotImplementedError

    def is_active(self, phase: str, step: int) -> bool:
        """Whether `phase` trains at `step` (e.g. the discriminator only after its start step)."""
        return True

    def phase_parameters(self, phase: str) -> list[nn.Parameter]:
        raise NotImplementedError

    def networks(self) -> dict[str, nn.Module]:
        """The networks saved in checkpoints, by name; the first is the one tracked by EMA."""
        raise NotImplementedError


@dataclass
class LoopConfig:
    steps: int
    batch_size: int  # the global batch of one optimiser step
    grad_accum: int = 1
    log_every: int = 50
    ckpt_every: int = 1000
    sample_every: int = 0
    evaluate_every: int = 0
    ema_decay: float = 0.999
    max_nonfinite: int = 10
    keep_checkpoints: int = 2
    keep_steps: tuple[int, ...] = ()  # checkpoints written at these steps too, and never removed
    optim: dict[str, OptimConfig] = field(default_factory=dict)


# The peak memory of the first steps holds the weights, optimiser state and one step's activations: what decides
# whether a batch fits.
PEAK_MEMORY_STEPS = 3


class NonFiniteError(UserError):
    """Too many non-finite steps in a row: the learning rate or the data are the user's to fix."""


def _rng_state() -> dict:
    """Every generator's state as tensors and plain values, so that a checkpoint loads with weights_only=True."""
    numpy_state = np.random.get_state(legacy=False)  # {"bit_generator", "state": {"key", "pos"}, "has_gauss", "gauss"}
    numpy_state["state"] = {"key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                            "pos": int(numpy_state["state"]["pos"])}
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        key = np.asarray(numpy_state["state"]["key"], dtype=np.int64).astype(np.uint32)
        numpy_state = {**numpy_state, "state": {**numpy_state["state"], "key": key}}
    np.random.set_state(numpy_state)  # a dict, or the legacy tuple of a checkpoint written before plain values
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def log_peak_memory(runtime: Runtime, steps: int) -> None:
    """On CUDA, log the peak memory since the start: allocated by tensors, and reserved by the caching allocator."""
    if runtime.device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(runtime.device).total_memory
    runtime.log.info("peak CUDA memory over the first %d steps: %.2f GiB allocated, %.2f GiB reserved, of %.2f GiB",
                     steps, torch.cuda.max_memory_allocated(runtime.device) / 2**30,
                     torch.cuda.max_memory_reserved(runtime.device) / 2**30, total / 2**30)


def _gather_rng(runtime: Runtime) -> list[dict]:
    """Every rank's RNG state, in rank order, so each rank resumes its own stream."""
    mine = _rng_state()
    if not runtime.distributed:
        return [mine]
    states = [None] * runtime.world_size
    dist.all_gather_object(states, mine)
    return states


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _mean_over_ranks(sums: dict[str, torch.Tensor], runtime: Runtime) -> dict[str, torch.Tensor]:
    """The processes' mean of each logged sum (every process logs the same keys: its updates are decided together)."""
    if not runtime.distributed or not sums:
        return sums
    keys = sorted(sums)
    stacked = torch.stack([sums[key].to(runtime.device) for key in keys])
    dist.all_reduce(stacked)
    return dict(zip(keys, stacked / runtime.world_size))


def _has_items(batch: dict) -> bool:
    return any(torch.is_tensor(v) and len(v) > 0 for v in batch.values())


def micro_step_seed(seed: int, step: int, phase: int, part: int) -> int:
    """The seed of micro-step part `part` (micro-step m of rank r: m W + r) of phase number `phase` at `step`."""
    return int(np.random.SeedSequence([seed, step, phase, part]).generate_state(1)[0])


def _train_phase(backend, runtime: Runtime, phase: str, phase_number: int, step: int,
                 micro_batches: list[tuple[int, dict]]) -> tuple[Update, torch.Tensor, dict]:
    """One phase's update over the step's (micro-step, micro-batch) pairs: (what it did, gradient norm, logs averaged
    over them)."""
    losses, logs = [], {}
    for position, (micro, batch) in enumerate(micro_batches):
        torch.manual_seed(micro_step_seed(runtime.cfg.seed, step, phase_number,
                                          micro * runtime.world_size + runtime.rank))
        loss, micro_logs = backend.micro_step(phase, batch, step, position,
                                              last=position == len(micro_batches) - 1)
        losses.append(loss.detach().float())
        for key, value in micro_logs.items():
            logs[key] = logs.get(key, 0.0) + value.detach().float() / len(micro_batches)
    update, grad_norm = backend.update(phase, torch.isfinite(torch.stack(losses)).all())
    return update, grad_norm, logs


@dataclass
class TrainResult:
    step: int
    checkpoint: Path | None
    nonfinite_steps: int
    train_seconds: float | None  # over every invocation; None when resumed from a checkpoint that did not count it


def train(runtime: Runtime, module: TrainModule, make_batches: Callable[[BatchSplit, int], Iterator[dict]],
          loop: LoopConfig, *, model_config: dict, on_sample: Callable[[int, EMA], None] | None = None,
          on_evaluate: Callable[[int, EMA], dict] | None = None, deepspeed_config: dict | None = None,
          progress: bool = True) -> TrainResult:
    """Train `module` for `loop.steps` optimiser steps, resuming from the newest checkpoint in the run folder.

    make_batches(split, start_step) returns this process's micro-batches of `split.per_rank` items, positioned at
    step `start_step` (`split.grad_accum` per step; shared/data/sampler.py), which is what makes a resumed run see
    the same data as an uninterrupted one. `model_config` is stored in every checkpoint so that inference can
    rebuild the networks from the checkpoint alone. on_sample(step, ema) runs on the main process every
    `sample_every` steps; on_evaluate(step, ema) on every process every `evaluate_every` steps, and the metrics it
    returns on the main process go into metrics.jsonl.
    """
    split = BatchSplit(loop.batch_size, runtime.world_size, loop.grad_accum)
    module.to(runtime.device)
    seed_everything(runtime.cfg.seed + runtime.rank)  # each rank draws its own noise
    backend = make_backend(runtime, module, loop.optim, deepspeed_config, split)
    ema_name, ema_source = next(iter(module.networks().items()))
    ema = EMA(ema_source, loop.ema_decay)
    checkpoints = CheckpointDir(runtime.run_dir / "checkpoints", keep=loop.keep_checkpoints,
                                keep_steps=loop.keep_steps)
    # train_seconds: the wall time of every invocation up to the newest checkpoint (work after a crash's last
    # checkpoint is redone and not counted), so that a resumed run reports its whole cost; None once a run resumes
    # from a checkpoint written before the count existed.
    counters = {"nonfinite_steps": 0, "nonfinite_in_row": 0, "skipped_images": 0, "overflow_steps": 0,
                "train_seconds": 0.0}

    start_step = 0
    state = checkpoints.load_latest()
    if state is not None:
        if state.get("config") != model_config:
            raise ConfigError(f"the checkpoint in {checkpoints.directory} was written for another model config; "
                              f"use a new name=... for this config or delete that run")
        for name, network in module.networks().items():
            fit_weights(network, state["models"][name], checkpoints.directory)
        fit_weights(ema.model, state["ema"][ema_name], checkpoints.directory)
        start_step = state["step"]
        backend.load_state_dict(state["backend"], checkpoints.directory, start_step)
        counters.update({"train_seconds": None, **state["counters"]})
        if len(state["rng"]) == runtime.world_size:  # on another number of processes, the streams seeded above
            _set_rng_state(state["rng"][runtime.rank])
        runtime.log.info("resumed from %s at step %d", checkpoints.path(start_step), start_step)
    runtime.save_config(start_step)  # accepted: the checkpoint, if any, was written for this model config
    runtime.forget_metrics_after(start_step)
    if start_step >= loop.steps:
        runtime.log.info("already trained for %d steps; nothing to do", start_step)
        return TrainResult(start_step, checkpoints.latest(), counters["nonfinite_steps"], counters["train_seconds"])
    began, seconds_before = time.perf_counter(), counters["train_seconds"]

    def train_seconds() -> float | None:
        return None if seconds_before is None else round(seconds_before + time.perf_counter() - began, 1)

    def save(step: int) -> Path | None:
        counters["train_seconds"] = train_seconds()
        backend.save_extra(checkpoints.directory, step)
        rng = _gather_rng(runtime)
        if not runtime.is_main:
            return None
        state = {"step": step, "config": model_config, "counters": dict(counters), "rng": rng,
                 "models": {name: net.state_dict() for name, net in module.networks().items()},
                 "ema": {ema_name: ema.model.state_dict()}, "backend": backend.state_dict()}
        path = checkpoints.save(state, step)
        runtime.log.info("checkpoint %s", path)
        return path

    runtime.log.info("global batch %d = %d processes x %d micro-steps (train.grad_accum) x %d per process",
                     split.global_batch, split.world_size, split.grad_accum, split.per_rank)
    # A DataLoader draws its workers' base seed from torch's generator when iterated: built outside the training
    # stream, it would otherwise shift every later draw of a resumed run against the uninterrupted one.
    with torch.random.fork_rng(devices=[]):
        batches = make_batches(split, start_step)
    window = {"sums": {}, "counts": {}, "steps": 0, "time": time.perf_counter()}
    bar = tqdm(total=loop.steps, initial=start_step, unit="step", dynamic_ncols=True,
               disable=not (progress and runtime.is_main))
    last_checkpoint = None
    with PreemptionFlag() as preemption:
        for step in range(start_step, loop.steps):
            micro_batches = [next(batches) for _ in range(split.grad_accum)]
            counters["skipped_images"] += sum(int(batch.pop("skipped", 0)) for batch in micro_batches)
            micro_batches = [(micro, _to_device(batch, runtime.device)) for micro, batch in enumerate(micro_batches)
                             if _has_items(batch)]
            if not micro_batches:
                runtime.log.warning("step %d: every image of the batch was unreadable; no update", step)
                bar.update(1)
                continue
            step_logs, failed = {}, {}
            for phase_number, phase in enumerate(module.phases()):
                if not module.is_active(phase, step):
                    continue
                update, grad_norm, logs = _train_phase(backend, runtime, phase, phase_number, step, micro_batches)
                step_logs.update(logs)
                if update is Update.OVERFLOW:
                    counters["overflow_steps"] += 1
                else:
                    step_logs[f"{phase}/grad_norm"] = grad_norm.detach()
                if update is Update.NONFINITE:
                    failed[phase] = {k: float(v) for k, v in logs.items()}
            if failed:
                counters["nonfinite_steps"] += 1
                counters["nonfinite_in_row"] += 1
                runtime.log.warning("step %d: non-finite loss or gradient, update skipped: %s", step,
                                    json.dumps(failed))
                if counters["nonfinite_in_row"] >= loop.max_nonfinite:
                    # The skipped steps wrote no metrics row: record the counters before stopping.
                    runtime.log_metrics(step, {"nonfinite_steps": counters["nonfinite_steps"],
                                               "skipped_images": counters["skipped_images"]})
                    save(step)
                    raise NonFiniteError(
                        f"{counters['nonfinite_in_row']} steps in a row ended non-finite (last at step {step}; "
                        f"loss terms {json.dumps(failed)}). A checkpoint of step {step} was kept in "
                        f"{checkpoints.directory}. Lower the learning rate or check the data.")
                continue
            counters["nonfinite_in_row"] = 0
            ema.update(ema_source)
            done = step + 1
            for key, value in step_logs.items():
                window["sums"][key] = window["sums"].get(key, 0.0) + value.detach().float()
                window["counts"][key] = window["counts"].get(key, 0) + 1
            window["steps"] += 1
            bar.update(1)
            if done == min(start_step + PEAK_MEMORY_STEPS, loop.steps):
                log_peak_memory(runtime, done - start_step)
            if done % loop.log_every == 0 or done == loop.steps:
                elapsed = time.perf_counter() - window["time"]
                sums = _mean_over_ranks(window["sums"], runtime)
                values = {k: float(v) / window["counts"][k] for k, v in sums.items()}
                values.update({f"{p}/lr": backend.lr(p) for p in module.phases()})
                values["images_per_s"] = window["steps"] * split.global_batch / elapsed
                values.update(nonfinite_steps=counters["nonfinite_steps"],
                              skipped_images=counters["skipped_images"], **split.describe())
                if seconds_before is not None:
                    values["train_seconds"] = train_seconds()
                if backend.loss_scale() is not None:
                    values.update(loss_scale=backend.loss_scale(), overflow_steps=counters["overflow_steps"])
                runtime.log_metrics(done, values)
                bar.set_postfix({k: f"{v:.4g}" for k, v in values.items() if "/" not in k or k.endswith("loss")})
                window = {"sums": {}, "counts": {}, "steps": 0, "time": time.perf_counter()}
            if on_sample is not None and loop.sample_every and done % loop.sample_every == 0 and runtime.is_main:
                on_sample(done, ema)
            saved = (done % loop.ckpt_every == 0 or done in loop.keep_steps or done == loop.steps
                     or preemption.signal_name)
            if saved:
                last_checkpoint = save(done)
            if on_evaluate is not None and loop.evaluate_every and done % loop.evaluate_every == 0:
                began = time.perf_counter()
                runtime.log_metrics(done, on_evaluate(done, ema))
                window["time"] += time.perf_counter() - began  # images/s counts training only
            if preemption.signal_name:
                if not saved:  # the signal came during the evaluation
                    last_checkpoint = save(done)
                bar.close()
                raise Preempted(f"received {preemption.signal_name}: saved step {done} in {checkpoints.directory}; "
                                f"rerun the same command to resume")
    bar.close()
    return TrainResult(loop.steps, last_checkpoint or checkpoints.latest(), counters["nonfinite_steps"],
                       train_seconds())
