"""diffusers' DiT behind our DiT's call, the other side of the DiT section."""
from __future__ import annotations

import torch
from torch import nn


class DiffusersDiT(nn.Module):
    """diffusers' DiTTransformer2DModel behind our DiT's call (x, t, y, force_drop), so that the same objective,
    sampler and classifier-free guidance drive both networks."""

    def __init__(self, in_channels: int, input_size: int, num_classes: int, patch_size: int, hidden_size: int,
                 depth: int, num_heads: int):
        from diffusers import DiTTransformer2DModel

        super().__init__()
        self.num_classes = num_classes
        self.model = DiTTransformer2DModel(
            num_attention_heads=num_heads, attention_head_dim=hidden_size // num_heads, in_channels=in_channels,
            out_channels=in_channels, num_layers=depth, patch_size=patch_size, sample_size=input_size,
            num_embeds_ada_norm=num_classes, activation_fn="gelu-approximate", norm_elementwise_affine=False)
        # diffusers gives every block its own timestep + label embedding; DiT has one, which the converted
        # checkpoints copy into each block. Sharing it makes the two the same network (and parameter count); the
        # per-block recomputation of the embedding stays in their forward.
        shared_embedding = self.model.transformer_blocks[0].norm1.emb
        for block in self.model.transformer_blocks[1:]:
            block.norm1.emb = shared_embedding

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                force_drop: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop is not None:
            y = torch.where(force_drop, torch.full_like(y, self.num_classes), y)
        return self.model(x, timestep=t, class_labels=y).sample

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        from stage2_ldm.dit import DiT

        return DiT.forward_with_cfg(self, x, t, y, cfg_scale)
