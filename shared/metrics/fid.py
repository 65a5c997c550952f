"""Fréchet distance between Gaussian fits of Inception features, its statistics files, and precision/recall.

FID (Heusel et al. 2017) between N(mu1, S1) and N(mu2, S2):

    FID = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))

Statistics files are .npz with `mu` and `sigma` (float64), the layout of ADM's evaluator reference batches
(`VIRTUAL_imagenet256_labeled.npz`), which also carry `mu_s` / `sigma_s` for sFID.
"""
from __future__ import annotations

import hashlib
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from shared.errors import DataError
from shared.files import atomic_file
from shared.metrics.inception import load_inception


def feature_statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> mean (D,) and unbiased covariance (D, D), both float64."""
    accumulator = StatisticsAccumulator()
    accumulator.update(torch.as_tensor(features))
    return accumulator.statistics()


class StatisticsAccumulator:
    """Running float64 sums Σx and Σxxᵀ, so mean and covariance of 50k features need only O(D²) memory.

    The sums stay on the device of the features they are fed (a (2048, 2048) float64 matmul per batch).
    """

    def __init__(self):
        self.count = 0
        self.sum: torch.Tensor | None = None  # (D,)
        self.outer_sum: torch.Tensor | None = None  # (D, D)

    def update(self, features: torch.Tensor) -> None:
        """features: (B, D)."""
        features = features.detach().to(torch.float64)
        if self.sum is None:
            dim = features.shape[1]
            self.sum = features.new_zeros(dim)
            self.outer_sum = features.new_zeros(dim, dim)
        self.count += features.shape[0]
        self.sum += features.sum(dim=0)
        self.outer_sum += features.T @ features

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """mu = Σx / N, sigma = (Σxxᵀ - N mu muᵀ) / (N - 1)."""
        if self.count < 2:
            raise DataError(f"FID needs at least 2 images to estimate a covariance, got {self.count}")
        mu = self.sum / self.count
        sigma = (self.outer_sum - self.count * torch.outer(mu, mu)) / (self.count - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """|mu1 - mu2|² + Tr(S1) + Tr(S2) - 2 Tr(sqrtm(S1 S2)), in float64.

    S1 S2 is not symmetric, but it is similar to the symmetric PSD matrix M = S1^½ S2 S1^½, so
    Tr(sqrtm(S1 S2)) = Σ sqrt(λ_i(M)). Two symmetric eigendecompositions give that trace exactly (up to float
    rounding, which only makes tiny eigenvalues slightly negative: they are clipped to 0) and about ten times
    faster than scipy.linalg.sqrtm at 2048 dimensions, without its complex-valued detours.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise DataError(f"FID statistics of different dimensions: mu {mu1.shape} vs {mu2.shape}, "
                        f"sigma {sigma1.shape} vs {sigma2.shape}")
    if not (np.isfinite(sigma1).all() and np.isfinite(sigma2).all()):
        raise ValueError("FID statistics contain NaN or inf")
    mean_term = np.sum((mu1 - mu2) ** 2)
    eigenvalues, eigenvectors = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    sigma1_sqrt = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T
    product = sigma1_sqrt @ sigma2 @ sigma1_sqrt
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((product + product.T) / 2), 0, None)).sum()
    return float(mean_term + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def save_statistics(path: str | Path, mu: np.ndarray, sigma: np.ndarray, **extra: np.ndarray) -> Path:
    """Write mu, sigma (and e.g. mu_s, sigma_s, features) to an .npz, atomically (shared.files.atomic_file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as file:
        np.savez(file, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64), **extra)
    return path


def load_statistics(path: str | Path, spatial: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from an .npz of ours or an ADM evaluator reference batch; `spatial` reads sFID's mu_s/sigma_s."""
    path = Path(path)
    keys = ("mu_s", "sigma_s") if spatial else ("mu", "sigma")
    try:
        with np.load(path) as stats:
            missing = [key for key in keys if key not in stats.files]
            if missing:
                raise DataError(f"{path} has no {' / '.join(missing)} (it holds {', '.join(stats.files)}); expected "
                                f"FID statistics as written by stage=evaluate or ADM's evaluator")
            return stats[keys[0]].astype(np.float64), stats[keys[1]].astype(np.float64)
    except FileNotFoundError as error:
        raise DataError(f"FID statistics file not found: {path}") from error
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise DataError(f"cannot read FID statistics from {path}: {error}") from error


def _kth_neighbour_radii(features: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """(N,) distance of each row to its k-th nearest other row."""
    radii = [torch.cdist(chunk, features).kthvalue(k + 1, dim=1).values  # +1: the row itself is at distance 0
             for chunk in features.split(batch_size)]
    return torch.cat(radii)


def _fraction_inside_manifold(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor,
                              batch_size: int) -> float:
    """Fraction of queries within radii[j] of some support[j]."""
    inside = [(torch.cdist(chunk, support) <= radii).any(dim=1) for chunk in queries.split(batch_size)]
    return torch.cat(inside).double().mean().item()


def precision_recall(real_features: torch.Tensor, fake_features: torch.Tensor, k: int = 3,
                     batch_size: int = 1024) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) on (N, D) feature sets.

    Each set's manifold is the union of balls around its points with radius the distance to the k-th nearest
    neighbour. precision = share of fakes inside the real manifold; recall = share of reals inside the fake manifold.
    """
    if len(real_features) <= k or len(fake_features) <= k:
        raise DataError(f"precision/recall with k={k} needs more than {k} images per set, got "
                        f"{len(real_features)} real and {len(fake_features)} generated")
    real_features, fake_features = real_features.float(), fake_features.float().to(real_features.device)
    real_radii = _kth_neighbour_radii(real_features, k, batch_size)
    fake_radii = _kth_neighbour_radii(fake_features, k, batch_size)
    return {
        "precision": _fraction_inside_manifold(fake_features, real_features, real_radii, batch_size),
        "recall": _fraction_inside_manifold(real_features, fake_features, fake_radii, batch_size),
    }


# Pool features of recently seen uint8 batches, by content: a sweep (reconstructions at several NFEs, grids or
# weights) measures the same real images against each reconstruction, and Inception is most of its cost on a CPU.
# The key is the batch's bytes, so a hit is exact; a bounded number of batches keeps a 50k evaluation from growing it.
_POOL_CACHE: OrderedDict[tuple, torch.Tensor] = OrderedDict()
POOL_CACHE_BATCHES = 32


def _cached_pool(inception, images: torch.Tensor) -> torch.Tensor:
    """Inception pool features (B, 2048) of uint8 images (B, 3, H, W), from the cache when the same bytes were
    seen on the same device."""
    key = (str(images.device), tuple(images.shape), hashlib.sha1(images.cpu().numpy().tobytes()).hexdigest())
    if key in _POOL_CACHE:
        _POOL_CACHE.move_to_end(key)
        return _POOL_CACHE[key]
    pool = inception(images)
    _POOL_CACHE[key] = pool
    while len(_POOL_CACHE) > POOL_CACHE_BATCHES:
        _POOL_CACHE.popitem(last=False)
    return pool


class InceptionStatistics:
    """Streams uint8 image batches through the FID Inception into running pool (and sFID) statistics.

    keep_features: also keep the (N, 2048) pool features (float32, CPU), for the FID's bootstrap spread and
    precision/recall.
    """

    def __init__(self, device: torch.device | str, spatial: bool = False, keep_features: bool = False):
        self.device = torch.device(device)
        self.inception = load_inception(self.device)
        self.pool = StatisticsAccumulator()
        self.spatial = StatisticsAccumulator() if spatial else None
        self._features: list[torch.Tensor] | None = [] if keep_features else None

    @property
    def count(self) -> int:
        return self.pool.count

    @torch.no_grad()
    def update(self, images: torch.Tensor) -> None:
        """images: uint8 (B, 3, H, W)."""
        images = images.to(self.device)
        if self.spatial is not None:
            pool, spatial = self.inception.pool_and_spatial(images)
            self.spatial.update(spatial)
        else:
            pool = _cached_pool(self.inception, images)
        self.pool.update(pool)
        if self._features is not None:
            self._features.append(pool.float().cpu())

    def update_from_set(self, images, batch_size: int, progress: bool = False) -> None:
        """Every image of an image set (shared.data.image_files.ImageSet: a folder or an .npz), in order."""
        for _, batch in tqdm(images.batches(batch_size), total=-(-len(images) // batch_size),
                             desc=f"Inception {images.path.name}", disable=not progress):
            self.update(batch)

    def features(self) -> torch.Tensor:
        """(N, 2048) pool features seen so far."""
        if self._features is None:
            raise RuntimeError("features were not kept: construct with keep_features=True")
        return torch.cat(self._features)
