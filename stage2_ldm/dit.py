"""The class-conditional Diffusion Transformer (Peebles & Xie, "Scalable Diffusion Models with Transformers", 2023).

A latent (B, C, H, W) is cut into p×p patches, each embedded as one token of width D, plus a fixed 2D sin-cos
position embedding. The conditioning vector c = embed(t) + embed(y) drives every block through adaLN-Zero, and a
final adaLN layer maps each token back to a p×p patch of C_out channels:
    C_out = C     the prediction (ε for DDPM, the velocity v for rectified flow)
    C_out = 2 C   prediction and, with `learn_sigma`, the interpolation v ∈ [-1, 1] of the DDPM variance.

Two options exist only to hold diffusers' DiTTransformer2DModel exactly (stage2_ldm/convert.py): its time features
use the frequencies 10000^(-k/127) instead of DiT's 10000^(-k/128) (`time_frequency_shift` 1 instead of 0), and its
LayerNorm before the MLP has eps `norm_eps` (1e-5 by default) instead of DiT's 1e-6 (`mlp_norm_eps`).

Time convention: t is given in DDPM step units, t ∈ [0, 1000], noise at the high end. The DDPM objective passes
its integer step of the 1000-step chain (also when sampling on a respaced chain); the flow objective passes
FLOW_TIME_SCALE · t = 1000 · t for the flow time t ∈ [0, 1] (shared/nn.py). Both then use the full range of the
sinusoidal time features.

build_dit makes the DiT of an `ldm` config group; load_dit rebuilds a trained one from its checkpoint, whose stored
model config (stage2_ldm/train.py:model_config) adds the latent geometry and classes to that group.
"""
from __future__ import annotations

from pathlib import Path

import torch
from einops import rearrange
from omegaconf import DictConfig, OmegaConf
from torch import nn

from shared.dit_blocks import NORM_EPS, DiTBlock, FinalLayer, sincos_2d
from shared.errors import ConfigError
from shared.nn import CheckpointedBlocks, TimestepEmbedder, zero_module
from shared.train.checkpoint import fit_weights, load_model_state


