"""`stage=metrics real=DIR fake=DIR`: FID between two image sets and, for paired sets, PSNR / SSIM / LPIPS.

Each side is a folder of PNG/JPEG images or an ADM-layout .npz. The sets pair up when their names are identical (the
same relative file stems, or two .npz files of equal length); then the per-image metrics are averaged over pairs.
Prints one JSON line, the result it writes to its run folder.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from shared.data.image_files import ImageSet, open_images
from shared.errors import DataError
from shared.metrics.paired import PairedMetrics
from shared.runtime import setup


def _check_pairable(real: ImageSet, fake: ImageSet) -> None:
    if tuple(real.image_size) != tuple(fake.image_size):
        raise DataError(f"the images of {real.path} are {tuple(real.image_size)} but those of {fake.path} are "
                        f"{tuple(fake.image_size)}; paired metrics (PSNR/SSIM/LPIPS) need equal sizes")


def _paired_pass(real: ImageSet, fake: ImageSet, metrics: PairedMetrics, batch_size: int, progress: bool) -> None:
    """One pass over both sets: the pairs of each batch into `metrics`."""
    batches = zip(real.batches(batch_size), fake.batches(batch_size))
    for (_, real_batch), (_, fake_batch) in tqdm(batches, total=-(-len(real) // batch_size), desc="paired metrics",
                                                 disable=not progress):
        metrics.update(real_batch, fake_batch)


def compare_images(real: str | Path, fake: str | Path, device: torch.device | str, lpips_net: str = "alex",
                   batch_size: int = 64, progress: bool = False) -> dict:
    """{"fid", "num_real", "num_fake", "paired"} and, when paired, {"psnr", "ssim", "lpips", "lpips_net"}: the
    paired metrics averaged over every pair.

    psnr is +inf when a pair is identical (see `image_quality.psnr`), so also when every pair is.
    """
    device = torch.device(device)
    real_set, fake_set = open_images(real), open_images(fake)
    paired = real_set.names == fake_set.names
    if paired:
        _check_pairable(real_set, fake_set)
    metrics = PairedMetrics(device, lpips_net, paired=paired)
    result = {"num_real": len(real_set), "num_fake": len(fake_set), "paired": paired}
    if paired:
        _paired_pass(real_set, fake_set, metrics, batch_size, progress)
        result.update({name: float(np.mean(values, dtype=np.float64)) for name, values in metrics.per_image().items()})
        result["lpips_net"] = lpips_net
    else:
        metrics.real.update_from_set(real_set, batch_size, progress)
        metrics.fake.update_from_set(fake_set, batch_size, progress)
    result["fid"] = metrics.fid()["value"]
    return result


def main(cfg: DictConfig) -> dict:
    for key in ("real", "fake"):
        if cfg.get(key) is None:
            raise DataError(f"stage=metrics needs {key}=PATH (a folder of PNG/JPEG images or an .npz); "
                            f"usage: python pipelines/run.py stage=metrics real=DIR fake=DIR")
    with setup(cfg) as runtime:
        result = runtime.finish({"real": str(cfg.real), "fake": str(cfg.fake),
                                 **compare_images(cfg.real, cfg.fake, runtime.device, lpips_net=cfg.lpips_net,
                                                  batch_size=cfg.evaluate.batch_size, progress=cfg.progress)})
    print(json.dumps(result), flush=True)
    return result
