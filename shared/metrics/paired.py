"""Paired image metrics, accumulated batch by batch: per-image PSNR / SSIM / LPIPS of (real, fake) pairs, the
Inception features of both sides, and their FID with its bootstrap spread.

    metrics = PairedMetrics(device, lpips_net="vgg")
    for real, fake in pairs:                       # float (B, 3, H, W) in [-1, 1] or uint8, row i of each a pair
        metrics.update(real, fake)
    summary = metrics.result(bootstrap=200, seed=0)   # {"fid": {"value", "std", "ci95", "resamples"},
                                                      #  "psnr" / "ssim" / "lpips" / "lpips_alex":
                                                      #  {"value", "ci95", "n"}}
    flat_metrics(summary, names={"fid": "rfid"})      # {"rfid", "rfid_std", "rfid_ci95", "bootstrap_resamples",
                                                      #  "psnr", "psnr_ci95", ...}: the JSON layout of the stages

stage=reconstruct (originals and their reconstructions) and stage=metrics (two image sets whose names pair up) use
it. Sets that do not pair (stage=metrics with other names, stage=evaluate's samples against reference statistics)
use shared.metrics.fid.InceptionStatistics and `fid_spread` against fixed reference statistics.

LPIPS is measured with both backbones: `lpips_net`'s (the configured one) is reported as "lpips", the other's as a
secondary figure under "lpips_<net>" (`lpips_alex` beside VGG's, `lpips_vgg` beside AlexNet's), each with its
interval. Inception, PSNR and SSIM see the images as saved PNGs (uint8, `quantize_to_uint8`); LPIPS sees them in [-1, 1]
(float images as given, uint8 as x / 127.5 - 1). Both sides' (N, 2048) pool features are kept: the FID's bootstrap
spread needs them (shared/metrics/fid_bootstrap.py: a resample takes the same pairs of both sides).
"""
from __future__ import annotations

import numpy as np
import torch

from shared.data.transforms import quantize_to_uint8
from shared.metrics.fid import InceptionStatistics
from shared.metrics.fid_bootstrap import FrechetBootstrap
from shared.metrics.image_quality import psnr, ssim
from shared.metrics.intervals import mean_interval
from shared.metrics.lpips import load_lpips, secondary_net


def unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]; float images as they are."""
    return images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images


def as_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] quantised as a PNG is saved; uint8 images as they are."""
    return images if images.dtype == torch.uint8 else quantize_to_uint8(images)


def fid_spread(fake_features, *, real=None, reference: tuple | None = None, device: torch.device | str = "cpu",
               bootstrap: int = 0, seed: int = 0) -> dict:
    """{"value", "std", "ci95", "resamples"}: the FID of (N, D) features against the paired `real` features or the
    reference (mu, sigma), with the spread of `bootstrap` resamples (none below 2: std and ci95 None)."""
    spread = FrechetBootstrap(fake_features, real=real, reference=reference, device=device).spread(bootstrap, seed)
    return {"value": spread["fid"], "std": spread["std"], "ci95": spread["ci95"], "resamples": spread["resamples"]}


def mean_entry(values) -> dict:
    """{"value", "ci95", "n"}: the mean of the finite per-image `values` (N,) and its Student-t 95% interval
    (shared.metrics.intervals.mean_interval); value and ci95 None without any."""
    interval = mean_interval(values)
    return {"value": interval["mean"], "ci95": interval["ci95"], "n": interval["n"]}


def flat_metrics(result: dict, names: dict[str, str] | None = None) -> dict:
    """The JSON layout of a result of `PairedMetrics.result` / `fid_spread`: per metric (renamed by `names`) its
    value under its name, then `<name>_std` where it has one, `<name>_ci95`, and "bootstrap_resamples" after a
    bootstrapped one."""
    flat = {}
    for metric, entry in result.items():
        key = (names or {}).get(metric, metric)
        flat[key] = entry["value"]
        if "std" in entry:
            flat[f"{key}_std"] = entry["std"]
        flat[f"{key}_ci95"] = entry["ci95"]
        if "resamples" in entry:
            flat["bootstrap_resamples"] = entry["resamples"]
    return flat


class PairedMetrics:
    """Per-image PSNR / SSIM / LPIPS (`lpips_net`'s as "lpips", the other backbone's as "lpips_<net>") of image
    pairs and the Inception features of both sides."""

    def __init__(self, device: torch.device | str, lpips_net: str):
        self.device = torch.device(device)
        self.real = InceptionStatistics(self.device, keep_features=True)
        self.fake = InceptionStatistics(self.device, keep_features=True)
        secondary = secondary_net(lpips_net)
        self.lpips = {"lpips": load_lpips(lpips_net, self.device),
                      f"lpips_{secondary}": load_lpips(secondary, self.device)}
        self._values: dict[str, list[torch.Tensor]] = {name: [] for name in ("psnr", "ssim", *self.lpips)}

    @property
    def count(self) -> int:
        """The number of pairs seen."""
        return self.real.count

    @torch.no_grad()
    def update(self, real: torch.Tensor, fake: torch.Tensor) -> None:
        """real, fake: (B, 3, H, W), float in [-1, 1] or uint8; row i of each is a pair."""
        real, fake = real.to(self.device), fake.to(self.device)
        self.real.update(as_uint8(real))
        self.fake.update(as_uint8(fake))
        self._values["psnr"].append(psnr(real, fake).cpu())
        self._values["ssim"].append(ssim(real, fake).cpu())
        for name, network in self.lpips.items():
            self._values[name].append(network(unit_range(real), unit_range(fake)).flatten().cpu())

    def per_image(self) -> dict[str, np.ndarray]:
        """{"psnr", "ssim", "lpips", "lpips_<net>"}: (N,) arrays, one value per pair in order. PSNR is +inf for
        an identical pair (`image_quality.psnr`)."""
        return {name: torch.cat(parts).numpy() for name, parts in self._values.items()}

    def arrays(self) -> dict[str, np.ndarray]:
        """The per-image values and "real_features" / "fake_features" (N, 2048): row i is pair i."""
        return {**self.per_image(), "real_features": self.real.features().numpy(),
                "fake_features": self.fake.features().numpy()}

    def fid(self, bootstrap: int = 0, seed: int = 0) -> dict:
        """{"value", "std", "ci95", "resamples"} of the FID between the two sides (see the module's docstring)."""
        return fid_spread(self.fake.features(), real=self.real.features(), device=self.device, bootstrap=bootstrap,
                          seed=seed)

    def result(self, bootstrap: int = 0, seed: int = 0) -> dict:
        """{"fid": self.fid(bootstrap, seed)} and per paired metric {"value", "ci95", "n"}: the mean of its finite
        per-image values (an identical pair's PSNR of +inf has no place in a mean) and their Student-t 95% interval
        (shared.metrics.intervals.mean_interval)."""
        per_image = {name: mean_entry(values) for name, values in self.per_image().items()}
        return {"fid": self.fid(bootstrap, seed), **per_image}
