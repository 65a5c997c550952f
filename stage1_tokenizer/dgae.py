"""The DGAE decoder (Liu et al. 2025), as we read it (docs/dgae.md): a conventional convolutional decoder maps the
latent z (B, C, h, w) to image-resolution feature maps (B, F, H, W), and these, instead of z itself, condition the
diffusion denoiser (the ADM UNet, concatenated to x_t). Trained without a GAN: velocity + LPIPS + KL.

The features are computed once per image and reused at every sampling step (`condition`), so a 3-step decode
costs one pass of the convolutional decoder and three of the denoiser.
"""
from __future__ import annotations

import torch
from torch import nn

from stage1_tokenizer.unet import ADMUNet
from stage1_tokenizer.vae_decoder import ConvDecoder


class DGAEDecoder(nn.Module):
    def __init__(self, feature_decoder: ConvDecoder, denoiser: ADMUNet):
        super().__init__()
        self.feature_decoder = feature_decoder
        self.denoiser = denoiser

    def condition(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, C, h, w) -> guiding features (B, F, h·f, w·f)."""
        return self.feature_decoder(z)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """The velocity at (x_t, t) given the features of `condition`."""
        return self.denoiser(x_t, t, condition)
