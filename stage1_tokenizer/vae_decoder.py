"""The conventional decoder of the VAE baseline (SD-VAE / VQGAN, BigGAN-style ResBlocks): the encoder's mirror.

conv_in from the latent, a middle block (ResBlock, self-attention, ResBlock), then from the coarsest level to the
finest `num_res_blocks + 1` ResBlocks per level with a ×2 upsampling between levels, GroupNorm + SiLU, conv_out.
SD's 1×1 `post_quant_conv` comes first. DGAE reuses it with `out_channels` feature maps instead of an image.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from stage1_tokenizer.blocks import AttentionBlock, MiddleBlock, ResBlock, Upsample, group_norm


class ConvDecoder(nn.Module):
    """Latents (B, C, h, w) -> (B, out_channels, h·f, w·f), f = 2^(len(channel_mult) - 1)."""

    def __init__(self, latent_channels: int, base_channels: int = 128, channel_mult: Sequence[int] = (1, 2, 4, 4),
                 num_res_blocks: int = 2, attention_levels: Sequence[int] = (), head_channels: int = 64,
                 dropout: float = 0.0, out_channels: int = 3):
        """attention_levels: downsampling factors (relative to the output) of the levels with self-attention after
        each ResBlock (SD-VAE: none; only the middle block attends)."""
        super().__init__()
        channels = base_channels * channel_mult[-1]
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
        self.conv_in = nn.Conv2d(latent_channels, channels, 3, padding=1)
        self.middle = MiddleBlock(channels, dropout=dropout, head_channels=head_channels)
        self.levels = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(channels, base_channels * mult, dropout=dropout))
                channels = base_channels * mult
                if 2**level in attention_levels:
                    blocks.append(AttentionBlock(channels, head_channels))
            if level > 0:
                blocks.append(Upsample(channels))
            self.levels.append(blocks)
        self.norm_out = group_norm(channels)
        self.conv_out = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.middle(self.conv_in(self.post_quant_conv(z)))
        for blocks in self.levels:
            for block in blocks:
                h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))
