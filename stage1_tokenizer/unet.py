"""The ADM UNet (Dhariwal & Nichol 2021) as the ε-VAE decoder: a velocity model G(x_t, t, z); with its DDPM options,
the UNet of Ho et al. (2020) that the paper's ablation starts from (Table 5: "DDPM UNet → ADM UNet").

The condition (the latent z, or DGAE's image-resolution features) is resized with nearest-neighbour interpolation
to the resolution of x_t and concatenated to it along channels (ε-VAE, Sec. 3). Nothing in the network depends on
the image size, so a decoder trained at 128 px decodes at 256 px: any H, W divisible by 2^(levels - 1) works.

Sizes (ε-VAE, Table 7), channel_mult (1, 1, 2, 2, 4):
    B 64 base channels, 2 ResBlocks per level;  M 96, 2;  L 128, 2;  XL 128, 4;  H 256, 2.

What makes ADM's network, each an argument here (DDPM's value in brackets): the timestep embedding scales and shifts
the second norm of every ResBlock, `scale_shift_norm` (added as a bias after the first conv); ResBlocks change the
resolution, `resblock_updown` (a strided conv down, nearest + conv up); attention heads of `head_channels` (one
head, None). DDPM's attention resolution (16 px of 32: `attention_levels` (2,)), widths (`channel_mult`) and
dropout (0.1) are plain settings (configs/tokenizer/epsvae_small_ddpm_unet.yaml), and so are the GroupNorms' groups,
`norm_groups`: 32 in both papers, whose narrowest maps have 128 channels. A narrow network needs fewer: DDPM's
embedding bias is constant over each channel, so a group of one channel (32 groups of 32 channels) normalises it
away and leaves the network blind to t.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from shared.nn import FLOW_TIME_SCALE, CheckpointedBlocks, TimestepEmbedder, zero_module
from stage1_tokenizer.blocks import AttentionBlock, Downsample, MiddleBlock, ResBlock, Upsample, group_norm


class TimestepSequential(nn.ModuleList):
    """Runs its blocks in order, handing the timestep embedding to the ResBlocks."""

    def forward(self, h: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        for block in self:
            h = block(h, embedding) if isinstance(block, ResBlock) else block(h)
        return h


def resize_condition(condition: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of the condition (B, C, h, w) to x_t's (H, W) (a no-op when the sizes match)."""
    if tuple(condition.shape[-2:]) == tuple(size):
        return condition
    return F.interpolate(condition, size=tuple(size), mode="nearest")


class ADMUNet(CheckpointedBlocks, nn.Module):
    """G(x_t, t, condition) -> velocity (B, 3, H, W). With activation checkpointing, each level's blocks and the
    middle block recompute their activations in the backward pass.

    x_t (B, 3, H, W) is the network input (already scaled by c_in(t), shared/flow.py); t (B,) flow time in [0, 1]
    (embedded as FLOW_TIME_SCALE · t, the frequencies of DDPM's integer steps); condition (B, C_cond, h, w), any h, w.
    """

    def __init__(self, condition_channels: int, base_channels: int = 128, channel_mult: Sequence[int] = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, attention_levels: Sequence[int] = (8, 16), head_channels: int | None = 64,
                 dropout: float = 0.0, resblock_updown: bool = True, scale_shift_norm: bool = True,
                 norm_groups: int = 32, image_channels: int = 3):
        """attention_levels: downsampling factors of the levels with self-attention after each ResBlock (ADM's
        `attention_resolutions` expressed relative to the input, so they hold at every image size).
        head_channels: channels per attention head (None: one head, DDPM's).
        resblock_updown: change resolution with ResBlocks (ADM's ImageNet models) rather than strided/upsampling
        convs. scale_shift_norm: the timestep embedding enters through AdaGN (ADM) rather than as a bias (DDPM).
        norm_groups: the groups of every GroupNorm."""
        super().__init__()
        embedding_dim = 4 * base_channels
        self.levels = len(channel_mult)
        self.time_embedder = TimestepEmbedder(embedding_dim, frequency_dim=base_channels, time_scale=FLOW_TIME_SCALE)
        self.conv_in = nn.Conv2d(image_channels + condition_channels, base_channels, 3, padding=1)
        options = {"scale_shift_norm": scale_shift_norm, "norm_groups": norm_groups}

        def level_blocks(in_channels: int, out_channels: int, level: int) -> TimestepSequential:
            blocks = TimestepSequential([ResBlock(in_channels, out_channels, embedding_dim, dropout, **options)])
            if 2**level in attention_levels:
                blocks.append(AttentionBlock(out_channels, head_channels, norm_groups))
            return blocks

        # Encoder half: remember the width of every feature map that is kept for a skip connection.
        self.down = nn.ModuleList()
        skip_channels = [base_channels]
        channels = base_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(level_blocks(channels, base_channels * mult, level))
                channels = base_channels * mult
                skip_channels.append(channels)
            if level < len(channel_mult) - 1:
                downsample = (ResBlock(channels, channels, embedding_dim, dropout, resample="down", **options)
                              if resblock_updown else Downsample(channels))
                self.down.append(TimestepSequential([downsample]))
                skip_channels.append(channels)

        self.middle = MiddleBlock(channels, embedding_dim, dropout, head_channels, **options)

        # Decoder half: num_res_blocks + 1 ResBlocks per level, each eating one skip.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for index in range(num_res_blocks + 1):
                blocks = level_blocks(channels + skip_channels.pop(), base_channels * mult, level)
                channels = base_channels * mult
                if level > 0 and index == num_res_blocks:
                    blocks.append(ResBlock(channels, channels, embedding_dim, dropout, resample="up", **options)
                                  if resblock_updown else Upsample(channels))
                self.up.append(blocks)

        self.norm_out = group_norm(channels, norm_groups)
        self.conv_out = zero_module(nn.Conv2d(channels, image_channels, 3, padding=1))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        embedding = self.time_embedder(t)
        h = self.conv_in(torch.cat([x_t, resize_condition(condition, x_t.shape[-2:]).to(x_t.dtype)], dim=1))
        skips = [h]
        for blocks in self.down:
            h = self.run_block(blocks, h, embedding)
            skips.append(h)
        h = self.run_block(self.middle, h, embedding)
        for blocks in self.up:
            h = self.run_block(blocks, torch.cat([h, skips.pop()], dim=1), embedding)
        return self.conv_out(F.silu(self.norm_out(h)))
