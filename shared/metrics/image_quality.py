"""PSNR and SSIM per image.

Convention: images come in as float (B, 3, H, W) in [-1, 1] (or uint8), are quantised to uint8 exactly as saving a PNG
would (`quantize_to_uint8`), and are compared as values in [0, 255] (data range L = 255). So the numbers are those
of the saved images, comparable with tools that read PNGs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from shared.data.transforms import quantize_to_uint8

DATA_RANGE = 255.0
# Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03.
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _as_pixels(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) float in [-1, 1] or uint8 -> float64 in [0, 255] on the PNG grid."""
    pixels = images if images.dtype == torch.uint8 else quantize_to_uint8(images)
    return pixels.to(torch.float64)


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"expected two image batches (B, C, H, W) of equal shape, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B,) PSNR = 10 log10(255² / MSE) in dB; identical images give +inf (MSE = 0)."""
    _check_pair(x, y)
    mse = (_as_pixels(x) - _as_pixels(y)).pow(2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(DATA_RANGE ** 2 / mse)


def _gaussian_window(device: torch.device) -> torch.Tensor:
    """(11,) normalised 1-D Gaussian, sigma 1.5."""
    offsets = torch.arange(SSIM_WINDOW, dtype=torch.float64, device=device) - (SSIM_WINDOW - 1) / 2
    window = torch.exp(-offsets ** 2 / (2 * SSIM_SIGMA ** 2))
    return window / window.sum()


def _local_mean(images: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter per channel, 'valid' borders: (B, C, H, W) -> (B, C, H - 10, W - 10)."""
    channels = images.shape[1]
    rows = window.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    columns = window.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    return F.conv2d(F.conv2d(images, rows, groups=channels), columns, groups=channels)


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B,) SSIM, the mean over RGB channels and all window positions of

        (2 μx μy + C1)(2 σxy + C2) / ((μx² + μy² + C1)(σx² + σy² + C2)),   C1 = (K1 L)², C2 = (K2 L)²

    with Gaussian-weighted local moments (population, not sample, covariance) over windows lying inside the image.
    Images must be at least 11x11.
    """
    _check_pair(x, y)
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {tuple(x.shape[-2:])}")
    x, y = _as_pixels(x), _as_pixels(y)
    window = _gaussian_window(x.device)
    mu_x, mu_y = _local_mean(x, window), _local_mean(y, window)
    var_x = _local_mean(x * x, window) - mu_x ** 2
    var_y = _local_mean(y * y, window) - mu_y ** 2
    cov_xy = _local_mean(x * y, window) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(1, 2, 3))
