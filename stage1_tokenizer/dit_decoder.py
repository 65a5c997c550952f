"""A DiT denoiser as the ε-VAE decoder (the option the paper tried and found weaker than the ADM UNet).

x_t (B, 3, H, W) concatenated with the nearest-upsampled latent (B, C, H, W) is cut into p×p patches, one token
each, plus a 2D sin-cos position embedding computed for the grid at hand (so any H, W divisible by p decode);
adaLN-Zero blocks conditioned on the flow time t (embedded as FLOW_TIME_SCALE · t) and a final adaLN layer map the
tokens back to velocity patches. The blocks are the DiT blocks stage 2 also uses (shared/dit_blocks.py); only the
conditioning differs: t alone, the latent enters through the input.
"""
from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from shared.dit_blocks import DiTBlock, FinalLayer, sincos_2d
from shared.nn import FLOW_TIME_SCALE, CheckpointedBlocks, TimestepEmbedder, zero_module
from stage1_tokenizer.unet import resize_condition


class DiTDecoder(CheckpointedBlocks, nn.Module):
    """G(x_t, t, condition) -> velocity (B, 3, H, W), the same call as ADMUNet."""

    def __init__(self, condition_channels: int, patch_size: int = 8, hidden_size: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, image_channels: int = 3):
        super().__init__()
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.patch_embed = nn.Conv2d(image_channels + condition_channels, hidden_size, patch_size, stride=patch_size)
        self.time_embedder = TimestepEmbedder(hidden_size, time_scale=FLOW_TIME_SCALE)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, image_channels)
        for block in self.blocks:  # adaLN-Zero: every block, and the output, start at zero
            zero_module(block.modulation[-1])
        zero_module(self.final_layer.modulation[-1])
        zero_module(self.final_layer.linear)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        height, width = x_t.shape[-2] // self.patch_size, x_t.shape[-1] // self.patch_size
        inputs = torch.cat([x_t, resize_condition(condition, x_t.shape[-2:]).to(x_t.dtype)], dim=1)
        positions = sincos_2d(height, width, self.hidden_size).to(device=x_t.device, dtype=x_t.dtype)
        tokens = rearrange(self.patch_embed(inputs), "b d h w -> b (h w) d") + positions
        c = self.time_embedder(t)
        for block in self.blocks:
            tokens = self.run_block(block, tokens, c)
        patches = self.final_layer(tokens, c)
        return rearrange(patches, "b (h w) (p q c) -> b c (h p) (w q)", h=height, p=self.patch_size,
                         q=self.patch_size)
