"""`stage=metrics real=DIR fake=DIR`: FID between two image sets and, for paired sets, PSNR / SSIM / LPIPS.

Each side is a folder of PNG/JPEG images or an ADM-layout .npz. The sets pair up when their names are identical (the
same relative file stems, or two .npz files of equal length); then the per-image metrics are averaged over pairs.
Prints one JSON line, the result it writes to its run folder.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from shared.errors import DataError
from shared.metrics.fid import InceptionStatistics, frechet_distance
from shared.metrics.image_io import ImageSet, open_images
from shared.metrics.image_quality import psnr, ssim
from shared.metrics.lpips import LPIPS
from shared.runtime import setup


def uint8_to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images.float() / 127.5 - 1


def _check_pairable(real: ImageSet, fake: ImageSet) -> None:
    if tuple(real.image_size) != tuple(fake.image_size):
        raise DataError(f"the images of {real.path} are {tuple(real.image_size)} but those of {fake.path} are "
                        f"{tuple(fake.image_size)}; paired metrics (PSNR/SSIM/LPIPS) need equal sizes")


def _paired_pass(real: ImageSet, fake: ImageSet, real_stats: InceptionStatistics, fake_stats: InceptionStatistics,
                 device: torch.device, lpips_net: str, batch_size: int, progress: bool) -> dict[str, float]:
    """One pass over both sets: Inception features of each and mean PSNR / SSIM / LPIPS over pairs."""
    _check_pairable(real, fake)
    lpips = LPIPS(lpips_net).to(device)
    totals = {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0}
    batches = zip(real.batches(batch_size), fake.batches(batch_size))
    for (_, real_batch), (_, fake_batch) in tqdm(batches, total=-(-len(real) // batch_size), desc="paired metrics",
                                                 disable=not progress):
        real_batch, fake_batch = real_batch.to(device), fake_batch.to(device)
        real_stats.update(real_batch)
        fake_stats.update(fake_batch)
        totals["psnr"] += psnr(real_batch, fake_batch).sum().item()
        totals["ssim"] += ssim(real_batch, fake_batch).sum().item()
        with torch.no_grad():
            totals["lpips"] += lpips(uint8_to_unit_range(real_batch), uint8_to_unit_range(fake_batch)).sum().item()
    return {name: total / len(real) for name, total in totals.items()}


def _feature_pass(images: ImageSet, stats: InceptionStatistics, batch_size: int, progress: bool) -> None:
    for _, batch in tqdm(images.batches(batch_size), total=-(-len(images) // batch_size),
                         desc=f"Inception {images.path.name}", disable=not progress):
        stats.update(batch)


def compare_images(real: str | Path, fake: str | Path, device: torch.device | str, lpips_net: str = "alex",
                   batch_size: int = 64, progress: bool = False) -> dict:
    """{"fid", "num_real", "num_fake", "paired"} and, when paired, {"psnr", "ssim", "lpips", "lpips_net"}.

    psnr is +inf when every pair is identical (see `image_quality.psnr`).
    """
    device = torch.device(device)
    real_set, fake_set = open_images(real), open_images(fake)
    real_stats, fake_stats = InceptionStatistics(device), InceptionStatistics(device)
    paired = real_set.names == fake_set.names
    result = {"num_real": len(real_set), "num_fake": len(fake_set), "paired": paired}
    if paired:
        result.update(_paired_pass(real_set, fake_set, real_stats, fake_stats, device, lpips_net, batch_size,
                                   progress))
        result["lpips_net"] = lpips_net
    else:
        _feature_pass(real_set, real_stats, batch_size, progress)
        _feature_pass(fake_set, fake_stats, batch_size, progress)
    result["fid"] = frechet_distance(*real_stats.pool.statistics(), *fake_stats.pool.statistics())
    return result


def main(cfg: DictConfig) -> dict:
    for key in ("real", "fake"):
        if cfg.get(key) is None:
            raise DataError(f"stage=metrics needs {key}=PATH (a folder of PNG/JPEG images or an .npz); "
                            f"usage: python pipelines/run.py stage=metrics real=DIR fake=DIR")
    with setup(cfg) as runtime:
        result = compare_images(cfg.real, cfg.fake, runtime.device, lpips_net=cfg.lpips_net,
                                batch_size=cfg.evaluate.batch_size, progress=cfg.progress)
        runtime.finish({"real": str(cfg.real), "fake": str(cfg.fake), **result})
    print(json.dumps({"real": str(cfg.real), "fake": str(cfg.fake), **result}), flush=True)
    return result
