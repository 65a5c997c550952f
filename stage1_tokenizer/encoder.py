"""The SD-VAE / VQGAN convolutional encoder, its diagonal Gaussian posterior, and the convolutional blocks that the
stage-1 networks share (the VAE decoder mirrors the encoder; the ADM UNet uses the same blocks with a timestep
embedding).

Encoder (Esser et al. 2021, Rombach et al. 2022): conv_in, one level per entry of `channel_mult` with
`num_res_blocks` ResBlocks (each level but the last halves the resolution, so f = 2^(len(channel_mult) - 1)), a
middle block (ResBlock, self-attention, ResBlock), GroupNorm + SiLU, conv_out to 2·C channels (mean, log-variance),
and SD's 1×1 `quant_conv`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from shared.errors import ConfigError
from shared.nn import SelfAttention, zero_module


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups (fewer for the narrow test networks), as in SD-VAE and ADM."""
    groups = 32
    while channels % groups:
        groups //= 2
    return nn.GroupNorm(groups, channels, eps=1e-6)


class AdaGroupNorm(nn.Module):
    """AdaGN (Dhariwal & Nichol 2021): GroupNorm(h) · (1 + scale(e)) + shift(e), scale/shift from an embedding e."""

    def __init__(self, channels: int, embedding_dim: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.to_scale_shift = nn.Sequential(nn.SiLU(), nn.Linear(embedding_dim, 2 * channels))

    def forward(self, h: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        scale, shift = rearrange(self.to_scale_shift(embedding), "b (two c) -> two b c 1 1", two=2)
        return self.norm(h) * (1 + scale) + shift


def resample(x: torch.Tensor, direction: str | None) -> torch.Tensor:
    """Parameter-free ×2 resampling used inside ADM's up/down ResBlocks: nearest up, average-pool down."""
    if direction == "up":
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    if direction == "down":
        return F.avg_pool2d(x, 2)
    return x


class ResBlock(nn.Module):
    """norm → SiLU → conv3×3 → norm → SiLU → dropout → conv3×3, plus a (1×1-projected) skip.

    With `embedding_dim`, the second norm is AdaGN on the timestep embedding (ADM's scale-shift norm) and the last
    conv starts at zero so that every residual branch starts as the identity. With `resample` ("up" | "down") the
    block also changes the resolution by 2 (ADM's `resblock_updown`), resampling both branches after the first norm.
    """

    def __init__(self, in_channels: int, out_channels: int, embedding_dim: int | None = None, dropout: float = 0.0,
                 resample: str | None = None):
        super().__init__()
        self.resample = resample
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels) if embedding_dim is None else AdaGroupNorm(out_channels, embedding_dim)
        self.dropout = nn.Dropout(dropout)
        conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv2 = conv2 if embedding_dim is None else zero_module(conv2)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, embedding: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(resample(F.silu(self.norm1(x)), self.resample))
        x = resample(x, self.resample)
        h = self.norm2(h) if embedding is None else self.norm2(h, embedding)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over the H·W pixels of a feature map, residual, output projection starting at zero."""

    def __init__(self, channels: int, head_channels: int = 64):
        super().__init__()
        self.norm = group_norm(channels)
        self.attention = SelfAttention(channels, num_heads=max(1, channels // head_channels))
        zero_module(self.attention.proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        tokens = rearrange(self.norm(x), "b c h w -> b (h w) c")
        return x + rearrange(self.attention(tokens), "b (h w) c -> b c h w", h=height, w=width)


DOWNSAMPLE_PADDINGS = ("symmetric", "bottom_right")


class Downsample(nn.Module):
    """Strided 3×3 conv: (B, C, H, W) -> (B, C, H/2, W/2) (even sizes; odd: ⌈·⌉ symmetric, ⌊·⌋ bottom_right).

    padding "symmetric": one zero row/column on every side (ADM); "bottom_right": one zero row and column at the
    bottom and right only (LDM / SD-VAE, diffusers' AutoencoderKL), so output pixel i sees input pixels 2i..2i+2
    instead of 2i-1..2i+1. The weights have the same shape either way; only the padding makes SD-VAE's encoder.
    """

    def __init__(self, channels: int, padding: str = "symmetric"):
        super().__init__()
        if padding not in DOWNSAMPLE_PADDINGS:
            raise ConfigError(f"tokenizer.encoder.downsample_padding={padding!r} is not one of "
                              f"{', '.join(DOWNSAMPLE_PADDINGS)}")
        self.bottom_right = padding == "bottom_right"
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if self.bottom_right else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.bottom_right else x)


class Upsample(nn.Module):
    """Nearest ×2 then 3×3 conv: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MiddleBlock(nn.Module):
    """ResBlock → self-attention → ResBlock at the lowest resolution (encoder, decoders, UNet)."""

    def __init__(self, channels: int, embedding_dim: int | None = None, dropout: float = 0.0,
                 head_channels: int = 64):
        super().__init__()
        self.res1 = ResBlock(channels, channels, embedding_dim, dropout)
        self.attention = AttentionBlock(channels, head_channels)
        self.res2 = ResBlock(channels, channels, embedding_dim, dropout)

    def forward(self, x: torch.Tensor, embedding: torch.Tensor | None = None) -> torch.Tensor:
        return self.res2(self.attention(self.res1(x, embedding)), embedding)


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
