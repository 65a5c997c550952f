"""VQGAN's PatchGAN discriminator (Isola et al. 2017; Esser et al. 2021), plain and time-conditioned.

Plain (VAE baseline): D(x) on images (B, 3, H, W), BatchNorm as in VQGAN.
Time-conditioned (ε-VAE's adversarial denoising-trajectory matching): D(x, x_t, t) on the channel concatenation
(x, x_t), 6 input channels, with every norm an AdaGN on the embedding of t: GroupNorm whose scale and shift are
predicted from t. Real pairs are (x0, x_t), fake pairs (x̂0, x_t): D judges whether x is a plausible image *for
this noisy input at this time*, which matches the decoder's denoising trajectory rather than just its endpoint.

Output: one logit per overlapping patch, (B, 1, H', W') (a 70×70 receptive field with n_layers = 3).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shared.nn import FLOW_TIME_SCALE, TimestepEmbedder
from stage1_tokenizer.blocks import AdaGroupNorm


def patch_widths(ndf: int, n_layers: int) -> list[int]:
    """Channels of the conv stack: ndf, 2·ndf, 4·ndf, 8·ndf, 8·ndf, ... (VQGAN caps the multiplier at 8)."""
    return [ndf * min(2**i, 8) for i in range(n_layers + 1)]


class PatchStack(nn.Module):
    """conv4×4/2 → LReLU, then n_layers - 1 of [conv4×4/2 → norm → LReLU], conv4×4/1 → norm → LReLU, conv4×4/1 → 1.

    `make_norm(channels)` builds the norms; they are called as norm(h) or, when `conditioned`, norm(h, embedding).
    """

    def __init__(self, in_channels: int, ndf: int, n_layers: int, make_norm, conditioned: bool):
        super().__init__()
        widths = patch_widths(ndf, n_layers)
        self.conditioned = conditioned
        self.conv_in = nn.Conv2d(in_channels, widths[0], 4, stride=2, padding=1)
        strides = [2] * (n_layers - 1) + [1]
        self.convs = nn.ModuleList(nn.Conv2d(widths[i], widths[i + 1], 4, stride=s, padding=1, bias=False)
                                   for i, s in enumerate(strides))
        self.norms = nn.ModuleList(make_norm(width) for width in widths[1:])
        self.conv_out = nn.Conv2d(widths[-1], 1, 4, stride=1, padding=1)

    def forward(self, x: torch.Tensor, embedding: torch.Tensor | None = None) -> torch.Tensor:
        h = F.leaky_relu(self.conv_in(x), 0.2)
        for conv, norm in zip(self.convs, self.norms):
            h = conv(h)
            h = norm(h, embedding) if self.conditioned else norm(h)
            h = F.leaky_relu(h, 0.2)
        return self.conv_out(h)


def init_weights(module: nn.Module) -> None:
    """VQGAN's DCGAN-style initialisation: N(0, 0.02²) convs, N(1, 0.02²) norm scales."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class PatchDiscriminator(nn.Module):
    """D(x) -> patch logits, x (B, 3, H, W) in [-1, 1]."""

    def __init__(self, ndf: int = 64, n_layers: int = 3, image_channels: int = 3):
        super().__init__()
        self.stack = PatchStack(image_channels, ndf, n_layers, nn.BatchNorm2d, conditioned=False)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stack(x)


class TimeConditionedPatchDiscriminator(nn.Module):
    """D(x, x_t, t) -> patch logits: x (B, 3, H, W) a clean image (real x0 or the decoder's x̂0), x_t (B, 3, H, W)
    the noisy input it was (or would be) denoised from, t (B,) flow time in [0, 1]."""

    def __init__(self, ndf: int = 64, n_layers: int = 3, embedding_dim: int = 256, image_channels: int = 3):
        super().__init__()
        self.time_embedder = TimestepEmbedder(embedding_dim, time_scale=FLOW_TIME_SCALE)
        self.stack = PatchStack(2 * image_channels, ndf, n_layers, lambda width: AdaGroupNorm(width, embedding_dim),
                                conditioned=True)
        init_weights(self.stack)

    def forward(self, x: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.stack(torch.cat([x, x_t], dim=1), self.time_embedder(t))


def build_discriminator(tok_cfg) -> nn.Module | None:
    """The discriminator of a tokenizer config, or None when the method trains without a GAN (DGAE, or
    loss.adversarial = 0)."""
    loss_cfg, disc_cfg = tok_cfg.get("loss") or {}, tok_cfg.get("discriminator")
    if tok_cfg["kind"] == "dgae" or not disc_cfg or not loss_cfg.get("adversarial", 0):
        return None
    ndf, n_layers = disc_cfg["ndf"], disc_cfg["n_layers"]  # the YAML is the one source of these values
    if disc_cfg["time_conditioned"]:
        return TimeConditionedPatchDiscriminator(ndf, n_layers, disc_cfg["embedding_dim"])
    return PatchDiscriminator(ndf, n_layers)
