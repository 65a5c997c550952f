"""Our FID features (shared/metrics/inception.py) against torch-fidelity's InceptionV3 with the same weights."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from pipelines.bench.compare import Context, Row
from pipelines.bench.fidelity_inception import torch_fidelity_inception


def bench_fid_features(ctx: Context) -> list[Row]:
    from shared.metrics.inception import load_inception

    ours = load_inception(ctx.device)
    with tempfile.TemporaryDirectory() as directory:
        theirs = torch_fidelity_inception(ours, Path(directory)).to(ctx.device)
    size, n = ctx.bench.image_size, ctx.bench.fid_images
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, device=ctx.device)
    with torch.inference_mode():
        return [ctx.side_by_side(f"FID Inception features, {size} px → 299", "images/s", n, lambda: ours(images),
                                 lambda: theirs(images), note="theirs = torch-fidelity FeatureExtractorInceptionV3")]
