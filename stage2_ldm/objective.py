"""The two stage-2 training objectives behind one interface, on top of shared/ddpm.py and shared/flow.py:

    objective = build_objective(cfg.ldm)
    loss, logs = objective.loss(model, x0, labels)          # model: the DiT, possibly DDP / DeepSpeed-wrapped
    x0 = objective.sample(model, noise, labels, cfg_scale=1.5, cfg_interval=(0.0, 0.7), sampler="heun", steps=50)
    sampler, steps = objective.sampling(None, None)         # what sample() would use: the defaults, checked

- DDPMObjective: ADM's 1000-step chain, ε-prediction, hybrid loss with learned-range variance (DiT's protocol);
  samples with the ancestral sampler or DDIM (η: ddim_eta) on a respaced chain (250 steps by default).
- FlowObjective: rectified flow, x_t = (1 − t) x0 + t ε, velocity MSE, t logit-normal or uniform (SiT-style);
  samples by integrating the ODE from t = 1 to 0 with Euler or Heun, or SiT's SDE sampler, on a uniform grid
  (50 steps by default) whose times may be shifted towards the noise (timestep_shift).
Both condition the network on time in DDPM step units (stage2_ldm/dit.py): the DDPM step, or FLOW_TIME_SCALE · t.
The guidance interval reads time on one scale for both, t ∈ [0, 1] with t = 1 noise: the flow's t, and for DDPM
t = step / 1000 (step 999 of the 1000-step chain, the first the sampler takes, is t = 0.999; the last, 0, is t = 0).
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


def guided(model: nn.Module, labels: torch.Tensor, cfg_scale: float, cfg_interval: tuple[float, float] | None,
           time_scale: float) -> ModelFn:
    """model_fn(x, model_time) of the (unwrapped) network for these labels: classifier-free guidance of scale s
    where the time t = model_time / time_scale lies in cfg_interval = [t_lo, t_hi] (None: at every time), the
    conditional model elsewhere (the guidance interval of Kynkäänniemi et al. 2024: guidance at high noise costs
    diversity, at low noise it does little). The samplers step a whole batch at one time, so its first sample's
    time decides for the batch."""
    def conditional(x: torch.Tensor, model_time: torch.Tensor) -> torch.Tensor:
        return model(x, model_time, labels)

    if cfg_scale == 1:
        return conditional

    def model_fn(x: torch.Tensor, model_time: torch.Tensor) -> torch.Tensor:
        if cfg_interval is None or cfg_interval[0] <= model_time[0].item() / time_scale <= cfg_interval[1]:
            return model.forward_with_cfg(x, model_time, labels, cfg_scale)
        return conditional(x, model_time)
    return model_fn


def checked_interval(cfg_interval) -> tuple[float, float] | None:
    """sample.cfg_interval as (t_lo, t_hi) with 0 ≤ t_lo ≤ t_hi ≤ 1, None for none, or a ConfigError."""
    if cfg_interval is None:
        return None
    bounds = tuple(cfg_interval)
    if len(bounds) != 2 or not 0 <= bounds[0] <= bounds[1] <= 1:
        raise ConfigError(f"sample.cfg_interval={list(bounds)} must be [t_lo, t_hi] with 0 <= t_lo <= t_hi <= 1 "
                          "(or null: guidance at every step)")
    return float(bounds[0]), float(bounds[1])


class Objective(Protocol):
    """What stage 2 asks of an objective: a training loss, and a sampler with its defaults."""

    def loss(self, model: nn.Module, x0: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The mean loss over the batch and its terms for logging."""

    def sampling(self, sampler: str | None, steps: int | None) -> tuple[str, int]:
        """(sampler, steps) that sample() uses for these settings (None: the default), after checking them."""

    def sample(self, model: nn.Module, noise: torch.Tensor, labels: torch.Tensor, *, cfg_scale: float,
               cfg_interval: tuple[float, float] | None = None, sampler: str | None = None, steps: int | None = None,
               timestep_shift: float = 1.0, ddim_eta: float = 0.0, progress: bool = False) -> torch.Tensor:
        """x0 from `noise` for `labels`, through classifier-free guidance of scale `cfg_scale` at the times in
        `cfg_interval` (None: all). timestep_shift (flow) and ddim_eta (DDIM) at their neutral values, 1 and 0,
        leave the plain samplers; an option the chosen sampler has no use for must stay there."""


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

    samplers = ("ddpm", "ddim")  # the first is the default
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
               cfg_interval: tuple[float, float] | None = None, sampler: str | None = None, steps: int | None = None,
               timestep_shift: float = 1.0, ddim_eta: float = 0.0, progress: bool = False) -> torch.Tensor:
        sampler, steps = self.sampling(sampler, steps)
        if timestep_shift != 1:
            raise ConfigError(f"sample.timestep_shift={timestep_shift} shifts the time grid of ldm.objective=flow; "
                              "ddpm samples on its respaced chain: leave it at 1")
        if ddim_eta != 0 and sampler != "ddim":
            raise ConfigError(f"sample.ddim_eta={ddim_eta} is the noise of sample.sampler=ddim, not of {sampler}: "
                              "leave it at 0")
        model_fn = guided(model, labels, cfg_scale, checked_interval(cfg_interval), self.diffusion.num_timesteps)
        chain = self.diffusion.respace(steps)
        if sampler == "ddim":
            return chain.ddim_sample(model_fn, noise, ddim_eta, progress)
        return chain.sample(model_fn, noise, progress)


