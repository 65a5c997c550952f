"""The training loop's backends: plain or DDP training with our optimisers, or a DeepSpeed engine that owns them.

A backend runs the forward pass, backward and optimiser step of one phase, and saves and restores the optimiser state.
`module` is the loop's TrainModule (shared/train/loop.py): it names its phases and each phase's parameters.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from shared.errors import ConfigError
from shared.runtime import Runtime
from shared.train.checkpoint import refuse_code_in


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

    def __init__(self, runtime: Runtime, module: nn.Module, optims: dict[str, OptimConfig]):
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
            optim = optims[phase]
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


class DeepSpeedBackend:
    """A DeepSpeed engine around the module (one phase). The engine owns optimiser, clipping and warm-up via the
    JSON config; its own checkpoint (optimizer shards) sits beside ours under checkpoints/deepspeed/."""

    def __init__(self, runtime: Runtime, module: nn.Module, optims: dict[str, OptimConfig], ds_config: dict):
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


def make_backend(runtime: Runtime, module: nn.Module, optims: dict[str, OptimConfig],
                 deepspeed_config: dict | None) -> LocalBackend | DeepSpeedBackend:
    """DeepSpeed where the launcher gives its config, otherwise plain or DDP training."""
    if deepspeed_config is not None:
        return DeepSpeedBackend(runtime, module, optims, deepspeed_config)
    return LocalBackend(runtime, module, optims)
