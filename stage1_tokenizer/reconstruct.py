"""stage=reconstruct: how well a trained tokenizer reconstructs a split.

    python pipelines/run.py stage=reconstruct tokenizer.checkpoint=outputs/tokenizer/RUN decode.nfe=1

Reports rFID (reconstructions against the originals of the same images, standard TF-Inception features) with its
bootstrap spread, PSNR, SSIM and LPIPS with their 95% intervals, and the decoder's images/s, and writes a
side-by-side PNG grid (originals above reconstructions). `reconstruct.num_images` below the split's size draws a
seeded class-stratified subset (`evaluate.subset_seed`, shared/data/subsets.py), so two tokenizers measured with
the same settings see the same images: per_image_nfe<N>.npz keeps each image's index, metrics and Inception
features, from which their paired differences are computed (stage=reproduce).
Latents are the posterior means; the ε-VAE decoder samples its own noise, so its reconstructions are stochastic.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from shared import runtime as runtime_lib
from shared.data.image_files import save_comparison_grid
from shared.data.images import make_image_loader
from shared.data.subsets import evaluation_subset
from shared.errors import ConfigError
from shared.metrics.paired import PairedMetrics, flat_metrics
from shared.runtime import synchronize
from shared.train.checkpoint import resolve_checkpoint
from stage1_tokenizer.tokenizer import load_tokenizer


def per_image_path(run_dir: str | Path, nfe: int) -> Path:
    return Path(run_dir) / f"per_image_nfe{nfe}.npz"


@torch.no_grad()
def reconstruct_split(tokenizer, data_cfg: DictConfig, split: str, *, num_images: int | None, nfe: int,
                      batch_size: int, device: torch.device, autocast, lpips_net: str = "alex", subset_seed: int = 0,
                      bootstrap: int = 0, grid_path: Path | None = None, grid_images: int = 16,
                      per_image_file: Path | None = None, progress: bool = False) -> dict:
    subset = evaluation_subset(data_cfg, split, num_images, subset_seed)
    paired = PairedMetrics(device, lpips_net)
    decode_seconds, grid, seen = 0.0, [], 0
    # Grid images spread evenly over the evaluated images: a split is listed class by class, so the first ones
    # would all be of one class. (A stream's length is unknown: its first images.)
    count = len(subset.indices) if subset.indices is not None else subset.total
    grid_positions = (set(range(grid_images)) if count is None else
                      set(np.linspace(0, count - 1, grid_images).round().astype(int).tolist()))
    loader = make_image_loader(data_cfg, split, batch_size, train=False, indices=subset.indices)
    for batch in tqdm(loader, desc=f"reconstruct nfe={nfe}", unit="batch", disable=not progress):
        images = batch["image"].to(device)
        with autocast():
            latents = tokenizer.encode(images).mode()
        synchronize(device)
        began = time.perf_counter()
        with autocast():
            reconstructions = tokenizer.decode(latents, nfe=nfe)
        synchronize(device)
        decode_seconds += time.perf_counter() - began
        reconstructions = reconstructions.float().clamp(-1, 1)
        paired.update(images, reconstructions)
        grid += [(images[i].cpu(), reconstructions[i].cpu()) for i in range(len(images)) if seen + i in grid_positions]
        seen += len(images)
    arrays = paired.arrays()
    count = paired.count  # the images actually read: unreadable files are skipped
    if grid_path is not None and grid:
        originals, reconstructions = (torch.stack(images) for images in zip(*grid[:grid_images]))
        save_comparison_grid(originals, reconstructions, grid_path)
    if per_image_file is not None:
        indices = np.arange(count) if subset.indices is None else subset.indices
        np.savez(per_image_file, index=indices, **arrays)
    metrics = flat_metrics(paired.result(bootstrap, subset_seed), names={"fid": "rfid"})
    return {**metrics, "decode_images_per_s": count / decode_seconds, "num_images": count, "decoder_nfe": nfe,
            "subset": {**subset.record(), "images": count}, "batch_size": batch_size, "lpips_net": lpips_net}


def reconstruct(cfg: DictConfig, checkpoint: str | Path, run_dir: str | Path | None = None,
                grid: str | None = None) -> dict:
    """Reconstruct with the tokenizer at `checkpoint` (a file or a stage=tokenizer run folder); returns the stage's
    result, the metrics at decoder NFE `decode.nfe`. grid: a diffusion decoder's sampling grid to decode on instead
    of the one it was trained with (the ablation's decode-only rungs)."""
    with runtime_lib.setup(cfg, run_dir=run_dir) as runtime:
        checkpoint = resolve_checkpoint(checkpoint)
        tokenizer = load_tokenizer(checkpoint, runtime.device, use_ema=bool(cfg.decode.use_ema))
        if grid is not None:
            tokenizer.grid = grid
        torch.manual_seed(cfg.seed)
        nfe = cfg.decode.nfe
        metrics = reconstruct_split(tokenizer, cfg.data, cfg.reconstruct.split, num_images=cfg.reconstruct.num_images,
                                    nfe=nfe, batch_size=cfg.decode.batch_size, device=runtime.device,
                                    autocast=runtime.autocast, lpips_net=cfg.lpips_net,
                                    subset_seed=cfg.evaluate.subset_seed, bootstrap=cfg.evaluate.bootstrap,
                                    grid_path=runtime.run_dir / f"reconstructions_nfe{nfe}.png",
                                    grid_images=cfg.reconstruct.grid_images,
                                    per_image_file=per_image_path(runtime.run_dir, nfe), progress=cfg.progress)
        metrics.update(tokenizer=type(tokenizer).__name__, checkpoint=str(checkpoint), use_ema=bool(cfg.decode.use_ema),
                       device=str(runtime.device), grid=getattr(tokenizer, "grid", None))
        runtime.log.info("reconstruction: %s", json.dumps(metrics))
        return runtime.finish(metrics)


def main(cfg: DictConfig) -> dict:
    if not cfg.tokenizer.get("checkpoint"):
        raise ConfigError("tokenizer.checkpoint is null: set it to a stage=tokenizer run folder or checkpoint file")
    result = reconstruct(cfg, cfg.tokenizer.checkpoint)
    print(json.dumps(result))
    return result
