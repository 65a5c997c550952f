"""The training loop of both stages.

A stage hands the loop a `TrainModule`: an nn.Module whose `forward(batch, step, phase)` returns `(loss, logs)` for
one optimiser ("phase": stage 1 has a generator and a discriminator phase, stage 2 a single one). The loop owns the
rest: data order and resume, device moves, autocast, backward, clipping, the non-finite guard, optimiser steps,
warm-up, EMA, logging, checkpoints, pre-emption. Distribution is torch's DDP or a DeepSpeed engine, never our own.

One host sync per phase and step remains on purpose: deciding to skip a step whose loss or gradient is not finite
needs the value on the host (as GradScaler does). Losses for logging stay on the device until a log step.
"""
from __future__ import annotations

import json
import math
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
from shared.train.checkpoint import CheckpointDir, refuse_code_in
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
class OptimConfig:
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float | None = None


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


def build_optimizer(parameters, optim: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (Adam when weight_decay = 0), fused on CUDA, multi-tensor elsewhere."""
    fused = device.type == "cuda"
    return torch.optim.AdamW(parameters, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay,
                             fused=fused, foreach=None if fused else True)


def linear_warmup(optimizer, warmup_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))


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


class _LocalBackend:
    """Plain or DDP training: one optimiser and warm-up schedule per phase."""

    def __init__(self, runtime: Runtime, module: TrainModule, loop: LoopConfig):
        self.module = module
        self.wrapped = module
        if runtime.distributed:
            device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
            # A phase leaves the other phase's parameters without gradients (e.g. the encoder during the
            # discriminator step), so DDP must look for unused parameters.
            self.wrapped = nn.parallel.DistributedDataParallel(module, device_ids=device_ids,
                                                               find_unused_parameters=len(module.phases()) > 1)
        self.optimizers, self.schedulers, self.clip = {}, {}, {}
        for phase in module.phases():
            optim = loop.optim[phase]
            self.optimizers[phase] = build_optimizer(module.phase_parameters(phase), optim, runtime.device)
            self.schedulers[phase] = linear_warmup(self.optimizers[phase], optim.warmup_steps)
            self.clip[phase] = optim.grad_clip
        self.distributed = runtime.distributed

    def forward(self, batch, step, phase):
        return self.wrapped(batch, step, phase)

    def backward_and_step(self, phase: str, loss: torch.Tensor) -> tuple[bool, torch.Tensor]:
        """Backward and optimiser step unless the loss or gradient is not finite. Returns (stepped, grad_norm)."""
        optimizer = self.optimizers[phase]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        parameters = self.module.phase_parameters(phase)
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, self.clip[phase] or math.inf)
        finite = torch.isfinite(grad_norm) & torch.isfinite(loss.detach())
        if self.distributed:  # every rank must take the same decision
            finite = finite.to(torch.int32)
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not bool(finite):
            optimizer.zero_grad(set_to_none=True)
            return False, grad_norm
        optimizer.step()
        self.schedulers[phase].step()
        return True, grad_norm

    def lr(self, phase: str) -> float:
        return self.optimizers[phase].param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()}}

    def load_state_dict(self, state: dict, checkpoint_dir: Path, step: int) -> None:
        for phase, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][phase])
            self.schedulers[phase].load_state_dict(state["schedulers"][phase])

    def save_extra(self, checkpoint_dir: Path, step: int) -> None:
        pass


# What DeepSpeed's optimiser shards reference besides tensors and plain values: its own plain-data classes.
DEEPSPEED_GLOBALS = frozenset({"deepspeed.runtime.zero.config.ZeroStageEnum",
                               "deepspeed.utils.tensor_fragment.fragment_address",
                               "deepspeed.runtime.fp16.loss_scaler.LossScaler",
                               "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"})


class _DeepSpeedBackend:
    """A DeepSpeed engine around the module (one phase). The engine owns optimiser, clipping and warm-up via the
    JSON config; its own checkpoint (optimizer shards) sits beside ours under checkpoints/deepspeed/."""

    def __init__(self, runtime: Runtime, module: TrainModule, loop: LoopConfig, ds_config: dict):
        import deepspeed

        if len(module.phases()) != 1:
            raise ConfigError("launcher=deepspeed trains single-optimiser stages (stage=ldm); train the GAN-based "
                              "tokenizer with launcher=ddp")
        phase = module.phases()[0]
        optim = loop.optim[phase]
        ds_config = dict(ds_config)
        ds_config.setdefault("gradient_clipping", optim.grad_clip or 0.0)
        ds_config.setdefault("optimizer", {"type": "AdamW", "params": {}})
        ds_config["optimizer"]["params"].update(lr=optim.lr, betas=list(optim.betas),
                                                weight_decay=optim.weight_decay)
        # torch's Adam avoids compiling DeepSpeed's FusedAdam, which needs a CUDA toolchain.
        ds_config["optimizer"]["params"].setdefault("torch_adam", runtime.device.type != "cuda")
        ds_config.setdefault("scheduler", {"type": "WarmupLR", "params": {
            "warmup_min_lr": 0.0, "warmup_max_lr": optim.lr, "warmup_num_steps": max(1, optim.warmup_steps),
            "warmup_type": "linear"}})
        ds_config["bf16"] = {"enabled": runtime.autocast_dtype == torch.bfloat16}
        if ds_config.get("zero_optimization", {}).get("stage", 0) >= 3:
            raise ConfigError("ZeRO stage 3 shards the weights; use stage 0-2 so checkpoints load without DeepSpeed")
        self.module = module
        self.phase = phase
        self.engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=module.phase_parameters(phase),
                                                    config=ds_config)
        self.wrapped = self.engine

    def forward(self, batch, step, phase):
        return self.engine(batch, step, phase)

    def backward_and_step(self, phase: str, loss: torch.Tensor) -> tuple[bool, torch.Tensor]:
        finite = torch.isfinite(loss.detach()).to(torch.int32)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not bool(finite):  # the engine has no skip for fp32/bf16: do not let a NaN reach the weights
            return False, torch.tensor(float("nan"))
        self.engine.backward(loss)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return True, torch.tensor(float(norm) if norm is not None else float("nan"))

    def lr(self, phase: str) -> float:
        return self.engine.get_lr()[0]

    def state_dict(self) -> dict:
        return {}

    def save_extra(self, checkpoint_dir: Path, step: int) -> None:
        self.engine.save_checkpoint(str(checkpoint_dir / "deepspeed"), tag=f"step_{step:09d}")

    def load_state_dict(self, state: dict, checkpoint_dir: Path, step: int) -> None:
        tag = f"step_{step:09d}"
        if not (checkpoint_dir / "deepspeed" / tag).is_dir():
            raise ConfigError(f"the checkpoint of step {step} in {checkpoint_dir} was written without DeepSpeed (no "
                              f"deepspeed/{tag}); resume it with the launcher that wrote it, or start a new name=...")
        refuse_code_in(checkpoint_dir / "deepspeed" / tag, DEEPSPEED_GLOBALS)  # DeepSpeed loads them unsafely
        self.engine.load_checkpoint(str(checkpoint_dir / "deepspeed"), tag=tag)


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
    backend = (_DeepSpeedBackend(runtime, module, loop, deepspeed_config) if deepspeed_config is not None
               else _LocalBackend(runtime, module, loop))
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
