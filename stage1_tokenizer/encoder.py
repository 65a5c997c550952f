"""The SD-VAE / VQGAN convolutional encoder and its diagonal Gaussian posterior (blocks in stage1_tokenizer/blocks.py).

Encoder (Esser et al. 2021, Rombach et al. 2022): conv_in, one level per entry of `channel_mult` with
`num_res_blocks` ResBlocks (each level but the last halves the resolution, so f = 2^(len(channel_mult) - 1)), a
middle block (ResBlock, self-attention, ResBlock), GroupNorm + SiLU, conv_out to 2·C channels (mean, log-variance),
and SD's 1×1 `quant_conv`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from shared.errors import ConfigError
from stage1_tokenizer.blocks import AttentionBlock, Downsample, MiddleBlock, ResBlock, group_norm


def downsample_factor(channel_mult: Sequence[int]) -> int:
    """Every level but the last halves the resolution."""
    return 2 ** (len(channel_mult) - 1)


def check_downsample(channel_mult: Sequence[int], downsample: int, key: str) -> None:
    if downsample_factor(channel_mult) != downsample:
        raise ConfigError(f"{key}.channel_mult={list(channel_mult)} has {len(channel_mult)} levels, which "
                          f"downsample by {downsample_factor(channel_mult)}, but tokenizer.downsample={downsample}; "
                          f"use {len(channel_mult)} = log2(downsample) + 1 levels")


class DiagonalGaussian:
    """The posterior q(z|x) = N(mean, diag(std²)) from the encoder's (B, 2C, h, w) moments."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)  # SD's clamp: keeps exp() finite for untrained encoders
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std · n, n ~ N(0, I) (reparameterised, differentiable in mean and std)."""
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q ‖ N(0, I)) per image, (B,): ½ Σ_{c,h,w} (μ² + σ² − 1 − log σ²)."""
        mean, logvar = self.mean.float(), self.logvar.float()  # a sum over many elements: not in bf16
        return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(dim=1)


class Encoder(nn.Module):
    """Images (B, 3, H, W) -> DiagonalGaussian over latents (B, C, H/f, W/f)."""

    def __init__(self, latent_channels: int, base_channels: int = 128, channel_mult: Sequence[int] = (1, 2, 4, 4),
                 num_res_blocks: int = 2, attention_levels: Sequence[int] = (), head_channels: int = 64,
                 dropout: float = 0.0, image_channels: int = 3, downsample_padding: str = "symmetric"):
        """attention_levels: downsampling factors (1, 2, 4, ...) of the levels that get self-attention after each
        ResBlock (SD-VAE: none; only the middle block attends). downsample_padding: see Downsample; SD-VAE's
        weights (stage=import) need "bottom_right"."""
        super().__init__()
        self.conv_in = nn.Conv2d(image_channels, base_channels, 3, padding=1)
        self.levels = nn.ModuleList()
        channels = base_channels
        for level, mult in enumerate(channel_mult):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(channels, base_channels * mult, dropout=dropout))
                channels = base_channels * mult
                if 2**level in attention_levels:
                    blocks.append(AttentionBlock(channels, head_channels))
            if level < len(channel_mult) - 1:
                blocks.append(Downsample(channels, downsample_padding))
            self.levels.append(blocks)
        self.middle = MiddleBlock(channels, dropout=dropout, head_channels=head_channels)
        self.norm_out = group_norm(channels)
        self.conv_out = nn.Conv2d(channels, 2 * latent_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)

    def forward(self, images: torch.Tensor) -> DiagonalGaussian:
        h = self.conv_in(images)
        for blocks in self.levels:
            for block in blocks:
                h = block(h)
        h = self.middle(h)
        h = self.conv_out(F.silu(self.norm_out(h)))
        return DiagonalGaussian(self.quant_conv(h))
