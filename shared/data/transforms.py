"""Image preprocessing shared by every image source: ADM centre crop, RGB, horizontal flip, [-1, 1] tensors.

The crop is the one of ADM (Dhariwal & Nichol 2021) that DiT and most ImageNet generative-model papers use, so
that FIDs against the published reference statistics compare like with like:
  1. while the short side is at least 2·resolution, halve the image with a BOX filter (cheap anti-aliasing);
  2. BICUBIC resize so that the short side equals `resolution`;
  3. cut the central resolution × resolution square.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def center_crop_adm(image: Image.Image, resolution: int) -> Image.Image:
    """The ADM centre crop of `image` to a resolution × resolution square."""
    while min(image.size) >= 2 * resolution:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.Resampling.BOX)
    scale = resolution / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)),
                         resample=Image.Resampling.BICUBIC)
    left = (image.width - resolution) // 2
    top = (image.height - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a float tensor (3, H, W) in [-1, 1]."""
    pixels = np.array(image, dtype=np.uint8)  # (H, W, 3), a writable copy for torch.from_numpy
    return torch.from_numpy(pixels).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def preprocess(image: Image.Image, resolution: int, flip: bool = False) -> torch.Tensor:
    """Any PIL image (greyscale, palette, CMYK...) → RGB, ADM centre crop, optional flip → (3, R, R) in [-1, 1]."""
    image = center_crop_adm(image.convert("RGB"), resolution)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(image)
