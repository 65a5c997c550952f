"""ADM's discrete diffusion (Ho et al. 2020; Nichol & Dhariwal 2021, "Improved DDPM"), the stage-2 protocol of DiT
and of the ε-VAE paper. Steps t = 1..T of the papers are indices 0..T-1 here; index T-1 is (almost) pure noise.

Forward process, linear β_t from 1e-4 to 0.02 over T = 1000 steps, α_t = 1 − β_t, ᾱ_t = ∏_{s ≤ t} α_s:
    q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I)
Posterior of one step back:
    q(x_{t-1} | x_t, x_0) = N(μ̃_t, β̃_t I),   β̃_t = β_t (1 − ᾱ_{t-1}) / (1 − ᾱ_t)
    μ̃_t = β_t √ᾱ_{t-1} / (1 − ᾱ_t) · x_0 + (1 − ᾱ_{t-1}) √α_t / (1 − ᾱ_t) · x_t
The network predicts ε; x̂_0 = (x_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t and μ_θ = μ̃_t(x̂_0, x_t). Its variance is either
fixed at β_t (β̃ at the first step, ADM's "fixed large"), or learned in range from a second output v ∈ [-1, 1]:
    log Σ_θ = u log β_t + (1 − u) log β̃_t,   u = (v + 1) / 2.
Hybrid loss (Improved DDPM): L = mean ‖ε − ε̂‖² + L_vlb, where L_vlb sees ε̂ through a stop-gradient, so that it
trains Σ_θ only (the mean is left to L_simple), in bits per dimension:
    L_vlb = KL(q(x_{t-1} | x_t, x_0) ‖ p_θ(x_{t-1} | x_t)) / log 2           t > 0
    L_vlb = −log p_θ(x_0 | x_1) / log 2, p_θ discretised to 256 bins on [-1, 1]   t = 0
Respacing keeps a subset of the steps and recomputes β from ᾱ at the kept steps, β_k = 1 − ᾱ_k / ᾱ_{k'} for
consecutive kept steps k' < k: the marginals q(x_k | x_0) are unchanged and sampling needs fewer steps.
DDIM (Song et al. 2021) samples the same marginals from ε̂ alone, on the same (respaced) chain:
    x_{t-1} = √ᾱ_{t-1} x̂_0 + √(1 − ᾱ_{t-1} − σ_t²) ε̂ + σ_t z,   σ_t = η √((1 − ᾱ_{t-1}) / (1 − ᾱ_t)) √(1 − ᾱ_t / ᾱ_{t-1}),
deterministic at η = 0, with the ancestral sampler's β̃_t as variance at η = 1.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from tqdm.auto import tqdm


def linear_betas(num_timesteps: int = 1000) -> torch.Tensor:
    """ADM's linear schedule, β from 1e-4 to 0.02 at T = 1000, both ends scaled by 1000 / T for other T."""
    scale = 1000 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)


