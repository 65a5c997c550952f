"""stage=reconstruct: how well a trained tokenizer reconstructs a split.

    python pipelines/run.py stage=reconstruct tokenizer.checkpoint=outputs/tokenizer/RUN decode.nfe=1

Reports rFID (reconstructions against the originals of the same images, standard TF-Inception features) with its
bootstrap spread, PSNR, SSIM and LPIPS (`lpips_net`'s, and the other backbone's as `lpips_<net>`) with their 95%
intervals, and the decoder's images/s, and writes a side-by-side PNG grid (originals above reconstructions).
`reconstruct.num_images` below the split's size draws a seeded class-stratified subset (`evaluate.subset_seed`,
shared/data/subsets.py), so two tokenizers measured with the same settings see the same images:
per_image_nfe<N>.npz keeps each image's index, metrics and Inception features, from which their paired differences
are computed (stage=reproduce).

Latents are the posterior means; the diffusion decoders sample their own noise, so their reconstructions are
stochastic. Two diagnostics say how much that noise shows, each per image and as a mean with its 95% interval:
- decoder noise sensitivity (shared/metrics/noise_sensitivity.py): the latents are decoded `reconstruct.noise_seeds`
  = K times with independent noise; `noise_std` is the spread across the K decodes in grey levels, `seed_mean_psnr`
  the PSNR of their mean. With K = 1 there is no second decode: both are None in the result and absent from the
  per-image file. The reported reconstruction (rFID, PSNR, SSIM, LPIPS, the grid, the images/s) is the first decode.
  The deterministic VAE takes the same path and gives noise_std 0 and seed_mean_psnr = psnr.
- colour noise (shared/metrics/colour_noise.py): `chroma_hf`, the high-frequency chroma energy of the
  reconstructions, `chroma_hf_original` that of the originals, and `chroma_hf_ratio`, the ratio of their means.
Decode k of image n starts from noise drawn from its own generator, seeded by (`seed`, k, n), n the image's position
in the evaluated order: the same for any batch size and device. (The ablation's DDPM decoder also draws noise at each
of its ancestral steps, from torch's global RNG seeded by `seed`: reproducible at a given batch size only.)
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
from shared.metrics.colour_noise import chroma_hf
from shared.metrics.noise_sensitivity import noise_std, seed_mean_psnr
from shared.metrics.paired import PairedMetrics, flat_metrics, mean_entry
from shared.runtime import synchronize
from shared.train.checkpoint import resolve_checkpoint
from stage1_tokenizer.tokenizer import load_tokenizer


def per_image_path(run_dir: str | Path, nfe: int) -> Path:
    return Path(run_dir) / f"per_image_nfe{nfe}.npz"


def decoder_noise(seed: int, draw: int, positions: range, shape: torch.Size) -> torch.Tensor:
    """(B, *shape) standard normal on the CPU: the decoder's starting noise of decode `draw` for the images at
    `positions` in the evaluated order, each from its own generator seeded by (seed, draw, position)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(
        int(np.random.SeedSequence((seed, draw, position)).generate_state(1)[0]))) for position in positions])


