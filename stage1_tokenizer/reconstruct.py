"""stage=reconstruct: how well a trained tokenizer reconstructs a split.

    python pipelines/run.py stage=reconstruct tokenizer.checkpoint=outputs/tokenizer/RUN decode.nfe=1

Reports rFID (reconstructions against the originals of the same split, standard TF-Inception features), PSNR,
SSIM, LPIPS and the decoder's images/s, and writes a side-by-side PNG grid (originals above reconstructions).
Latents are the posterior means; the ε-VAE decoder samples its own noise, so its reconstructions are stochastic.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from shared import runtime as runtime_lib
from shared.runtime import synchronize
from shared.data.images import make_image_loader
from shared.errors import ConfigError
from shared.metrics.fid import StatisticsAccumulator, frechet_distance
from shared.metrics.image_io import save_comparison_grid
from shared.metrics.image_quality import psnr, ssim
from shared.metrics.inception import load_inception, quantize_to_uint8
from shared.metrics.lpips import LPIPS
from shared.train.checkpoint import resolve_checkpoint
from stage1_tokenizer.tokenizer import load_tokenizer


@torch.no_grad()
def reconstruct_split(tokenizer, data_cfg: DictConfig, split: str, *, num_images: int | None, nfe: int,
                      batch_size: int, device: torch.device, autocast, lpips_net: str = "alex",
                      grid_path: Path | None = None, grid_images: int = 16, progress: bool = False) -> dict:
    inception = load_inception(device)
    lpips = LPIPS(lpips_net).to(device)
    real_stats, fake_stats = StatisticsAccumulator(), StatisticsAccumulator()
    sums = {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0}
    count, decode_seconds, grid = 0, 0.0, []
    loader = make_image_loader(data_cfg, split, batch_size, train=False)
    bar = tqdm(total=num_images, desc=f"reconstruct nfe={nfe}", unit="img", disable=not progress)
    for batch in loader:
        images = batch["image"].to(device)
        if num_images is not None:
            images = images[: num_images - count]
        with autocast():
            latents = tokenizer.encode(images).mode()
        synchronize(device)
        began = time.perf_counter()
        with autocast():
            reconstructions = tokenizer.decode(latents, nfe=nfe)
        synchronize(device)
        decode_seconds += time.perf_counter() - began
        reconstructions = reconstructions.float().clamp(-1, 1)
        real_stats.update(inception(quantize_to_uint8(images)))
        fake_stats.update(inception(quantize_to_uint8(reconstructions)))
        sums["psnr"] += psnr(images, reconstructions).sum().item()
        sums["ssim"] += ssim(images, reconstructions).sum().item()
        sums["lpips"] += lpips(images, reconstructions).sum().item()
        if len(grid) < grid_images:
            grid += list(zip(images.cpu(), reconstructions.cpu()))
        count += len(images)
        bar.update(len(images))
        if num_images is not None and count >= num_images:
            break
    bar.close()
    if grid_path is not None and grid:
        originals, reconstructions = (torch.stack(images) for images in zip(*grid[:grid_images]))
        save_comparison_grid(originals, reconstructions, grid_path)
    return {"rfid": frechet_distance(*real_stats.statistics(), *fake_stats.statistics()),
            **{name: total / count for name, total in sums.items()},
            "decode_images_per_s": count / decode_seconds, "num_images": count, "decoder_nfe": nfe,
            "split": split, "batch_size": batch_size, "lpips_net": lpips_net}


def reconstruct(cfg: DictConfig, checkpoint: str | Path, run_dir: str | Path | None = None) -> dict:
    runtime = runtime_lib.setup(cfg, run_dir=run_dir)
    checkpoint = resolve_checkpoint(checkpoint)
    tokenizer = load_tokenizer(checkpoint, runtime.device, use_ema=bool(cfg.decode.use_ema))
    torch.manual_seed(cfg.seed)
    metrics = reconstruct_split(tokenizer, cfg.data, cfg.reconstruct.split, num_images=cfg.reconstruct.num_images,
                                nfe=cfg.decode.nfe, batch_size=cfg.decode.batch_size, device=runtime.device,
                                autocast=runtime.autocast, lpips_net=cfg.lpips_net,
                                grid_path=runtime.run_dir / f"reconstructions_nfe{cfg.decode.nfe}.png",
                                grid_images=cfg.reconstruct.grid_images, progress=cfg.progress)
    metrics.update(tokenizer=type(tokenizer).__name__, checkpoint=str(checkpoint), use_ema=bool(cfg.decode.use_ema),
                   device=str(runtime.device))
    (runtime.run_dir / f"metrics_nfe{cfg.decode.nfe}.json").write_text(json.dumps(metrics, indent=2) + "\n")
    runtime.log.info("reconstruction: %s", json.dumps(metrics))
    runtime.close()
    return metrics


def main(cfg: DictConfig) -> None:
    if not cfg.tokenizer.get("checkpoint"):
        raise ConfigError("tokenizer.checkpoint is null: set it to a stage=tokenizer run folder or checkpoint file")
    print(json.dumps(reconstruct(cfg, cfg.tokenizer.checkpoint)))
