"""`stage=evaluate`: gFID of generated samples against reference statistics (ADM protocol), with its spread.

The reference is either an .npz with mu/sigma (ours, or ADM's `VIRTUAL_imagenet256_labeled.npz`, which also carries
sFID statistics mu_s/sigma_s and its reference images as arr_0) or, when `evaluate.reference` is null, statistics of
the `data` config's `evaluate.reference_split`: all of it by default, or a seeded class-stratified subset of
`evaluate.reference_images` images (shared/data/subsets.py). They are cached under `${output_root}/reference_stats/`,
keyed by everything that changes them: the data config, split, subset size and seed, and the Inception weights.

The gFID comes with its spread over the samples: the standard deviation of `evaluate.bootstrap` bootstrap resamples
and the normal 95% interval around the estimate (shared/metrics/fid_bootstrap.py). The samples' pool features are
written beside the result (features.npy), so two runs' gFIDs can be compared with the same resampling.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from shared.data.image_files import open_images
from shared.data.subsets import EvaluationSubset, evaluation_subset
from shared.data.transforms import quantize_to_uint8
from shared.errors import DataError
from shared.metrics.fid import InceptionStatistics, frechet_distance, precision_recall, save_statistics
from shared.metrics.inception import INCEPTION_SCORE_UNAVAILABLE, weights_digest
from shared.metrics.paired import fid_spread, flat_metrics
from shared.runtime import setup

# Data keys that change how fast images load, not which images: left out of the cache fingerprint.
LOADER_ONLY_KEYS = ("num_workers",)
NPZ_REFERENCE_KEYS = ("mu", "sigma", "mu_s", "sigma_s", "features")
SAMPLE_FEATURES = "features.npy"


def reference_cache_path(data_cfg: DictConfig, split: str, max_images: int | None, seed: int,
                         cache_dir: str | Path) -> Path:
    """cache_dir/<kind>-<split>-<R>px-<count>-<hash>.npz; the hash covers the data config, split, subset size and
    seed, and the Inception weights."""
    data = OmegaConf.to_container(data_cfg, resolve=True)
    for key in LOADER_ONLY_KEYS:
        data.pop(key, None)
    fingerprint = json.dumps({"data": data, "split": split, "max_images": max_images,
                              "subset_seed": None if max_images is None else seed,
                              "inception": weights_digest()}, sort_keys=True)
    digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
    count = "all" if max_images is None else str(max_images)
    return Path(cache_dir) / f"{data.get('kind', 'data')}-{split}-{data.get('resolution')}px-{count}-{digest}.npz"


def _compute_reference(data_cfg: DictConfig, subset: EvaluationSubset, device: torch.device, batch_size: int,
                       progress: bool) -> dict[str, np.ndarray]:
    from shared.data.images import make_image_loader

    loader = make_image_loader(data_cfg, subset.split, batch_size, train=False, indices=subset.indices)
    stats = InceptionStatistics(device, spatial=True, keep_features=True)
    for batch in tqdm(loader, desc=f"reference statistics ({subset.split})", disable=not progress):
        stats.update(quantize_to_uint8(batch["image"]))  # the reference sees images as saved samples are: uint8
    mu, sigma = stats.pool.statistics()
    mu_s, sigma_s = stats.spatial.statistics()
    record = {**subset.record(), "images": stats.count}  # a stream's count is known only now; unreadable files skip
    return {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s,
            "features": stats.features().numpy().astype(np.float32), "subset": np.array(json.dumps(record))}


def load_reference_cache(data_cfg: DictConfig, split: str, max_images: int | None, seed: int,
                         device: torch.device | str, cache_dir: str | Path, batch_size: int = 64,
                         progress: bool = False) -> dict:
    """{"mu", "sigma", "mu_s", "sigma_s", "features", "subset", "path"} of `max_images` images of the split (None:
    all), computed once and then read from the cache. "subset" says which images; "path" is the cache file."""
    path = reference_cache_path(data_cfg, split, max_images, seed, cache_dir)
    if path.is_file():
        with np.load(path) as cached:
            if all(key in cached.files for key in (*NPZ_REFERENCE_KEYS, "subset")):
                return {**{key: cached[key] for key in NPZ_REFERENCE_KEYS},
                        "subset": json.loads(str(cached["subset"])), "path": str(path)}
    subset = evaluation_subset(data_cfg, split, max_images, seed)
    reference = _compute_reference(data_cfg, subset, torch.device(device), batch_size, progress)
    save_statistics(path, **reference)
    return {**reference, "subset": json.loads(str(reference["subset"])), "path": str(path)}


def reference_statistics(data_cfg: DictConfig, split: str, max_images: int | None, seed: int,
                         device: torch.device | str, cache_dir: str | Path,
                         batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the Inception pool features of the reference images of `split` (cached)."""
    reference = load_reference_cache(data_cfg, split, max_images, seed, device, cache_dir, batch_size)
    return reference["mu"], reference["sigma"]


def _npz_reference(path: Path, device: torch.device, want_features: bool, batch_size: int,
                   progress: bool) -> dict[str, np.ndarray]:
    """The statistics in a reference .npz, plus pool features of its arr_0 images when asked for and present."""
    try:
        with np.load(path) as npz:
            if "mu" not in npz.files or "sigma" not in npz.files:
                raise DataError(f"evaluate.reference={path} has no mu/sigma (it holds {', '.join(npz.files)})")
            reference = {key: npz[key] for key in NPZ_REFERENCE_KEYS if key in npz.files}
            has_images = "arr_0" in npz.files
    except FileNotFoundError as error:
        raise DataError(f"evaluate.reference={path} does not exist") from error
    except (OSError, ValueError) as error:
        raise DataError(f"evaluate.reference={path} is not a readable .npz: {error}") from error
    if want_features and "features" not in reference and has_images:
        stats = _image_set_statistics(path, device, spatial=False, keep_features=True, batch_size=batch_size,
                                      progress=progress)
        reference["features"] = stats.features().numpy()
    return reference


