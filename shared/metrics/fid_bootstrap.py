"""The spread of an FID: its value on bootstrap resamples of the images, computed exactly and cheaply.

Two settings:
- `FrechetBootstrap(fake, reference=(mu, sigma))`: generated samples against fixed reference statistics (gFID, the
  real-data floor). The reference is the whole training split by default, so the spread comes from the samples.
- `FrechetBootstrap(fake, real=real)`: rows i of `real` and `fake` are the same image before and after a tokenizer
  (rFID); a resample takes the same rows of both.

A resample is a vector of counts w (n,), Σw = n (how often each image was drawn). With up to as many images as
feature dimensions (D = 2048), everything FID needs lives in n × n Gram matrices, computed once:
    Tr √(S_x S_z) = ‖W^½ C_xz W^½‖_* / (n − 1)        (C_xz: x_i·z_j double-centred under w; ‖·‖_*: nuclear norm)
because the non-zero eigenvalues of S_x S_z are those of (X_c Z_cᵀ)(X_c Z_cᵀ)ᵀ / (n − 1)². Against a fixed
reference, with R = Σ_ref^½ and Y = Z R, Tr √(Σ_ref S_z) = Σ √λ(W^½ C_yy W^½) / √(n − 1). So a resample costs
O(n²) and one n × n eigen/singular value decomposition instead of two 2048 × 2048 ones. With more images than
dimensions it uses the weighted means and covariances directly (`frechet_distance`).

Two FIDs on the same images (two tokenizers' rFIDs: same real rows) are compared with the same resamples
(`difference(..., paired=True)`); two independent sample sets (two models' gFIDs) with independent ones.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from shared.errors import DataError
from shared.metrics.fid import frechet_distance
from shared.metrics.intervals import bootstrap_counts, normal_interval

DEFAULT_RESAMPLES = 200
# Σ_ref^½ by the bytes of Σ_ref and its device: a run measures every sample set against the same reference, and each
# root is a 2048 × 2048 eigendecomposition (seconds on a CPU). A few references at most are in use at once.
_REFERENCE_ROOTS: dict[bytes, torch.Tensor] = {}
_KEPT_ROOTS = 4


def _symmetric_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    eigenvalues, eigenvectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T


def _reference_root(sigma: torch.Tensor) -> torch.Tensor:
    """Σ_ref^½, computed once per reference covariance in this process."""
    key = hashlib.sha256(sigma.cpu().numpy().tobytes()).digest() + str(sigma.device).encode()
    if key not in _REFERENCE_ROOTS:
        if len(_REFERENCE_ROOTS) >= _KEPT_ROOTS:
            del _REFERENCE_ROOTS[next(iter(_REFERENCE_ROOTS))]  # the oldest
        _REFERENCE_ROOTS[key] = _symmetric_sqrt(sigma)
    return _REFERENCE_ROOTS[key]


def _weighted_statistics(features: torch.Tensor, weights: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of the rows repeated `weights` times."""
    count = weights.sum()
    mean = weights @ features / count
    centred = features - mean
    sigma = (centred.T * weights) @ centred / (count - 1)
    return mean.cpu().numpy(), sigma.cpu().numpy()