def decoder_diagnostics(originals: torch.Tensor, decodes: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image (B,) diagnostics of decodes (K, B, 3, H, W) of originals (B, 3, H, W), decode 0 the reported
    reconstruction: "chroma_hf", "chroma_hf_original" and, with K ≥ 2, "noise_std" and "seed_mean_psnr"."""
    values = {"chroma_hf": chroma_hf(decodes[0]), "chroma_hf_original": chroma_hf(originals)}
    if len(decodes) > 1:
        values.update(noise_std=noise_std(decodes), seed_mean_psnr=seed_mean_psnr(originals, decodes))
    return values


def diagnostics_summary(per_image: dict[str, np.ndarray]) -> dict:
    """The result's keys of the diagnostics' per-image values: each mean with its `_ci95` (None where not measured)
    and "chroma_hf_ratio", the mean chroma_hf of the reconstructions over that of the originals."""
    entries = {name: mean_entry(per_image.get(name, ()))
               for name in ("noise_std", "seed_mean_psnr", "chroma_hf", "chroma_hf_original")}
    original = entries["chroma_hf_original"]["value"]
    ratio = entries["chroma_hf"]["value"] / original if original else None  # flat originals have no colour noise
    return {**flat_metrics(entries), "chroma_hf_ratio": ratio}


@torch.no_grad()
def reconstruct_split(tokenizer, data_cfg: DictConfig, split: str, *, num_images: int | None, nfe: int,
                      batch_size: int, device: torch.device, autocast, lpips_net: str, noise_seeds: int, seed: int,
                      subset_seed: int = 0, bootstrap: int = 0, grid_path: Path | None = None, grid_images: int = 16,
                      per_image_file: Path | None = None, progress: bool = False) -> dict:
    """The reconstruction metrics of `split` (see the module's docstring); noise_seeds: decodes per image (K),
    seed: of their noise."""
    if noise_seeds < 1:
        raise ConfigError(f"reconstruct.noise_seeds={noise_seeds}: the reconstruction is a decode, so at least 1")
    subset = evaluation_subset(data_cfg, split, num_images, subset_seed)
    paired = PairedMetrics(device, lpips_net)
    diagnostic_parts: dict[str, list[torch.Tensor]] = {}
    decode_seconds, grid, seen = 0.0, [], 0
    # Grid images spread evenly over the evaluated images: a split is listed class by class, so the first ones
    # would all be of one class. (A stream's length is unknown: its first images.)
    count = len(subset.indices) if subset.indices is not None else subset.total
    grid_positions = (set(range(grid_images)) if count is None else
                      set(np.linspace(0, count - 1, grid_images).round().astype(int).tolist()))
    loader = make_image_loader(data_cfg, split, batch_size, train=False, indices=subset.indices)
    for batch in tqdm(loader, desc=f"reconstruct nfe={nfe}", unit="batch", disable=not progress):
        images = batch["image"].to(device)
        # Drawn before the clock starts: the images/s are the decoder's.
        noises = [decoder_noise(seed, draw, range(seen, seen + len(images)), images.shape[1:]).to(device)
                  for draw in range(noise_seeds)]
        with autocast():
            latents = tokenizer.encode(images).mode()
        synchronize(device)
        began = time.perf_counter()
        with autocast():
            first = tokenizer.decode(latents, nfe=nfe, noise=noises[0].to(latents.dtype))
        synchronize(device)
        decode_seconds += time.perf_counter() - began
        with autocast():
            decodes = torch.stack([first, *(tokenizer.decode(latents, nfe=nfe, noise=noise.to(latents.dtype))
                                            for noise in noises[1:])])
        decodes = decodes.float().clamp(-1, 1)  # (K, B, 3, H, W)
        reconstructions = decodes[0]
        paired.update(images, reconstructions)
        for name, values in decoder_diagnostics(images, decodes).items():
            diagnostic_parts.setdefault(name, []).append(values.cpu())
        grid += [(images[i].cpu(), reconstructions[i].cpu()) for i in range(len(images)) if seen + i in grid_positions]
        seen += len(images)
    arrays = paired.arrays()
    diagnostics = {name: torch.cat(parts).numpy() for name, parts in diagnostic_parts.items()}
    count = paired.count  # the images actually read: unreadable files are skipped
    if grid_path is not None and grid:
        originals, reconstructions = (torch.stack(images) for images in zip(*grid[:grid_images]))
        save_comparison_grid(originals, reconstructions, grid_path)
    if per_image_file is not None:
        indices = np.arange(count) if subset.indices is None else subset.indices
        np.savez(per_image_file, index=indices, **arrays, **diagnostics)
    metrics = flat_metrics(paired.result(bootstrap, subset_seed), names={"fid": "rfid"})
    return {**metrics, "decode_images_per_s": count / decode_seconds, "num_images": count, "decoder_nfe": nfe,
            "subset": {**subset.record(), "images": count}, "batch_size": batch_size, "lpips_net": lpips_net,
            "noise_seeds": noise_seeds, **diagnostics_summary(diagnostics)}


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
        torch.manual_seed(cfg.seed)  # the DDPM decoder's ancestral steps draw from the global RNG
        nfe = cfg.decode.nfe
        metrics = reconstruct_split(tokenizer, cfg.data, cfg.reconstruct.split, num_images=cfg.reconstruct.num_images,
                                    nfe=nfe, batch_size=cfg.decode.batch_size, device=runtime.device,
                                    autocast=runtime.autocast, lpips_net=cfg.lpips_net,
                                    noise_seeds=cfg.reconstruct.noise_seeds, seed=cfg.seed,
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
