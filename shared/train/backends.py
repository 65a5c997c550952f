"""The training loop's backends: plain or DDP training with our optimisers, or a DeepSpeed engine that owns them.

A backend runs one phase's update as `grad_accum` micro-steps (forward and backward of one micro-batch each) and an
optimiser step, and saves and restores the optimiser state. The gradients of the micro-steps add up to those of the
mean loss over the global batch (shared/data/sampler.py: BatchSplit). `module` is the loop's TrainModule
(shared/train/loop.py): it names its phases and each phase's parameters.
"""
from __future__ import annotations

import contextlib
import enum
import functools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from shared.data.sampler import BatchSplit
from shared.errors import ConfigError
from shared.runtime import Runtime
from shared.train.checkpoint import refuse_code_in


class Update(enum.Enum):
    """What one phase's optimiser step did."""

    APPLIED = "applied"
    NONFINITE = "nonfinite"  # a loss or gradient was not finite: the step was skipped
    OVERFLOW = "overflow"    # fp16: the scaled gradients overflowed; the scaler skipped the step and lowered its scale


@dataclass
class OptimConfig:
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float | None = None


def build_optimizer(parameters, optim: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (Adam when weight_decay = 0), fused on CUDA, multi-tensor elsewhere."""
    fused = device.type == "cuda"
    return torch.optim.AdamW(parameters, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay,
                             fused=fused, foreach=None if fused else True)


def linear_warmup(optimizer, warmup_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))


class LocalBackend:
    """Plain or DDP training: one optimiser and warm-up schedule per phase."""

    def __init__(self, runtime: Runtime, module: nn.Module, optims: dict[str, OptimConfig], split: BatchSplit):
        self.module = module
        self.grad_accum = split.grad_accum
        self.autocast = runtime.autocast
        # fp16's range is too narrow for small gradients: the scaler multiplies the loss before backward, divides the
        # gradients after, and skips the steps whose gradients overflowed. Disabled, every call passes through.
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.autocast_dtype == torch.float16)
        self.wrapped = module
        if runtime.distributed:
            device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
            # A phase leaves the other phase's parameters without gradients (e.g. the encoder during the
            # discriminator step), so DDP must look for unused parameters.
            self.wrapped = nn.parallel.DistributedDataParallel(module, device_ids=device_ids,
                                                               find_unused_parameters=len(module.phases()) > 1)
        self.optimizers, self.schedulers, self.clip = {}, {}, {}
        for phase in module.phases():
            optim = optims[phase]
            self.optimizers[phase] = build_optimizer(module.phase_parameters(phase), optim, runtime.device)
            self.schedulers[phase] = linear_warmup(self.optimizers[phase], optim.warmup_steps)
            self.clip[phase] = optim.grad_clip
        self.distributed = runtime.distributed

    def micro_step(self, phase: str, batch: dict, step: int, micro: int, last: bool) -> tuple[torch.Tensor, dict]:
        """Forward and backward of micro-step `micro` of `phase`'s update at `step` (`last`: its final one); returns
        (loss, logs). Each adds the gradient of loss / grad_accum; under DDP the processes average the sum once, in
        the last micro-step."""
        if micro == 0:
            self.optimizers[phase].zero_grad(set_to_none=True)
        accumulating = self.distributed and not last
        with self.wrapped.no_sync() if accumulating else contextlib.nullcontext():
            with self.autocast():
                loss, logs = self.wrapped(batch, step, phase)
            self.scaler.scale(loss / self.grad_accum).backward()
        return loss, logs

    def update(self, phase: str, losses_finite: torch.Tensor) -> tuple[Update, torch.Tensor]:
        """The optimiser step of `phase` after its micro-steps, unless a loss (`losses_finite`: all were) or the
        gradient is not finite on any process. Returns (what it did, the gradient norm before clipping)."""
        optimizer = self.optimizers[phase]
        self.scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.module.phase_parameters(phase), self.clip[phase] or math.inf)
        finite = torch.stack([losses_finite, torch.isfinite(grad_norm)]).to(torch.int32)
        if self.distributed:  # every rank must take the same decision
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        losses_ok, gradients_ok = finite.tolist()
        if losses_ok and gradients_ok:
            self.scaler.step(optimizer)
            self.scaler.update()
            self.schedulers[phase].step()
            return Update.APPLIED, grad_norm
        self.scaler.update()  # an overflow lowers the scale
        optimizer.zero_grad(set_to_none=True)
        return (Update.OVERFLOW if losses_ok and self.scaler.is_enabled() else Update.NONFINITE), grad_norm

    def loss_scale(self) -> float | None:
        """fp16's current loss scale; None without one."""
        return self.scaler.get_scale() if self.scaler.is_enabled() else None

    def lr(self, phase: str) -> float:
        return self.optimizers[phase].param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict, checkpoint_dir: Path, step: int) -> None:
        for phase, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][phase])
            self.schedulers[phase].load_state_dict(state["schedulers"][phase])
        if self.scaler.is_enabled() and state.get("scaler"):  # written by an fp16 run
            self.scaler.load_state_dict(state["scaler"])

    def save_extra(self, checkpoint_dir: Path, step: int) -> None:
        pass


