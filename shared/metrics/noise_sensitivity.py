"""How much a stochastic decoder's output depends on its own noise: K ≥ 2 decodes of the same latents, each with
independent noise, against the original image.

- noise_std: per pixel and channel, the unbiased standard deviation across the K decodes in grey levels (0–255 scale,
  float images as computed, not quantised), pooled over the image as the RMS: sqrt(mean of the unbiased variances).
  A deterministic decoder gives exactly 0; decodes x + σ ε_k (ε_k i.i.d. standard normal) give about σ.
- seed_mean_psnr: the PSNR (image_quality.psnr, of the image as saved) of the mean of the K decodes against the
  original. Averaging divides the variance of the decoder's noise by K but leaves a bias (what the latents lost)
  as it is: when the error is that noise alone, the mean gains 10 log10 K dB over one decode; when it is bias alone,
  nothing. A deterministic decoder's seed_mean_psnr is its PSNR.
"""
from __future__ import annotations

import torch

from shared.metrics.image_quality import psnr

GREY_LEVELS_PER_UNIT = 127.5  # images in [-1, 1] span 255 grey levels


def noise_std(decodes: torch.Tensor) -> torch.Tensor:
    """(B,) float64: decodes (K, B, 3, H, W), K ≥ 2, float in [-1, 1] (see the module's docstring)."""
    if decodes.shape[0] < 2:
        raise ValueError(f"the spread of decodes needs at least 2 of them, got {decodes.shape[0]}")
    variance = (decodes.to(torch.float64) * GREY_LEVELS_PER_UNIT).var(dim=0, correction=1)  # (B, 3, H, W)
    return variance.mean(dim=(1, 2, 3)).sqrt()


def seed_mean_psnr(originals: torch.Tensor, decodes: torch.Tensor) -> torch.Tensor:
    """(B,) PSNR in dB of the mean over the K decodes (K, B, 3, H, W) against originals (B, 3, H, W)."""
    # The mean in float64 and back: K equal decodes average to exactly that decode, so a deterministic decoder's
    # seed_mean_psnr equals its psnr bit for bit.
    return psnr(originals, decodes.to(torch.float64).mean(dim=0).to(decodes.dtype))
