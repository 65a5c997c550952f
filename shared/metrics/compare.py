"""`stage=metrics real=DIR fake=DIR`: FID between two image sets and, for paired sets, PSNR / SSIM / LPIPS.

Each side is a folder of PNG/JPEG images or an ADM-layout .npz. The sets pair up when their names are identical (the
same relative file stems, or two .npz files of equal length). Every figure comes with its spread, by the rules of
the stages that produce such sets:
- paired sets (originals and reconstructions, as stage=reconstruct): the FID's bootstrap resamples draw the same pairs
  of both sides (rFID); PSNR / SSIM / LPIPS are means over pairs with their Student-t 95% intervals, LPIPS with
  `lpips_net` and, as a secondary figure, with the other backbone (`lpips_<net>`; shared/metrics/paired.py). An
  identical pair's PSNR is +inf and has no place in a mean: such pairs are counted in `identical_pairs` and left out
  of it.
- other sets (samples against real images, as stage=evaluate): `real` is the reference, its statistics fixed, and
  the FID's bootstrap resamples the `fake` images (gFID).
`evaluate.bootstrap` resamples (0: no spread). Prints one JSON line, the result it writes to its run folder.
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
from shared.metrics.fid import InceptionStatistics
from shared.metrics.paired import PairedMetrics, fid_spread, flat_metrics
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


def compare_images(real: str | Path, fake: str | Path, device: torch.device | str, lpips_net: str,
                   batch_size: int = 64, progress: bool = False, bootstrap: int = 0, seed: int = 0) -> dict:
    """{"num_real", "num_fake", "paired", "fid", "fid_std", "fid_ci95", "bootstrap_resamples"} and, when paired,
    {"psnr", "psnr_ci95", "ssim", "ssim_ci95", "lpips", "lpips_ci95", "lpips_<other net>", "lpips_<other net>_ci95",
    "identical_pairs", "lpips_net"} (see the module's docstring). bootstrap: resamples for the FID's spread, drawn
    from `seed`."""
    device = torch.device(device)
    real_set, fake_set = open_images(real), open_images(fake)
    paired = real_set.names == fake_set.names
    result = {"num_real": len(real_set), "num_fake": len(fake_set), "paired": paired}
    if paired:
        _check_pairable(real_set, fake_set)
        metrics = PairedMetrics(device, lpips_net)
        _paired_pass(real_set, fake_set, metrics, batch_size, progress)
        result.update(flat_metrics(metrics.result(bootstrap, seed)))
        result["identical_pairs"] = int(np.isinf(metrics.per_image()["psnr"]).sum())
        result["lpips_net"] = lpips_net
        return result
    reference = InceptionStatistics(device)
    reference.update_from_set(real_set, batch_size, progress)
    samples = InceptionStatistics(device, keep_features=True)
    samples.update_from_set(fake_set, batch_size, progress)
    result.update(flat_metrics({"fid": fid_spread(samples.features(), reference=reference.pool.statistics(),
                                                  device=device, bootstrap=bootstrap, seed=seed)}))
    return result


def main(cfg: DictConfig) -> dict:
    for key in ("real", "fake"):
        if cfg.get(key) is None:
            raise DataError(f"stage=metrics needs {key}=PATH (a folder of PNG/JPEG images or an .npz); "
                            f"usage: python pipelines/run.py stage=metrics real=DIR fake=DIR")
    with setup(cfg) as runtime:
        result = runtime.finish({"real": str(cfg.real), "fake": str(cfg.fake),
                                 **compare_images(cfg.real, cfg.fake, runtime.device, lpips_net=cfg.lpips_net,
                                                  batch_size=cfg.evaluate.batch_size, progress=cfg.progress,
                                                  bootstrap=cfg.evaluate.bootstrap, seed=cfg.evaluate.subset_seed)})
    print(json.dumps(result), flush=True)
    return result
