"""Image files to RGB, and batches of decoded items: what every image source shares."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import IO

import torch
from PIL import Image

from shared.data.transforms import to_rgb

log = logging.getLogger("epsvae.data")

# What Pillow raises for a file that is not an image, is truncated or is corrupt.
IMAGE_READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)

Item = dict[str, torch.Tensor | int]


def decode_image(source: str | Path | IO[bytes], name: str) -> Image.Image | None:
    """The fully decoded image in RGB (to_rgb), or None (with a warning naming `name`) if it cannot be read."""
    try:
        with Image.open(source) as image:
            image.load()  # decode now: a truncated file fails here rather than later in a resize
            return to_rgb(image)  # here, so that a mode Pillow cannot convert counts as unreadable
    except IMAGE_READ_ERRORS as error:
        log.warning("skipping unreadable image %s: %s", name, error)
        return None


def collate_images(items: list[Item | None], resolution: int) -> dict[str, torch.Tensor | int]:
    """Stack the readable items of a batch; the unreadable ones (None) are dropped and counted in "skipped"."""
    kept = [item for item in items if item is not None]
    if kept:
        images = torch.stack([item["image"] for item in kept])
        labels = torch.tensor([item["label"] for item in kept], dtype=torch.int64)
    else:
        images = torch.empty(0, 3, resolution, resolution)
        labels = torch.empty(0, dtype=torch.int64)
    return {"image": images, "label": labels, "skipped": len(items) - len(kept)}
