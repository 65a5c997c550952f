"""Rectified flow, the one place its maths lives (ε-VAE decoder, DGAE decoder, and the flow objective of stage 2).

Convention (SPEC.md): t = 0 is data, t = 1 is pure noise.
    x_t      = (1 - t) · x0 + t · ε                     interpolation
    v        = dx_t/dt = ε - x0                         velocity target of G(x_t, t, ·)
    x̂0       = x_t - t · v̂                             one-step image estimate from a velocity prediction
    ε̂        = x_t + (1 - t) · v̂                       (the matching noise estimate)
Sampling integrates dx/dt = v̂ from t = 1 down to t = 0 on a time grid (Euler, Heun), or follows the reverse SDE of
the same marginals (SiT's Euler–Maruyama sampler, `sde_sample`). A timestep shift s (SD3, LightningDiT) moves a
grid's times towards the noise end, t' = s t / (1 + (s − 1) t), so that more steps fall where the image's layout
forms.

Noise scaling γ (Chen 2023, "On the importance of noise scheduling"): the flow runs on the scaled data γ·x0, so
at every t the signal-to-noise ratio is γ² times lower, and the network input is renormalised to unit variance:
    x_t = (1 - t) γ x0 + t ε,   input = x_t / sqrt(((1 - t) γ)² + t²),   v = ε - γ x0,   x̂0 = (x_t - t v̂) / γ.
This scales the signal term only, as Chen does. Scaling the whole x_t and then renormalising it would cancel γ
(it is a pure renormalisation), so that reading of the OPEN point is not offered. The variance formula assumes
unit-variance data; images in [-1, 1] have less, which keeps the input slightly below unit variance at small t.
"""
from __future__ import annotations

import math

import torch


