"""The Diffusion Transformer's building blocks (Peebles & Xie, 2023): fixed 2D sin-cos positions, the adaLN-Zero
transformer block and the adaLN output layer. Stage 2's DiT and the ε-VAE's DiT decoder both stack them, each with
its own conditioning vector c; they live here so that neither stage's network changes when the other's does.
"""
from __future__ import annotations

import torch
from torch import nn

from shared.nn import SelfAttention, modulate


NORM_EPS = 1e-6  # DiT's LayerNorms

def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """positions (N,) -> (N, dim): [sin(pos · ω_k), cos(pos · ω_k)] with ω_k = 10000^(-2k / dim)."""
    omega = 10000.0 ** (-torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angles = positions.double()[:, None] * omega[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).float()


def sincos_2d(height: int, width: int, dim: int) -> torch.Tensor:
    """Fixed position embedding of a height × width token grid, (height · width, dim) in row-major token order:
    the first half of the channels encodes the row, the second half the column."""
    if dim % 4:
        raise ValueError(f"a 2D sin-cos embedding needs a width divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.cat([sincos_1d(rows.flatten(), dim // 2), sincos_1d(cols.flatten(), dim // 2)], dim=1)


class DiTBlock(nn.Module):
    """Pre-norm transformer block conditioned by adaLN-Zero:
        (shift₁, scale₁, gate₁, shift₂, scale₂, gate₂) = Linear(SiLU(c))
        x ← x + gate₁ · Attention(LN(x) · (1 + scale₁) + shift₁)
        x ← x + gate₂ · MLP(LN(x) · (1 + scale₂) + shift₂)
    With the modulation layer initialised to zero every gate is 0, so each block starts as the identity.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, mlp_norm_eps: float = NORM_EPS):
        super().__init__()
        mlp_width = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=mlp_norm_eps)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_width), nn.GELU(approximate="tanh"), nn.Linear(mlp_width, dim))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (B, N, D) tokens, c (B, D) conditioning."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN (shift and scale, no gate) then a linear map of each token (B, N, D) to a patch (B, N, p·p·C_out)."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))