def _image_set_statistics(path: str | Path, device: torch.device, spatial: bool, keep_features: bool,
                          batch_size: int, progress: bool) -> InceptionStatistics:
    stats = InceptionStatistics(device, spatial=spatial, keep_features=keep_features)
    stats.update_from_set(open_images(path), batch_size, progress)
    return stats


def evaluate_samples(samples_path: str | Path, mu_ref: np.ndarray, sigma_ref: np.ndarray,
                     device: torch.device | str, batch_size: int = 64, spatial_ref: tuple | None = None,
                     reference_features: np.ndarray | torch.Tensor | None = None, bootstrap: int = 0, seed: int = 0,
                     progress: bool = False) -> tuple[dict, torch.Tensor]:
    """({"fid", "fid_std", "fid_ci95", "bootstrap_resamples", "num_samples", "not_computed"} and, given their
    references, "sfid" and "precision"/"recall"; the samples' (N, 2048) pool features).

    spatial_ref: (mu_s, sigma_s) of the reference's sFID features. reference_features: (N, 2048) pool features of
    reference images, for precision/recall (k = 3). bootstrap: resamples of the samples for the gFID's spread.
    """
    device = torch.device(device)
    stats = _image_set_statistics(samples_path, device, spatial=spatial_ref is not None, keep_features=True,
                                  batch_size=batch_size, progress=progress)
    features = stats.features()
    fid = fid_spread(features, reference=(mu_ref, sigma_ref), device=device, bootstrap=bootstrap, seed=seed)
    result = {**flat_metrics({"fid": fid}), "num_samples": stats.count,
              "not_computed": {"inception_score": INCEPTION_SCORE_UNAVAILABLE}}
    if spatial_ref is not None:
        result["sfid"] = frechet_distance(*spatial_ref, *stats.spatial.statistics())
    if reference_features is not None:
        real = torch.as_tensor(np.asarray(reference_features)).to(device)
        result.update(precision_recall(real, features.to(device)))
    return result, features


def resolve_reference(cfg: DictConfig, device: torch.device, not_computed: dict) -> dict[str, np.ndarray]:
    """The reference of cfg.evaluate: {"mu", "sigma", ...} of evaluate.reference, or of the data's
    evaluate.reference_split (cached, computed once). What it lacks for the asked-for metrics goes into
    `not_computed`."""
    settings = cfg.evaluate
    if settings.reference is not None:
        reference = _npz_reference(Path(settings.reference), device, settings.precision_recall, settings.batch_size,
                                   cfg.progress)
        if settings.sfid and "mu_s" not in reference:
            not_computed["sfid"] = f"evaluate.reference={settings.reference} has no mu_s/sigma_s"
        if settings.precision_recall and "features" not in reference:
            not_computed["precision_recall"] = (f"evaluate.reference={settings.reference} holds neither reference "
                                                f"images (arr_0) nor features")
        return reference
    cache_dir = Path(cfg.output_root) / "reference_stats"
    return load_reference_cache(cfg.data, settings.reference_split, settings.reference_images, settings.subset_seed,
                                device, cache_dir, settings.batch_size, cfg.progress)


def evaluate_to_folder(cfg: DictConfig, samples: str | Path, run_dir: str | Path | None = None) -> dict:
    """gFID (and what else cfg.evaluate asks for) of the samples at `samples` (a folder of images or an ADM-layout
    .npz); returns the stage's result."""
    settings = cfg.evaluate
    samples = Path(samples)
    if not samples.exists():
        raise DataError(f"evaluate.samples={samples} does not exist")
    with setup(cfg, run_dir=run_dir) as runtime:
        not_computed: dict[str, str] = {}
        reference = resolve_reference(cfg, runtime.device, not_computed)
        result, features = evaluate_samples(
            samples, reference["mu"], reference["sigma"], runtime.device, batch_size=settings.batch_size,
            spatial_ref=(reference["mu_s"], reference["sigma_s"]) if settings.sfid and "mu_s" in reference else None,
            reference_features=reference.get("features") if settings.precision_recall else None,
            bootstrap=settings.bootstrap, seed=settings.subset_seed, progress=cfg.progress)
        result["not_computed"].update(not_computed)
        if settings.reference is not None:
            described = {"reference": str(settings.reference), "reference_path": str(settings.reference)}
        else:
            described = {"reference": f"data.{cfg.data.get('kind')} {reference['subset']['split']} split, "
                                      f"{reference['subset']['images']} images ({reference['subset']['selection']})",
                         "reference_subset": reference["subset"], "reference_path": reference["path"]}
        result = {"samples": str(samples), **described, **result}
        np.save(runtime.run_dir / SAMPLE_FEATURES, features.numpy().astype(np.float32))
        result["sample_features"] = str(runtime.run_dir / SAMPLE_FEATURES)
        runtime.log_metrics(0, {key: value for key, value in result.items() if isinstance(value, (int, float))})
        return runtime.finish(result)


def main(cfg: DictConfig) -> dict:
    if cfg.evaluate.samples is None:
        raise DataError("evaluate.samples is not set: pass evaluate.samples=PATH (a folder of images or an ADM-layout "
                        ".npz, e.g. the samples.npz of a stage=sample run)")
    result = evaluate_to_folder(cfg, cfg.evaluate.samples)
    print(json.dumps(result), flush=True)
    return result
