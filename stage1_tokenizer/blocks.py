"""The convolutional blocks the stage-1 networks share: the encoder, the VAE decoder (which mirrors it), the ADM UNet
(the same blocks with a timestep embedding) and the time-conditioned discriminator (AdaGroupNorm).
"""
from __future__ import annotations

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
