"""High-frequency colour noise: the energy of an image's chroma above a 3×3 box blur, per image, in grey levels.

    Cb = −0.168736 R − 0.331264 G + 0.5 B,   Cr = 0.5 R − 0.418688 G − 0.081312 B    (BT.601 YCbCr on 0–255)
    chroma_hf = sqrt(mean over Cb, Cr and the pixels of (C − box3×3(C))²)              (reflect padding)

The offsets of 128 are left out: the high-pass removes them. Grey (R = G = B) has no chroma, so noise of the grey
levels alone leaves the figure unchanged; a diffusion decoder that has not learnt to remove its noise leaves
per-pixel colour speckle, which raises it above the originals'. Float images are taken as computed, (x + 1) · 127.5
without quantising to the PNG grid, so that the measure is linear in the image (rounding would add about 0.2 grey
levels in quadrature).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Rows: Cb, Cr as weights of (R, G, B); each row sums to zero.
CHROMA = torch.tensor([[-0.168736, -0.331264, 0.5],
                       [0.5, -0.418688, -0.081312]], dtype=torch.float64)
BLUR = 3


def grey_levels(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) float in [-1, 1] or uint8 -> float64 in [0, 255], not quantised."""
    return images.to(torch.float64) if images.dtype == torch.uint8 else (images.to(torch.float64) + 1) * 127.5


def chroma_hf(images: torch.Tensor) -> torch.Tensor:
    """(B,) the RMS of the high-passed chroma (see the module's docstring) of images (B, 3, H, W), float in [-1, 1]
    or uint8, at least 2×2."""
    pixels = grey_levels(images)
    chroma = torch.einsum("kc,bchw->bkhw", CHROMA.to(pixels.device), pixels)  # (B, 2, H, W)
    blurred = F.avg_pool2d(F.pad(chroma, (BLUR // 2,) * 4, mode="reflect"), BLUR, stride=1)
    return (chroma - blurred).pow(2).mean(dim=(1, 2, 3)).sqrt()