def broadcast_time(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t of shape (B,) viewed as (B, 1, 1, ...) to multiply tensors shaped like `like`."""
    return t.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t ε."""
    t = broadcast_time(t, x0)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v = ε - x0, the time derivative of the interpolation."""
    return noise - x0


def x0_from_velocity(x_t: torch.Tensor, t: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    """x̂0 = x_t - t v̂ (exact when v̂ is the true velocity)."""
    return x_t - broadcast_time(t, x_t) * velocity


def noise_from_velocity(x_t: torch.Tensor, t: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    """ε̂ = x_t + (1 - t) v̂."""
    return x_t + (1 - broadcast_time(t, x_t)) * velocity


def input_scale(t: torch.Tensor, gamma: float) -> torch.Tensor:
    """c_in(t) = 1 / sqrt(((1 - t) γ)² + t²): makes x_t of unit-variance γ-scaled data unit-variance again."""
    return torch.rsqrt(((1 - t) * gamma) ** 2 + t**2)


def sample_logit_normal(batch: int, mean: float = 0.0, std: float = 1.0, device=None,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """t = sigmoid(n), n ~ N(mean, std²): SD3's logit-normal density, weighting the middle of [0, 1]."""
    normal = torch.randn(batch, device=device, generator=generator)
    return torch.sigmoid(mean + std * normal)


def sample_uniform(batch: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    return torch.rand(batch, device=device, generator=generator)


def reversed_log_grid(steps: int) -> torch.Tensor:
    """steps + 1 times from 1 to 0: u uniform from 0 to 1, t = log(100 - 99u) / log(100).

    3 steps: 1 → 0.913 → 0.766 → 0. The first steps stay near pure noise, where a latent-conditioned decoder
    fixes the image's layout, and the last step jumps straight to the image.
    """
    u = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    return (torch.log(100.0 - 99.0 * u) / math.log(100.0)).float()


def uniform_grid(steps: int) -> torch.Tensor:
    return torch.linspace(1.0, 0.0, steps + 1)


# SiT's default --last-step-size: its SDE sampler ends with one noiseless step of this size onto the data.
SDE_LAST_STEP = 0.04


def sde_grid(steps: int) -> torch.Tensor:
    """SiT's SDE times, steps + 1 from 1 to 0: steps − 1 Euler–Maruyama steps, uniform from 1 down to
    SDE_LAST_STEP, then the last, noiseless step to 0."""
    if steps < 2:
        raise ValueError(f"the SDE sampler needs at least two steps (its last one denoises), got {steps}")
    return torch.cat([torch.linspace(1.0, SDE_LAST_STEP, steps), torch.zeros(1)])


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """t' = s t / (1 + (s − 1) t): 0 and 1 stay, s > 1 moves every time towards the noise end (t' = 0.75 at
    t = 0.5 for s = 3), s = 1 leaves t exactly as it is. Computed in float64, so that float32 end points stay
    exactly 0 and 1."""
    wide = t.double()
    return (shift * wide / (1 + (shift - 1) * wide)).to(t.dtype)


def time_grid(steps: int, kind: str = "reversed_log") -> torch.Tensor:
    if steps < 1:
        raise ValueError(f"need at least one sampling step, got {steps}")
    if kind == "reversed_log":
        return reversed_log_grid(steps)
    if kind == "uniform":
        return uniform_grid(steps)
    raise ValueError(f"time grid must be 'reversed_log' or 'uniform', not {kind!r}")


@torch.no_grad()
def euler_sample(velocity_fn, noise: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Integrate dx/dt = velocity_fn(x, t) from grid[0] (= 1, x = noise) to grid[-1] (= 0) with Euler steps.

    velocity_fn(x_t, t) takes t of shape (B,). The number of function evaluations is len(grid) - 1.
    """
    x = noise
    for t_now, t_next in zip(grid[:-1].tolist(), grid[1:].tolist()):
        t = torch.full((x.shape[0],), t_now, device=x.device, dtype=x.dtype)
        x = x + (t_next - t_now) * velocity_fn(x, t)
    return x


@torch.no_grad()
def heun_sample(velocity_fn, noise: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Heun's second-order method (trapezoidal correction); the last step to t = 0 is plain Euler."""
    x = noise
    for t_now, t_next in zip(grid[:-1].tolist(), grid[1:].tolist()):
        t = torch.full((x.shape[0],), t_now, device=x.device, dtype=x.dtype)
        v_now = velocity_fn(x, t)
        x_euler = x + (t_next - t_now) * v_now
        if t_next == 0:
            x = x_euler
            continue
        v_next = velocity_fn(x_euler, torch.full_like(t, t_next))
        x = x + (t_next - t_now) * 0.5 * (v_now + v_next)
    return x


@torch.no_grad()
def sde_sample(velocity_fn, noise: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """SiT's SDE sampler (transport.Sampler.sample_sde with its defaults: Euler–Maruyama, diffusion form "sigma",
    last step "Mean") in this module's time, from grid[0] (= 1, x = noise) to grid[-1] (= 0).

    The reverse SDE that shares the flow's marginals, with diffusion coefficient w(t) = t (SiT's σ_t) and the
    score ∇ log p_t(x) = −ε̂ / t read off the velocity (ε̂ = x + (1 − t) v̂), steps from t to t − h as
        x ← x − h (v̂ − w ∇ log p_t) + √(2 w h) z = x − h (v̂ + ε̂) + √(2 t h) z,   z ~ N(0, I);
    the last step takes the same drift without noise (it lands on the data). One velocity_fn call per step.
    """
    x = noise
    steps = list(zip(grid[:-1].tolist(), grid[1:].tolist()))
    for index, (t_now, t_next) in enumerate(steps):
        t = torch.full((x.shape[0],), t_now, device=x.device, dtype=x.dtype)
        velocity = velocity_fn(x, t)
        h = t_now - t_next
        x = x - h * (velocity + noise_from_velocity(x, t, velocity))
        if index < len(steps) - 1:
            x = x + math.sqrt(2 * t_now * h) * torch.randn_like(x)
    return x
