"""The training loop of both stages.

A stage hands the loop a `TrainModule`: an nn.Module whose `forward(batch, step, phase)` returns `(loss, logs)` for
one optimiser ("phase": stage 1 has a generator and a discriminator phase, stage 2 a single one). The loop owns the
rest: data order and resume, device moves, autocast, backward, clipping, the non-finite guard, optimiser steps,
warm-up, EMA, logging, checkpoints, pre-emption. Distribution is torch's DDP or a DeepSpeed engine, never our own
(shared/train/backends.py).

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

from shared.errors import ConfigError, UserError
from shared.preemption import Preempted, PreemptionFlag
from shared.runtime import Runtime, seed_everything
from shared.train.backends import OptimConfig, make_backend
from shared.train.checkpoint import CheckpointDir
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
    log_every: int = 50
    ckpt_every: int = 1000
    sample_every: int = 0
    ema_decay: float = 0.999
    max_nonfinite: int = 10
    keep_checkpoints: int = 2
    optim: dict[str, OptimConfig] = field(default_factory=dict)


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


@dataclass
class TrainResult:
    step: int
    checkpoint: Path | None
    nonfinite_steps: int


def train(runtime: Runtime, module: TrainModule, make_batches: Callable[[int], Iterator[dict]], loop: LoopConfig,
          *, model_config: dict, images_per_batch: int, on_sample: Callable[[int, EMA], None] | None = None,
          deepspeed_config: dict | None = None, progress: bool = True) -> TrainResult:
    """Train `module` for `loop.steps` optimiser steps, resuming from the newest checkpoint in the run folder.

    make_batches(start_step) returns the batch iterator positioned at `start_step` (one batch per step), which is
    what makes a resumed run see the same data as an uninterrupted one. `model_config` is stored in every checkpoint
    so that inference can rebuild the networks from the checkpoint alone.
    """
    module.to(runtime.device)
    seed_everything(runtime.cfg.seed + runtime.rank)  # each rank draws its own noise
    backend = make_backend(runtime, module, loop.optim, deepspeed_config)
    ema_name, ema_source = next(iter(module.networks().items()))
    ema = EMA(ema_source, loop.ema_decay)
    checkpoints = CheckpointDir(runtime.run_dir / "checkpoints", keep=loop.keep_checkpoints)
    counters = {"nonfinite_steps": 0, "nonfinite_in_row": 0, "skipped_images": 0}

    start_step = 0
    state = checkpoints.load_latest()
    if state is not None:
        if state.get("config") != model_config:
            raise ConfigError(f"the checkpoint in {checkpoints.directory} was written for another model config; "
                              f"use a new name=... for this config or delete that run")
        for name, network in module.networks().items():
            network.load_state_dict(state["models"][name])
        ema.model.load_state_dict(state["ema"][ema_name])
        start_step = state["step"]
        backend.load_state_dict(state["backend"], checkpoints.directory, start_step)
        counters.update(state["counters"])
        _set_rng_state(state["rng"][runtime.rank] if runtime.rank < len(state["rng"]) else state["rng"][0])
        runtime.log.info("resumed from %s at step %d", checkpoints.path(start_step), start_step)
    runtime.save_config()  # accepted: the checkpoint, if any, was written for this model config
    runtime.forget_metrics_after(start_step)
    if start_step >= loop.steps:
        runtime.log.info("already trained for %d steps; nothing to do", start_step)
        return TrainResult(start_step, checkpoints.latest(), counters["nonfinite_steps"])

    def save(step: int) -> Path | None:
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

    # A DataLoader draws its workers' base seed from torch's generator when iterated: built outside the training
    # stream, it would otherwise shift every later draw of a resumed run against the uninterrupted one.
    with torch.random.fork_rng(devices=[]):
        batches = make_batches(start_step)
    window = {"losses": {}, "count": 0, "time": time.perf_counter()}
    bar = tqdm(total=loop.steps, initial=start_step, unit="step", dynamic_ncols=True,
               disable=not (progress and runtime.is_main))
    last_checkpoint = None
    with PreemptionFlag() as preemption:
        for step in range(start_step, loop.steps):
            batch = _to_device(next(batches), runtime.device)
            counters["skipped_images"] += int(batch.pop("skipped", 0))
            if not any(torch.is_tensor(v) and len(v) > 0 for v in batch.values()):
                runtime.log.warning("step %d: every image of the batch was unreadable; no update", step)
                bar.update(1)
                continue
            step_logs, failed = {}, {}
            for phase in module.phases():
                if not module.is_active(phase, step):
                    continue
                with runtime.autocast():
                    loss, logs = backend.forward(batch, step, phase)
                stepped, grad_norm = backend.backward_and_step(phase, loss)
                step_logs.update(logs)
                step_logs[f"{phase}/grad_norm"] = grad_norm.detach()
                if not stepped:
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
                window["losses"][key] = window["losses"].get(key, 0.0) + value.detach().float()
            window["count"] += 1
            bar.update(1)
            if done % loop.log_every == 0 or done == loop.steps:
                elapsed = time.perf_counter() - window["time"]
                values = {k: float(v) / window["count"] for k, v in window["losses"].items()}
                values.update({f"{p}/lr": backend.lr(p) for p in module.phases()})
                values["images_per_s"] = window["count"] * images_per_batch * runtime.world_size / elapsed
                values.update(nonfinite_steps=counters["nonfinite_steps"],
                              skipped_images=counters["skipped_images"])
                runtime.log_metrics(done, values)
                bar.set_postfix({k: f"{v:.4g}" for k, v in values.items() if "/" not in k or k.endswith("loss")})
                window = {"losses": {}, "count": 0, "time": time.perf_counter()}
            if on_sample is not None and loop.sample_every and done % loop.sample_every == 0 and runtime.is_main:
                on_sample(done, ema)
            if done % loop.ckpt_every == 0 or done == loop.steps or preemption.signal_name:
                last_checkpoint = save(done)
            if preemption.signal_name:
                bar.close()
                raise Preempted(f"received {preemption.signal_name}: saved step {done} in {checkpoints.directory}; "
                                f"rerun the same command to resume")
    bar.close()
    return TrainResult(loop.steps, last_checkpoint or checkpoints.latest(), counters["nonfinite_steps"])
