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


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with 32 groups as in SD-VAE, ADM and DDPM (fewer where `channels` is not divisible: the narrow test
    networks)."""
    while channels % groups:
        groups //= 2
    return nn.GroupNorm(groups, channels, eps=1e-6)


class AdaGroupNorm(nn.Module):
    """AdaGN (Dhariwal & Nichol 2021): GroupNorm(h) · (1 + scale(e)) + shift(e), scale/shift from an embedding e."""

    def __init__(self, channels: int, embedding_dim: int, groups: int = 32):
        super().__init__()
        self.norm = group_norm(channels, groups)
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

    With `embedding_dim`, the timestep embedding enters the residual branch and the last conv starts at zero so that
    every residual branch starts as the identity: with `scale_shift_norm` (ADM) the second norm is AdaGN on the
    embedding; without it (DDPM, Ho et al. 2020) a projection of the embedding is added to the first conv's output
    as a per-channel bias. With `resample` ("up" | "down") the block also changes the resolution by 2 (ADM's
    `resblock_updown`), resampling both branches after the first norm. `norm_groups`: the GroupNorms' groups.
    """

    def __init__(self, in_channels: int, out_channels: int, embedding_dim: int | None = None, dropout: float = 0.0,
                 resample: str | None = None, scale_shift_norm: bool = True, norm_groups: int = 32):
        super().__init__()
        self.resample = resample
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.scale_shift_norm = embedding_dim is not None and scale_shift_norm
        self.norm2 = (AdaGroupNorm(out_channels, embedding_dim, norm_groups) if self.scale_shift_norm
                      else group_norm(out_channels, norm_groups))
        self.embedding_bias = (nn.Sequential(nn.SiLU(), nn.Linear(embedding_dim, out_channels))
                               if embedding_dim is not None and not scale_shift_norm else None)
        self.dropout = nn.Dropout(dropout)
        conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv2 = conv2 if embedding_dim is None else zero_module(conv2)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, embedding: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(resample(F.silu(self.norm1(x)), self.resample))
        x = resample(x, self.resample)
        if self.embedding_bias is not None:
            h = h + rearrange(self.embedding_bias(embedding), "b c -> b c 1 1")
        h = self.norm2(h, embedding) if self.scale_shift_norm else self.norm2(h)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over the H·W pixels of a feature map, residual, output projection starting at zero; heads of
    `head_channels` each (ADM), or one head over all channels when it is None (DDPM)."""

    def __init__(self, channels: int, head_channels: int | None = 64, norm_groups: int = 32):
        super().__init__()
        self.norm = group_norm(channels, norm_groups)
        heads = 1 if head_channels is None else max(1, channels // head_channels)
        self.attention = SelfAttention(channels, num_heads=heads)
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
                 head_channels: int | None = 64, scale_shift_norm: bool = True, norm_groups: int = 32):
        super().__init__()
        options = {"scale_shift_norm": scale_shift_norm, "norm_groups": norm_groups}
        self.res1 = ResBlock(channels, channels, embedding_dim, dropout, **options)
        self.attention = AttentionBlock(channels, head_channels, norm_groups)
        self.res2 = ResBlock(channels, channels, embedding_dim, dropout, **options)

    def forward(self, x: torch.Tensor, embedding: torch.Tensor | None = None) -> torch.Tensor:
        return self.res2(self.attention(self.res1(x, embedding)), embedding)