class FlowObjective:
    """Rectified flow (shared/flow.py): the network predicts v = ε − x0 at x_t = (1 − t) x0 + t ε, loss
    E ‖v − v̂‖². t ~ logit-normal(logit_mean, logit_std) (SD3) or uniform on [0, 1]."""

    samplers = ("euler", "heun", "sde")  # the first is the default
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
        sampler, steps = checked_sampling(sampler, steps, self.samplers, self.default_steps, "flow")
        if sampler == "sde" and steps < 2:
            raise ConfigError(f"sample.steps={steps} must be at least 2 for sample.sampler=sde (its last step "
                              "denoises)")
        return sampler, steps

    @torch.no_grad()
    def sample(self, model: nn.Module, noise: torch.Tensor, labels: torch.Tensor, *, cfg_scale: float,
               cfg_interval: tuple[float, float] | None = None, sampler: str | None = None, steps: int | None = None,
               timestep_shift: float = 1.0, ddim_eta: float = 0.0, progress: bool = False) -> torch.Tensor:
        sampler, steps = self.sampling(sampler, steps)
        if ddim_eta != 0:
            raise ConfigError(f"sample.ddim_eta={ddim_eta} is the noise of sample.sampler=ddim (ldm.objective=ddpm): "
                              "leave it at 0")
        model_fn = guided(model, labels, cfg_scale, checked_interval(cfg_interval), FLOW_TIME_SCALE)
        grid = flow.sde_grid(steps) if sampler == "sde" else flow.time_grid(steps, "uniform")
        integrate = {"euler": flow.euler_sample, "heun": flow.heun_sample, "sde": flow.sde_sample}[sampler]
        evaluations = 2 * steps - 1 if sampler == "heun" else steps
        with tqdm(total=evaluations, disable=not progress, desc=sampler) as bar:
            def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                bar.update()
                return model_fn(x, t.float() * FLOW_TIME_SCALE).to(x.dtype)

            return integrate(velocity, noise, flow.shift_time(grid, timestep_shift))


def build_objective(ldm_cfg: DictConfig) -> Objective:
    if ldm_cfg.objective == "ddpm":
        return DDPMObjective(learn_sigma=ldm_cfg.learn_sigma)
    if ldm_cfg.objective == "flow":
        if ldm_cfg.learn_sigma:
            raise ConfigError("ldm.learn_sigma=true only fits ldm.objective=ddpm; set ldm.learn_sigma=false for flow")
        return FlowObjective(ldm_cfg.flow.t_sampling, ldm_cfg.flow.logit_mean, ldm_cfg.flow.logit_std)
    raise ConfigError(f"ldm.objective={ldm_cfg.objective!r} must be 'ddpm' or 'flow'")