class FrechetBootstrap:
    def __init__(self, fake, *, real=None, reference: tuple | None = None, device: torch.device | str = "cpu"):
        if (real is None) == (reference is None):
            raise ValueError("give either the paired real features or the reference (mu, sigma)")
        self.device = torch.device(device)
        self.fake = torch.as_tensor(np.asarray(fake), dtype=torch.float64, device=self.device)  # (n, D)
        self.n, dim = self.fake.shape
        if self.n < 2:
            raise DataError(f"FID needs at least 2 images to estimate a covariance, got {self.n}")
        self.gram = self.n <= dim
        if real is not None:
            self.real = torch.as_tensor(np.asarray(real), dtype=torch.float64, device=self.device)
            if self.real.shape != self.fake.shape:
                raise DataError(f"paired FID features differ in shape: {tuple(self.real.shape)} vs "
                                f"{tuple(self.fake.shape)}")
            self.reference = None
            if self.gram:
                self.g_xx, self.g_zz = self.real @ self.real.T, self.fake @ self.fake.T
                self.g_xz = self.real @ self.fake.T
        else:
            mu, sigma = (torch.as_tensor(np.asarray(value), dtype=torch.float64, device=self.device)
                         for value in reference)
            self.reference = (mu, sigma)
            if self.gram:
                projected = self.fake @ _reference_root(sigma)  # Y = Z Σ_ref^½
                self.g_yy, self.g_zz = projected @ projected.T, self.fake @ self.fake.T
                self.fake_dot_mu = self.fake @ mu
                self.reference_terms = float(mu @ mu + torch.trace(sigma))

    def fid(self, weights: torch.Tensor | None = None) -> float:
        """FID of the images repeated `weights` (n,) times; all ones (the default) is the plain FID."""
        weights = torch.ones(self.n, dtype=torch.float64, device=self.device) if weights is None else weights
        weights = weights.to(self.device, torch.float64)
        if not self.gram:
            fake_stats = _weighted_statistics(self.fake, weights)
            if self.reference is None:
                return frechet_distance(*_weighted_statistics(self.real, weights), *fake_stats)
            return frechet_distance(*(value.cpu().numpy() for value in self.reference), *fake_stats)
        count = weights.sum()
        root = weights.sqrt()

        def centred(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """(W^½ C W^½, mean_x · mean_z) for a Gram matrix G_ij = x_i · z_j."""
            row, column = gram @ weights / count, weights @ gram / count
            means_dot = weights @ row / count
            return root[:, None] * (gram - row[:, None] - column[None, :] + means_dot) * root[None, :], means_dot

        fake_centred, fake_mean_sq = centred(self.g_zz)
        fake_trace = torch.trace(fake_centred) / (count - 1)
        if self.reference is None:
            real_centred, real_mean_sq = centred(self.g_xx)
            cross, cross_mean = centred(self.g_xz)
            mean_term = real_mean_sq + fake_mean_sq - 2 * cross_mean
            trace_sqrt = torch.linalg.svdvals(cross).sum() / (count - 1)
            return float(mean_term + torch.trace(real_centred) / (count - 1) + fake_trace - 2 * trace_sqrt)
        projected, _ = centred(self.g_yy)
        trace_sqrt = torch.linalg.eigvalsh((projected + projected.T) / 2).clamp(min=0).sqrt().sum() / (count - 1).sqrt()
        mean_term = self.reference_terms - 2 * (weights @ self.fake_dot_mu) / count + fake_mean_sq
        return float(mean_term + fake_trace - 2 * trace_sqrt)

    def resample(self, generator: np.random.Generator) -> torch.Tensor:
        """Counts (n,) of a bootstrap resample: n images drawn with replacement."""
        return torch.as_tensor(bootstrap_counts(self.n, generator), dtype=torch.float64)

    def spread(self, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict:
        """{"fid", "std", "ci95", "resamples"}: the FID, the standard deviation of its bootstrap values and the
        normal 95% interval around it (shared.metrics.intervals)."""
        estimate = self.fid()
        if resamples < 2:
            return {"fid": estimate, "std": None, "ci95": None, "resamples": 0}
        generator = np.random.default_rng(seed)
        values = np.array([self.fid(self.resample(generator)) for _ in range(resamples)])
        std = float(values.std(ddof=1))
        return {"fid": estimate, "std": std, "ci95": normal_interval(estimate, std), "resamples": resamples}


def difference(ours: FrechetBootstrap, baseline: FrechetBootstrap, *, paired: bool,
               resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict:
    """{"difference", "std", "ci95", "resamples"} of FID(ours) − FID(baseline).

    paired: both FIDs are measured on the same images (row i is the same image in both), so a resample draws the
    same rows of both; otherwise the two sets are resampled independently.
    """
    if paired and ours.n != baseline.n:
        raise DataError(f"paired FIDs need the same images, got {ours.n} and {baseline.n}")
    estimate = ours.fid() - baseline.fid()
    generator = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        weights = ours.resample(generator)
        values.append(ours.fid(weights) - baseline.fid(weights if paired else baseline.resample(generator)))
    std = float(np.std(values, ddof=1))
    return {"difference": estimate, "std": std, "ci95": normal_interval(estimate, std), "resamples": resamples}
