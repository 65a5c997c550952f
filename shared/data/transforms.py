"""Image preprocessing shared by every image source: RGB, ADM centre crop, horizontal flip, [-1, 1] tensors.

RGB from every mode Pillow decodes (`to_rgb`): high-bit-depth greyscale is scaled to 8 bits rather than clipped,
transparency is composited on white, everything else goes through Pillow's own conversion.

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

# Still-image formats read from folders and shards (file extensions; also the webdataset image keys).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
# Transparent pixels are shown on white: what browsers and image viewers show for a transparent PNG.
BACKGROUND = (255, 255, 255)
# Greyscale modes whose values exceed 8 bits, and the value that maps to white. Pillow decodes 16-bit PNG and TIFF
# to "I;16*" (older versions to "I"), so "I" is read as 16-bit too; float images ("F") are taken to lie in [0, 1].
# Values outside [0, white] are clipped.
WIDE_GREYSCALE_WHITE = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB. Raises ValueError for a mode Pillow cannot convert (the caller counts it unreadable)."""
    if image.mode == "RGB":
        return image
    if image.mode in WIDE_GREYSCALE_WHITE:
        values = np.asarray(image, dtype=np.float64) / WIDE_GREYSCALE_WHITE[image.mode]
        grey = np.round(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA") if image.mode != "La" else image.convert("LA").convert("RGBA")
        background = Image.new("RGBA", image.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


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
    """Any PIL image (greyscale, 16-bit, palette, CMYK, with alpha...) → RGB (to_rgb), ADM centre crop, optional
    flip → (3, R, R) in [-1, 1]."""
    image = center_crop_adm(to_rgb(image), resolution)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(image)


def quantize_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] -> uint8 in [0, 255] exactly as writing a PNG does: round(clamp((x + 1) * 127.5))."""
    return ((images.float() + 1) * 127.5).clamp(0, 255).round().to(torch.uint8)
