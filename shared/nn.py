"""Network blocks shared by the stage-1 decoders and the stage-2 DiT (its transformer blocks: shared/dit_blocks.py)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn


# Networks see a flow time t ∈ [0, 1] as FLOW_TIME_SCALE · t: the range of DDPM's integer steps (a 1000-step
# chain), so that flow and DDPM times span the same frequencies of the sinusoidal embedding.
FLOW_TIME_SCALE = 1000.0


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0,
                       frequency_shift: int = 0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) times t (B,) -> (B, dim), as in the Transformer / ADM:
    [cos(t ω_k), sin(t ω_k)] with ω_k = max_period^(-k / (dim/2 − frequency_shift)), k < dim/2.

    frequency_shift 0 is ADM's and DiT's; diffusers' DiTTransformer2DModel uses 1.
    """
    half = dim // 2
    steps = torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(max_period) * steps / (half - frequency_shift))
    angles = t.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class TimestepEmbedder(nn.Module):
    """t (B,) -> (B, dim): sinusoidal features followed by a two-layer MLP."""

    def __init__(self, dim: int, frequency_dim: int = 256, time_scale: float = 1.0, frequency_shift: int = 0):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.time_scale = time_scale
        self.frequency_shift = frequency_shift
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = timestep_embedding(t * self.time_scale, self.frequency_dim, frequency_shift=self.frequency_shift)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation of tokens x (B, N, D) by per-sample shift/scale (B, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so that a residual branch starts as the identity (ADM, DiT's adaLN-Zero)."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


class SelfAttention(nn.Module):
    """Multi-head self-attention over tokens (B, N, D) through scaled_dot_product_attention (flash/memory-efficient
    kernels on CUDA)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class CheckpointedBlocks:
    """A network whose blocks can recompute their activations in the backward pass instead of keeping them
    (activation checkpointing): less memory for one more forward pass of the blocks. The blocks' random draws
    (dropout) are replayed, so values and gradients are those of the plain network. Off unless a training stage
    switches it on (`enable_activation_checkpointing`); it is not part of the model, checkpoints do not record it."""

    activation_checkpointing = False

    def run_block(self, block: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
        if self.activation_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *inputs, use_reentrant=False)
        return block(*inputs)


def enable_activation_checkpointing(network: nn.Module) -> int:
    """Switch activation checkpointing on in every CheckpointedBlocks module of `network`; returns their number."""
    found = [module for module in network.modules() if isinstance(module, CheckpointedBlocks)]
    for module in found:
        module.activation_checkpointing = True
    return len(found)