def spaced_steps(num_timesteps: int, steps: int) -> torch.Tensor:
    """`steps` indices spread evenly over 0..T-1, always keeping the first and the last."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"cannot respace {num_timesteps} diffusion steps to {steps}")
    if steps == 1:
        return torch.tensor([num_timesteps - 1])
    return torch.linspace(0, num_timesteps - 1, steps, dtype=torch.float64).round().long()


def normal_kl(mean1: torch.Tensor, log_var1: torch.Tensor, mean2: torch.Tensor,
              log_var2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^log_var1) ‖ N(mean2, e^log_var2)) per element, in nats."""
    return 0.5 * (log_var2 - log_var1 - 1 + torch.exp(log_var1 - log_var2)
                  + (mean1 - mean2) ** 2 * torch.exp(-log_var2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """log P(x) per element, x on the 256-level grid of [-1, 1]: the mass of N(mean, σ²) on x's bin of width 2/255,
    the two edge bins reaching to ∓∞."""
    half_bin = 1.0 / 255
    upper = (x - mean + half_bin) * torch.exp(-log_std)
    lower = (x - mean - half_bin) * torch.exp(-log_std)
    log_below_upper = torch.special.log_ndtr(upper)  # leftmost bin: P(u < x + half_bin)
    log_above_lower = torch.special.log_ndtr(-lower)  # rightmost bin: P(u > x - half_bin)
    log_in_bin = torch.log((torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12))
    return torch.where(x < -0.999, log_below_upper, torch.where(x > 0.999, log_above_lower, log_in_bin))


def mean_over_pixels(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B,)"""
    return x.flatten(1).mean(dim=1)


class Prediction(NamedTuple):
    mean: torch.Tensor          # μ_θ(x_t, t)
    log_variance: torch.Tensor  # log Σ_θ(x_t, t), broadcastable to x_t
    x0: torch.Tensor            # x̂_0


class GaussianDiffusion:
    """The discrete chain with ε-prediction. Step indices t (B,) int64 index this chain; `timestep_map` maps them to
    the steps of the original 1000-step chain, which is what the network is conditioned on (DiT's convention)."""

    def __init__(self, betas: torch.Tensor, learn_sigma: bool = True, timestep_map: torch.Tensor | None = None):
        self.learn_sigma = learn_sigma
        self.num_timesteps = len(betas)
        self.timestep_map = torch.arange(len(betas)) if timestep_map is None else timestep_map
        # Schedules are kept in float64 on the CPU (ADM's precision) and cast at the point of use.
        self.betas = betas.double()
        self.alphas_cumprod = torch.cumprod(1 - self.betas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.posterior_variance = self.betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)
        # β̃ is 0 at the first step; its log is clipped to the value at the second step. A chain respaced to one step
        # has no second step, and its only step adds no noise, so β stands in (any finite value gives the same sample).
        first = self.posterior_variance[1:2] if self.num_timesteps > 1 else self.betas[:1]
        self.posterior_log_variance = torch.log(torch.cat([first, self.posterior_variance[1:]]))
        self.posterior_mean_x0 = self.betas * self.alphas_cumprod_prev.sqrt() / (1 - self.alphas_cumprod)
        self.posterior_mean_xt = (1 - self.alphas_cumprod_prev) * (1 - self.betas).sqrt() / (1 - self.alphas_cumprod)
        self.fixed_log_variance = torch.log(torch.cat([first, self.betas[1:]]))

    @classmethod
    def linear(cls, num_timesteps: int = 1000, learn_sigma: bool = True) -> GaussianDiffusion:
        return cls(linear_betas(num_timesteps), learn_sigma)

    def respace(self, steps: int) -> GaussianDiffusion:
        """The chain on `steps` evenly spaced steps of this one, with the same ᾱ at every kept step."""
        kept = spaced_steps(self.num_timesteps, steps)
        alphas_cumprod = self.alphas_cumprod[kept]
        previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        return GaussianDiffusion(1 - alphas_cumprod / previous, self.learn_sigma, self.timestep_map[kept])

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The network's time input: the original-chain step, as float32 (bf16 cannot hold the integers to 999)."""
        return self.timestep_map.to(t.device)[t].float()

    @staticmethod
    def _at(schedule: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """schedule[t] as (B, 1, 1, ...) in like's dtype and device."""
        values = schedule.to(t.device)[t].to(like.dtype)
        return values.reshape(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε."""
        signal = self._at(self.alphas_cumprod.sqrt(), t, x0)
        return signal * x0 + self._at((1 - self.alphas_cumprod).sqrt(), t, x0) * noise

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean μ̃_t and (clipped) log variance log β̃_t of q(x_{t-1} | x_t, x_0)."""
        mean = self._at(self.posterior_mean_x0, t, x_t) * x0 + self._at(self.posterior_mean_xt, t, x_t) * x_t
        return mean, self._at(self.posterior_log_variance, t, x_t)

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x̂_0 = (x_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t."""
        return self._at((1 / self.alphas_cumprod).sqrt(), t, x_t) * x_t \
            - self._at((1 / self.alphas_cumprod - 1).sqrt(), t, x_t) * eps

    def split_output(self, model_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, C or 2C, ...) -> ε̂ (B, C, ...) and the variance interpolation v (B, C, ...) or None."""
        if not self.learn_sigma:
            return model_output, None
        return model_output.chunk(2, dim=1)

    def p_mean_variance(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                        clip_x0: bool = False) -> Prediction:
        """p_θ(x_{t-1} | x_t) from the network's output at (x_t, t). clip_x0: x̂_0 clipped to [-1, 1] before it
        enters the posterior mean, as Ho et al. sample images (clip_denoised); not for latents, which have no range."""
        eps, v = self.split_output(model_output.to(x_t.dtype))
        if v is None:
            log_variance = self._at(self.fixed_log_variance, t, x_t)
        else:
            log_beta = self._at(torch.log(self.betas), t, x_t)
            log_beta_tilde = self._at(self.posterior_log_variance, t, x_t)
            fraction = (v + 1) / 2
            log_variance = fraction * log_beta + (1 - fraction) * log_beta_tilde
        x0 = self.predict_x0(x_t, t, eps)
        if clip_x0:
            x0 = x0.clamp(-1, 1)
        mean, _ = self.q_posterior(x0, x_t, t)
        return Prediction(mean, log_variance, x0)

    def vlb_terms(self, prediction: Prediction, x0: torch.Tensor, x_t: torch.Tensor,
                  t: torch.Tensor) -> torch.Tensor:
        """L_vlb per sample (B,) in bits per dimension: the KL to the true posterior, or the decoder NLL at t = 0."""
        true_mean, true_log_variance = self.q_posterior(x0, x_t, t)
        kl = mean_over_pixels(normal_kl(true_mean, true_log_variance, prediction.mean, prediction.log_variance))
        nll = -mean_over_pixels(discretized_gaussian_log_likelihood(
            x0, prediction.mean, 0.5 * prediction.log_variance.expand_as(x0)))
        return torch.where(t == 0, nll, kl) / math.log(2.0)

    def hybrid_loss(self, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                    noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample (B,) terms {"mse", "vb", "loss"}: L_simple, plus L_vlb with ε̂ detached when Σ is learned."""
        eps, v = self.split_output(model_output.to(x0.dtype))
        mse = mean_over_pixels((noise - eps) ** 2)
        if v is None:
            return {"mse": mse, "loss": mse}
        frozen_mean_output = torch.cat([eps.detach(), v], dim=1)
        vb = self.vlb_terms(self.p_mean_variance(frozen_mean_output, x_t, t), x0, x_t, t)
        return {"mse": mse, "vb": vb, "loss": mse + vb}

    @torch.no_grad()
    def sample(self, model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
               progress: bool = False, clip_x0: bool = False) -> torch.Tensor:
        """Ancestral sampling from x = noise at the last step down to x_0:
            x_{t-1} = μ_θ(x_t, t) + exp(½ log Σ_θ) z,   z ~ N(0, I),   no noise on the final step.
        model_fn(x_t, model_time) gets the original-chain steps (B,) as floats; clip_x0: see p_mean_variance."""
        x = noise
        for step in tqdm(range(self.num_timesteps - 1, -1, -1), disable=not progress, desc="ddpm"):
            t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
            prediction = self.p_mean_variance(model_fn(x, self.model_time(t)), x, t, clip_x0)
            x = prediction.mean
            if step > 0:
                x = x + torch.exp(0.5 * prediction.log_variance) * torch.randn_like(x)
        return x

    @torch.no_grad()
    def ddim_sample(self, model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
                    eta: float, progress: bool = False) -> torch.Tensor:
        """DDIM from x = noise at the last step down to x_0 (ADM's ddim_sample, without clipping x̂_0): ε̂ from the
        network's first C channels (a learned variance is not used) and σ_t = η √β̃_t, the module's formula (β_t
        of this chain is 1 − ᾱ_t / ᾱ_{t-1}). The final step adds no noise and lands on x̂_0 (ᾱ_{-1} = 1, β̃ = 0).
        model_fn as for `sample`."""
        x = noise
        for step in tqdm(range(self.num_timesteps - 1, -1, -1), disable=not progress, desc="ddim"):
            t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
            eps, _ = self.split_output(model_fn(x, self.model_time(t)).to(x.dtype))
            x0 = self.predict_x0(x, t, eps)
            alpha_bar_prev = self.alphas_cumprod_prev[step].item()
            sigma = eta * self.posterior_variance[step].sqrt().item()
            x = math.sqrt(alpha_bar_prev) * x0 + math.sqrt(1 - alpha_bar_prev - sigma**2) * eps
            if sigma > 0:
                x = x + sigma * torch.randn_like(x)
        return x
