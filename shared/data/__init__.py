"""Data: labelled images (synthetic, image folders, webdataset shards) and their resumable order.

The public entry points; see images.py for the batch format and the resume guarantees.
"""
from shared.data.images import build_image_dataset, make_image_loader

__all__ = ["build_image_dataset", "make_image_loader"]