# What DeepSpeed's optimiser shards reference besides tensors and plain values: its own plain-data classes.
DEEPSPEED_GLOBALS = frozenset({"deepspeed.runtime.zero.config.ZeroStageEnum",
                               "deepspeed.utils.tensor_fragment.fragment_address",
                               "deepspeed.runtime.fp16.loss_scaler.LossScaler",
                               "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"})


class DeepSpeedBackend:
    """A DeepSpeed engine around the module (one phase). The engine owns optimiser, clipping, warm-up (linear_warmup,
    as LocalBackend's), gradient accumulation and fp16 loss scaling via the JSON config; its own checkpoint (optimizer
    shards) sits beside ours under checkpoints/deepspeed/."""

    def __init__(self, runtime: Runtime, module: nn.Module, optims: dict[str, OptimConfig], ds_config: dict,
                 split: BatchSplit):
        import deepspeed

        if len(module.phases()) != 1:
            raise ConfigError("launcher=deepspeed trains single-optimiser stages (stage=ldm); train the GAN-based "
                              "tokenizer with launcher=ddp")
        phase = module.phases()[0]
        optim = optims[phase]
        ds_config = dict(ds_config)
        ds_config.setdefault("gradient_clipping", optim.grad_clip or 0.0)
        ds_config.setdefault("optimizer", {"type": "AdamW", "params": {}})
        ds_config["optimizer"]["params"].update(lr=optim.lr, betas=list(optim.betas),
                                                weight_decay=optim.weight_decay)
        # torch's Adam avoids compiling DeepSpeed's FusedAdam, which needs a CUDA toolchain.
        ds_config["optimizer"]["params"].setdefault("torch_adam", runtime.device.type != "cuda")
        ds_config.update(train_batch_size=split.global_batch, train_micro_batch_size_per_gpu=split.per_rank,
                         gradient_accumulation_steps=split.grad_accum)
        ds_config["bf16"] = {"enabled": runtime.autocast_dtype == torch.bfloat16}
        ds_config["fp16"] = {**ds_config.get("fp16", {}), "enabled": runtime.autocast_dtype == torch.float16}
        if ds_config.get("zero_optimization", {}).get("stage", 0) >= 3:
            raise ConfigError("ZeRO stage 3 shards the weights; use stage 0-2 so checkpoints load without DeepSpeed")
        self.module = module
        self.phase = phase
        self.grad_accum = split.grad_accum
        self.autocast = runtime.autocast
        # Our warm-up, not DeepSpeed's WarmupLR (which holds the first two steps at its minimum), so that both backends
        # train with the same learning rates; a "scheduler" in the JSON replaces it.
        warmup = None if "scheduler" in ds_config else functools.partial(linear_warmup, warmup_steps=optim.warmup_steps)
        self.engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=module.phase_parameters(phase),
                                                    config=ds_config, lr_scheduler=warmup)
        self.nonfinite, self.skipped_before = False, 0

    def micro_step(self, phase: str, batch: dict, step: int, micro: int, last: bool) -> tuple[torch.Tensor, dict]:
        """Forward, backward and the engine's step of one micro-step; the engine averages the gradients and updates
        the weights at the last micro-step of a global batch. A non-finite loss never reaches the weights (the
        engine has no skip for fp32/bf16): with one micro-step its backward and step are left out; with several
        the engine cannot drop what it has accumulated, so it gets a zero gradient instead (keeping its count of
        micro-steps) and the update applies the other micro-steps' gradients."""
        if micro == 0:
            self.nonfinite, self.skipped_before = False, self.engine.skipped_steps
        with self.autocast():
            loss, logs = self.engine(batch, step, phase)
        finite = torch.isfinite(loss.detach()).to(torch.int32)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if bool(finite):
            self.engine.backward(loss)
        else:
            self.nonfinite = True
            if self.grad_accum == 1:
                return loss, logs
            self.engine.backward(sum(p.sum() for p in self.module.phase_parameters(phase)) * 0.0)
        self.engine.step()
        return loss, logs

    def update(self, phase: str, losses_finite: torch.Tensor) -> tuple[Update, torch.Tensor]:
        """What the engine's update at the end of the global batch did, and the gradient norm (the micro-steps
        checked their losses themselves)."""
        if self.nonfinite:
            return Update.NONFINITE, torch.tensor(float("nan"))
        if self.engine.skipped_steps > self.skipped_before:  # fp16: DeepSpeed's loss scaler skipped the step
            return Update.OVERFLOW, torch.tensor(float("nan"))
        norm = self.engine.get_global_grad_norm()
        return Update.APPLIED, torch.tensor(float(norm) if norm is not None else float("nan"))

    def loss_scale(self) -> float | None:
        """fp16's current loss scale; None without one."""
        return float(self.engine.optimizer.loss_scale) if self.engine.fp16_enabled() else None

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


def make_backend(runtime: Runtime, module: nn.Module, optims: dict[str, OptimConfig], deepspeed_config: dict | None,
                 split: BatchSplit) -> LocalBackend | DeepSpeedBackend:
    """DeepSpeed where the launcher gives its config, otherwise plain or DDP training."""
    if deepspeed_config is not None:
        return DeepSpeedBackend(runtime, module, optims, deepspeed_config, split)
    return LocalBackend(runtime, module, optims, split)
