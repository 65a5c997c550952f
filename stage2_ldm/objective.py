"""The two stage-2 training objectives behind one interface, on top of shared/ddpm.py and shared/flow.py:

    objective = build_objective(cfg.ldm)
    loss, logs = objective.loss(model, x0, labels)          # model: the DiT, possibly DDP / DeepSpeed-wrapped
    x0 = objective.sample(model, noise, labels, cfg_scale=1.5, sampler="heun", steps=50)
    sampler, steps = objective.sampling(None, None)         # what sample() would use: the defaults, checked

- DDPMObjective: ADM's 1000-step chain, ε-prediction, hybrid loss with learned-range variance (DiT's protocol);
  samples with the ancestral sampler on a respaced chain (250 steps by default).
- FlowObjective: rectified flow, x_t = (1 − t) x0 + t ε, velocity MSE, t logit-normal or uniform (SiT-style);
  samples by integrating the ODE from t = 1 to 0 with Euler or Heun on a uniform grid (50 steps by default).
Both condition the network on time in DDPM step units (stage2_ldm/dit.py): the DDPM step, or FLOW_TIME_SCALE · t.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch
from omegaconf import DictConfig
from torch import nn
from tqdm.auto import tqdm

from shared import flow
from shared.ddpm import GaussianDiffusion
from shared.errors import ConfigError
from shared.nn import FLOW_TIME_SCALE

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def guided(model: nn.Module, labels: torch.Tensor, cfg_scale: float) -> ModelFn:
    """model_fn(x, t) of the (unwrapped) network for these labels, through classifier-free guidance if s ≠ 1."""
    if cfg_scale == 1:
        return lambda x, t: model(x, t, labels)
    return lambda x, t: model.forward_with_cfg(x, t, labels, cfg_scale)


class Objective(Protocol):
    """What stage 2 asks of an objective: a training loss, and a sampler with its defaults."""

    def loss(self, model: nn.Module, x0: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The mean loss over the batch and its terms for logging."""

    def sampling(self, sampler: str | None, steps: int | None) -> tuple[str, int]:
        """(sampler, steps) that sample() uses for these settings (None: the default), after checking them."""

    def sample(self, model: nn.Module, noise: torch.Tensor, labels: torch.Tensor, *, cfg_scale: float,
               sampler: str | None = None, steps: int | None = None, progress: bool = False) -> torch.Tensor:
        """x0 from `noise` for `labels`, through classifier-free guidance of scale `cfg_scale`."""


def checked_sampling(sampler: str | None, steps: int | None, samplers: tuple[str, ...], default_steps: int,
                     objective: str, max_steps: int | None = None) -> tuple[str, int]:
    """(sampler, steps) with None replaced by the objective's default (the first of `samplers`, `default_steps`), or
    a ConfigError naming what does not fit."""
    sampler, steps = sampler or samplers[0], default_steps if steps is None else steps
    if sampler not in samplers:
        raise ConfigError(f"sample.sampler={sampler!r} does not fit ldm.objective={objective} "
                          f"(choose one of {', '.join(samplers)})")
    if steps < 1 or (max_steps is not None and steps > max_steps):
        limit = f" and at most {max_steps}" if max_steps is not None else ""
        raise ConfigError(f"sample.steps={steps} must be at least 1{limit}")
    return sampler, steps