class LabelEmbedder(nn.Module):
    """Class labels (B,) -> (B, D). Row `num_classes` of the table is the null label ∅ of classifier-free guidance:
    in training each label becomes ∅ with probability `dropout`, so that one network learns both p(x | y) and p(x).
    """

    def __init__(self, num_classes: int, dim: int, dropout: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout = dropout
        self.table = nn.Embedding(num_classes + 1, dim)

    def drop(self, labels: torch.Tensor, force_drop: torch.Tensor | None = None) -> torch.Tensor:
        """Replace labels by ∅: where the boolean mask `force_drop` (B,) is set when it is given (and nowhere
        else), otherwise at random with probability `dropout` in training mode."""
        if force_drop is None:
            if not self.training or self.dropout == 0:
                return labels
            force_drop = torch.rand(labels.shape, device=labels.device) < self.dropout
        return torch.where(force_drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, force_drop: torch.Tensor | None = None) -> torch.Tensor:
        return self.table(self.drop(labels, force_drop))


class DiT(CheckpointedBlocks, nn.Module):
    """Latents (B, C, H, W), times (B,) and labels (B,) -> predictions (B, C_out, H, W); H = W = input_size.
    With activation checkpointing, each block's activations are recomputed in the backward pass."""

    def __init__(self, input_size: int, in_channels: int, num_classes: int, patch_size: int = 2,
                 hidden_size: int = 1152, depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0,
                 class_dropout: float = 0.1, learn_sigma: bool = True, mlp_norm_eps: float = NORM_EPS,
                 time_frequency_shift: int = 0):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.patch_size = patch_size
        self.grid_size = input_size // patch_size
        self.num_classes = num_classes

        self.patch_embed = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        # A buffer, not a parameter: fixed, but saved with the weights and moved with the model.
        self.register_buffer("pos_embed", sincos_2d(self.grid_size, self.grid_size, hidden_size)[None])
        self.t_embedder = TimestepEmbedder(hidden_size, frequency_shift=time_frequency_shift)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, mlp_norm_eps) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation: Xavier-uniform linears (and patch projection, seen as a linear), N(0, 0.02²)
        embeddings, and zero modulation and output layers so that the network starts as the identity on the
        tokens and outputs exactly zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.patch_embed.out_channels, -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.y_embedder.table.weight, std=0.02)
        for layer in self.t_embedder.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.02)
        for block in self.blocks:
            zero_module(block.modulation[-1])
        zero_module(self.final_layer.modulation[-1])
        zero_module(self.final_layer.linear)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                force_drop: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W) latents, t (B,) float in DDPM step units [0, 1000], y (B,) int64 labels,
        force_drop (B,) bool: labels to replace by ∅. Returns (B, C_out, H, W)."""
        p = self.patch_size
        tokens = rearrange(self.patch_embed(x), "b d h w -> b (h w) d") + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, force_drop)
        for block in self.blocks:
            tokens = self.run_block(block, tokens, c)
        patches = self.final_layer(tokens, c)
        return rearrange(patches, "b (h w) (p q c) -> b c (h p) (w q)", h=x.shape[-2] // p, p=p, q=p)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """Classifier-free guidance (Ho & Salimans, 2022) from one pass over the doubled batch [(x, y); (x, ∅)]:
            out = out(x, ∅) + s · (out(x, y) − out(x, ∅))
        on the C prediction channels; the variance channels (learn_sigma) stay the conditional ones. s = 1 is
        the conditional model, computed without the unconditional half."""
        if cfg_scale == 1:
            return self(x, t, y)
        batch, channels = x.shape[:2]
        drop = torch.arange(2 * batch, device=y.device) >= batch
        out = self(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y]), force_drop=drop)
        conditional, unconditional = out.chunk(2)
        guided = unconditional[:, :channels] + cfg_scale * (conditional[:, :channels] - unconditional[:, :channels])
        return torch.cat([guided, conditional[:, channels:]], dim=1)


# Keys that only imported checkpoints record (stage2_ldm/convert.py); absent, the DiT has DiT's own values.
IMPORTED_VARIANT_KEYS = ("mlp_norm_eps", "time_frequency_shift")


def build_dit(ldm_cfg: DictConfig, in_channels: int, input_size: int, num_classes: int) -> DiT:
    """The DiT of an `ldm` config group, for latents (in_channels, input_size, input_size)."""
    if ldm_cfg.kind != "dit":
        raise ConfigError(f"ldm.kind={ldm_cfg.kind!r} is not a known stage-2 network (expected 'dit')")
    if input_size % ldm_cfg.patch_size:
        raise ConfigError(f"ldm.patch_size={ldm_cfg.patch_size} does not divide the latent size {input_size}")
    if ldm_cfg.hidden_size % ldm_cfg.num_heads:
        raise ConfigError(f"ldm.hidden_size={ldm_cfg.hidden_size} is not divisible by "
                          f"ldm.num_heads={ldm_cfg.num_heads}")
    if ldm_cfg.hidden_size % 4:
        raise ConfigError(f"ldm.hidden_size={ldm_cfg.hidden_size} must be divisible by 4 (2D sin-cos positions)")
    if not 0 <= ldm_cfg.class_dropout < 1:
        raise ConfigError(f"ldm.class_dropout={ldm_cfg.class_dropout} must lie in [0, 1)")
    return DiT(input_size=input_size, in_channels=in_channels, num_classes=num_classes,
               patch_size=ldm_cfg.patch_size, hidden_size=ldm_cfg.hidden_size, depth=ldm_cfg.depth,
               num_heads=ldm_cfg.num_heads, mlp_ratio=ldm_cfg.mlp_ratio, class_dropout=ldm_cfg.class_dropout,
               learn_sigma=ldm_cfg.learn_sigma,
               **{key: ldm_cfg[key] for key in IMPORTED_VARIANT_KEYS if key in ldm_cfg})


def dit_from_model_config(config: dict) -> DiT:
    """The DiT of a stored model config: the `ldm` group plus in_channels, input_size and num_classes."""
    return build_dit(OmegaConf.create(config), config["in_channels"], config["input_size"], config["num_classes"])


def load_dit(path: str | Path, device: torch.device | str, use_ema: bool = True) -> tuple[DiT, dict]:
    """The DiT of a stage=ldm checkpoint (file or run folder), on `device`, in eval mode, and its stored model
    config."""
    state, config = load_model_state(path, "dit", use_ema=use_ema)
    dit = dit_from_model_config(config)
    fit_weights(dit, state, path)
    return dit.to(device).eval(), config
