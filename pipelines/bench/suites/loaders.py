"""The cached-latent loader against the image loader, both as training reads them."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from pipelines.bench.compare import Context, Row
from pipelines.bench.settings import IMAGENETTE, LATENT_CHANNELS, NUM_CLASSES, TARGETS
from pipelines.bench.timing import loader_items_per_second


def synthetic_latent_cache(directory: Path, num_images: int, latent_size: int) -> None:
    """A one-split cache of random latents in the format of stage=cache."""
    from shared.data.latents import write_manifest, write_shard

    rng = np.random.default_rng(0)
    split_dir = directory / "train"
    split_dir.mkdir(parents=True)
    shape = (num_images, 2, LATENT_CHANNELS, latent_size, latent_size)
    fingerprint = {"tokenizer": "bench", "data": "synthetic"}
    write_shard(split_dir, 0, mean=rng.standard_normal(shape, dtype=np.float32),
                std=np.full(shape, 0.1, dtype=np.float32), label=rng.integers(0, NUM_CLASSES, num_images),
                index=np.arange(num_images), skipped=0, fingerprint=fingerprint)
    write_manifest(split_dir, 1, {"fingerprint": fingerprint, "split": "train", "dtype": "float32",
                                  "shard_size": num_images, "num_classes": NUM_CLASSES})


def image_data_config(image_size: int) -> tuple[dict, str]:
    """Imagenette as an image folder when it is beside the checkout, else the synthetic set; and its name."""
    workers = os.cpu_count() or 1
    if (IMAGENETTE / "train").is_dir():
        config = {"kind": "imagefolder", "root": str(IMAGENETTE), "resolution": image_size, "train_split": "train",
                  "val_split": "val", "class_map": None, "num_classes": None, "random_flip": True,
                  "num_workers": workers}
        return config, f"Imagenette JPEGs, {workers} workers"
    config = {"kind": "synthetic", "resolution": image_size, "num_classes": 10, "train_size": 2048,
              "val_size": 256, "seed": 0, "random_flip": True, "num_workers": workers}
    return config, f"synthetic images, {workers} workers"


def bench_loaders(ctx: Context) -> list[Row]:
    from shared.data.images import make_image_loader
    from shared.data.latents import make_latent_loader

    batch, num_images, size = ctx.bench.loader_batch_size, ctx.bench.loader_images, ctx.bench.image_size
    latent_size = size // 8
    data_config, source = image_data_config(size)
    with tempfile.TemporaryDirectory() as cache_dir:
        synthetic_latent_cache(Path(cache_dir), max(num_images, batch), latent_size)
        latent_loader = make_latent_loader(cache_dir, "train", batch)
        latent_rate = loader_items_per_second(latent_loader, "mean", warmup_batches=1, items=num_images)
    image_loader = make_image_loader(data_config, "train", batch, train=True)
    image_rate = loader_items_per_second(image_loader, "image", warmup_batches=2, items=num_images)
    return [Row(f"Loader: cached latents 4×{latent_size}² vs images {size} px", "images/s", latent_rate, image_rate,
                target=TARGETS["latent_loader"], note=f"theirs = our image loader ({source})")]