class DDPMObjective:
    """ε-prediction on ADM's linear 1000-step chain; with `learn_sigma` the network's second half of channels sets
    the variance and the loss is the hybrid L_simple + L_vlb, otherwise L_simple with ADM's fixed variance."""

    samplers = ("ddpm",)  # the first is the default
    default_steps = 250

    def __init__(self, num_timesteps: int = 1000, learn_sigma: bool = True):
        self.diffusion = GaussianDiffusion.linear(num_timesteps, learn_sigma)

    def loss(self, model: nn.Module, x0: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """x0 (B, C, H, W) normalised latents, labels (B,). t uniform over the chain's steps."""
        t = torch.randint(0, self.diffusion.num_timesteps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        x_t = self.diffusion.q_sample(x0, t, noise)
        terms = self.diffusion.hybrid_loss(model(x_t, self.diffusion.model_time(t), labels), x0, x_t, t, noise)
        loss = terms["loss"].mean()
        return loss, {name: value.detach().mean() for name, value in terms.items()}

    def sampling(self, sampler: str | None, steps: int | None) -> tuple[str, int]:
        return checked_sampling(sampler, steps, self.samplers, self.default_steps, "ddpm",
                                self.diffusion.num_timesteps)

    @torch.no_grad()
    def sample(self, model: nn.Module, noise: torch.Tensor, labels: torch.Tensor, *, cfg_scale: float,
               sampler: str | None = None, steps: int | None = None, progress: bool = False) -> torch.Tensor:
        _, steps = self.sampling(sampler, steps)
        return self.diffusion.respace(steps).sample(guided(model, labels, cfg_scale), noise, progress)


class FlowObjective:
    """Rectified flow (shared/flow.py): the network predicts v = ε − x0 at x_t = (1 − t) x0 + t ε, loss
    E ‖v − v̂‖². t ~ logit-normal(logit_mean, logit_std) (SD3) or uniform on [0, 1]."""

    samplers = ("euler", "heun")  # the first is the default
    default_steps = 50

    def __init__(self, t_sampling: str = "logit_normal", logit_mean: float = 0.0, logit_std: float = 1.0):
        if t_sampling not in ("logit_normal", "uniform"):
            raise ConfigError(f"ldm.flow.t_sampling={t_sampling!r} must be 'logit_normal' or 'uniform'")
        self.t_sampling = t_sampling
        self.logit_mean = logit_mean
        self.logit_std = logit_std

    def sample_time(self, batch: int, device: torch.device) -> torch.Tensor:
        if self.t_sampling == "logit_normal":
            return flow.sample_logit_normal(batch, self.logit_mean, self.logit_std, device=device)
        return flow.sample_uniform(batch, device=device)

    def loss(self, model: nn.Module, x0: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """x0 (B, C, H, W) normalised latents, labels (B,)."""
        t = self.sample_time(x0.shape[0], x0.device)
        noise = torch.randn_like(x0)
        velocity = model(flow.interpolate(x0, noise, t), t * FLOW_TIME_SCALE, labels)
        loss = ((velocity.to(x0.dtype) - flow.velocity_target(x0, noise)) ** 2).mean()
        return loss, {"loss": loss.detach(), "mse": loss.detach()}

    def sampling(self, sampler: str | None, steps: int | None) -> tuple[str, int]:
        return checked_sampling(sampler, steps, self.samplers, self.default_steps, "flow")

    @torch.no_grad()
    def sample(self, model: nn.Module, noise: torch.Tensor, labels: torch.Tensor, *, cfg_scale: float,
               sampler: str | None = None, steps: int | None = None, progress: bool = False) -> torch.Tensor:
        sampler, steps = self.sampling(sampler, steps)
        model_fn = guided(model, labels, cfg_scale)
        evaluations = steps if sampler == "euler" else 2 * steps - 1
        with tqdm(total=evaluations, disable=not progress, desc=sampler) as bar:
            def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                bar.update()
                return model_fn(x, t.float() * FLOW_TIME_SCALE).to(x.dtype)

            integrate = flow.euler_sample if sampler == "euler" else flow.heun_sample
            return integrate(velocity, noise, flow.time_grid(steps, "uniform"))


def build_objective(ldm_cfg: DictConfig) -> Objective:
    if ldm_cfg.objective == "ddpm":
        return DDPMObjective(learn_sigma=ldm_cfg.learn_sigma)
    if ldm_cfg.objective == "flow":
        if ldm_cfg.learn_sigma:
            raise ConfigError("ldm.learn_sigma=true only fits ldm.objective=ddpm; set ldm.learn_sigma=false for flow")
        return FlowObjective(ldm_cfg.flow.t_sampling, ldm_cfg.flow.logit_mean, ldm_cfg.flow.logit_std)
    raise ConfigError(f"ldm.objective={ldm_cfg.objective!r} must be 'ddpm' or 'flow'")
