"""stage=sample: class-conditional samples from a trained DiT, decoded by the stage-1 tokenizer.

    python pipelines/run.py stage=sample ldm.checkpoint=outputs/ldm/RUN sample.cfg_scale=1.5 decode.nfe=3

Writes to the run folder: images/<index>_c<label>.png, grid.png (a row per class, its index and name beside it),
samples.npz (the ADM evaluator's layout: arr_0 uint8 N×H×W×3, arr_1 labels) and result.json with the sampling
settings and images/s of the LDM part, the decoding part and the whole: the median over the full batches, after an
untimed warm-up batch of the same size, with the range. The `sample:` section of the config chooses the sampler
and its options (stage2_ldm/objective.py), and the classes, by index or name (stage2_ldm/classes.py).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from shared import runtime as runtime_lib
from shared.data.image_files import open_images, save_image_grid, save_images, write_npz
from shared.data.latents import LatentStats
from shared.errors import ConfigError, DataError
from shared.runtime import synchronize
from shared.train.checkpoint import resolve_checkpoint
from stage1_tokenizer.tokenizer import load_tokenizer
from stage2_ldm.classes import ClassNames
from stage2_ldm.dit import load_dit
from stage2_ldm.objective import build_objective


def names_a_class(labels) -> bool:
    """Whether sample.labels gives any class by name or wnid (a string) instead of its index."""
    return labels is not None and any(isinstance(label, str) for label in labels)


def labels_to_sample(sample_cfg: DictConfig, num_classes: int, classes: ClassNames | None) -> torch.Tensor:
    """sample.labels (indices, or names and wnids resolved by `classes`) if given, else sample.num_per_class of
    every class, class-major: (N,) int64."""
    if sample_cfg.labels is not None:
        if names_a_class(sample_cfg.labels) and classes is None:
            raise ConfigError(f"sample.labels={list(sample_cfg.labels)} names classes, but the data lists no class "
                              "names: give class indices")
        indices = [classes.index(label) if isinstance(label, str) else label for label in sample_cfg.labels]
        labels = torch.tensor(indices, dtype=torch.long)
        if labels.numel() == 0 or labels.min() < 0 or labels.max() >= num_classes:
            raise ConfigError(f"sample.labels must be class indices in [0, {num_classes}) or class names, got "
                              f"{list(sample_cfg.labels)}")
        return labels
    if sample_cfg.num_per_class < 1:
        raise ConfigError(f"sample.num_per_class={sample_cfg.num_per_class} must be at least 1 (or give sample.labels)")
    return torch.arange(num_classes).repeat_interleave(sample_cfg.num_per_class)


def sampling_options(sample_cfg: DictConfig) -> dict:
    """The keyword arguments of Objective.sample that the `sample:` section sets (checked there)."""
    interval = sample_cfg.cfg_interval
    return {"cfg_scale": sample_cfg.cfg_scale, "cfg_interval": None if interval is None else list(interval),
            "sampler": sample_cfg.sampler, "steps": sample_cfg.steps, "timestep_shift": sample_cfg.timestep_shift,
            "ddim_eta": sample_cfg.ddim_eta}


@torch.no_grad()
def generate(dit, config: dict, tokenizer, labels: torch.Tensor, *, sampling: dict, nfe: int, batch_size: int,
             device: torch.device, autocast, warmup: bool = True,
             progress: bool = False) -> tuple[torch.Tensor, list[dict]]:
    """Images (N, 3, H, W) in [-1, 1] for `labels`, sampled with the options `sampling` (`sampling_options`), and
    per batch {"images", "ldm", "decode"}: its size and the seconds spent in the DiT sampler and in decoding.

    warmup: first sample and decode one untimed batch of the real size, so lazy initialisation (kernels, allocator,
    thread pools, autotuning for that shape) is not counted as throughput.
    """
    objective = build_objective(OmegaConf.create(config))
    stats = LatentStats.from_dict(config["latent_stats"])
    latent_shape = (config["in_channels"], config["input_size"], config["input_size"])

    def sample_and_decode(batch_labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        noise = torch.randn(len(batch_labels), *latent_shape, device=device)
        synchronize(device)
        began = time.perf_counter()
        with autocast():
            latents = objective.sample(dit, noise, batch_labels, **sampling)
        synchronize(device)
        sampled = time.perf_counter()
        with autocast():
            decoded = tokenizer.decode(stats.denormalize(latents.float()), nfe=nfe)
        synchronize(device)
        return decoded, {"images": len(batch_labels), "ldm": sampled - began, "decode": time.perf_counter() - sampled}

    if warmup:  # in a forked RNG: the warm-up must not change which samples the run draws
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            sample_and_decode(labels[:batch_size].to(device))
    images, timings = [], []
    for start in tqdm(range(0, len(labels), batch_size), desc="sample", unit="batch", disable=not progress):
        decoded, timing = sample_and_decode(labels[start : start + batch_size].to(device))
        images.append(decoded.float().clamp(-1, 1).cpu())
        timings.append(timing)
    return torch.cat(images), timings


def throughput(timings: list[dict]) -> dict:
    """Images/s of the DiT sampler, the decoder and both ("ldm", "decode", "total"): the median over the timed
    full-size batches (a short last batch is timed only when it is the only one), with their [min, max] range."""
    full = [timing for timing in timings if timing["images"] == timings[0]["images"]]
    rates = {part: [t["images"] / (t["ldm"] + t["decode"] if part == "total" else t[part]) for t in full]
             for part in ("ldm", "decode", "total")}
    return {**{part: float(np.median(values)) for part, values in rates.items()},
            "range": {part: [min(values), max(values)] for part, values in rates.items()}, "timed_batches": len(full)}


def tokenizer_path(config: dict, given: str | Path | None) -> Path:
    """The tokenizer checkpoint to decode with: `given`, or else the one whose latents the DiT was trained on."""
    recorded = config.get("tokenizer_checkpoint")
    path = given or recorded
    if not path:
        raise ConfigError("no tokenizer to decode with: set tokenizer.checkpoint=<stage=tokenizer run or file>")
    if not Path(path).exists() and recorded and Path(recorded).exists():
        raise DataError(f"tokenizer.checkpoint={path} does not exist; the DiT was trained on latents of "
                        f"{recorded}: pass tokenizer.checkpoint={recorded}")
    return resolve_checkpoint(path)


def preview_grid(cfg: DictConfig, step: int, dit, config: dict, runtime) -> None:
    """During stage=ldm: one sample per class (at most 8 classes x 2) decoded to a PNG grid, with the tokenizer the
    DiT's latents came from (none recorded: no grid)."""
    if not config.get("tokenizer_checkpoint"):
        return
    tokenizer = load_tokenizer(tokenizer_path(config, None), runtime.device, use_ema=bool(cfg.decode.use_ema))
    labels = torch.arange(min(config["num_classes"], 8)).repeat(2)
    images, _ = generate(dit.eval(), config, tokenizer, labels, sampling=sampling_options(cfg.sample),
                         nfe=cfg.decode.nfe, batch_size=len(labels), device=runtime.device, autocast=runtime.autocast,
                         warmup=False)
    save_image_grid(images, runtime.run_dir / "samples" / f"step_{step:07d}.png", nrow=len(labels) // 2)


def save_class_grid(images: torch.Tensor, labels: torch.Tensor, path: Path, classes: ClassNames | None,
                    rows: int = 16, per_class: int = 8) -> None:
    """One row per class (the first `rows` sampled), up to `per_class` of its samples, with the class's index and
    name (from `classes`; None: the index alone) beside it: classes read by eye."""
    shown = labels.unique()[:rows].tolist()
    members = [torch.nonzero(labels == label).flatten()[:per_class] for label in shown]
    width = max(len(row) for row in members)
    cells = [images[row[i]] if i < len(row) else torch.zeros_like(images[0]) for row in members for i in range(width)]
    row_labels = [classes.label(label) if classes else str(label) for label in shown]
    save_image_grid(torch.stack(cells), path, nrow=width, row_labels=row_labels)


def data_classes(cfg: DictConfig, num_classes: int, log) -> ClassNames | None:
    """The DiT's class names from the data config. Where it cannot list them (another data set, no names, no
    files here) the grid's rows are labelled by index alone, with a warning, unless sample.labels names a class:
    then that is the error."""
    try:
        return ClassNames.of_data(cfg.data, num_classes)
    except (ConfigError, DataError) as error:
        if names_a_class(cfg.sample.labels):
            raise
        log.warning("the class grid is labelled by class index only: %s", error)
        return None


def sample_to_folder(cfg: DictConfig, ldm_checkpoint: str | Path, tokenizer_checkpoint: str | Path | None = None,
                     out_dir: str | Path | None = None) -> dict:
    """Sample with the DiT at `ldm_checkpoint`, decode with the tokenizer at `tokenizer_checkpoint` (None: the one
    the DiT recorded) and write images, grid and samples.npz; returns the stage's result (settings, images/s and
    the npz's path; empty on other processes than the main one). Several processes split the labels (rank r takes
    every world_size-th) and rank 0 assembles the npz."""
    with runtime_lib.setup(cfg, run_dir=out_dir) as runtime:
        torch.manual_seed(cfg.seed + runtime.rank)
        dit, config = load_dit(ldm_checkpoint, runtime.device, use_ema=True)
        tokenizer_checkpoint = tokenizer_path(config, tokenizer_checkpoint)
        tokenizer = load_tokenizer(tokenizer_checkpoint, runtime.device, use_ema=bool(cfg.decode.use_ema))
        classes = data_classes(cfg, config["num_classes"], runtime.log)
        labels = labels_to_sample(cfg.sample, config["num_classes"], classes)
        indices = torch.arange(len(labels))[runtime.rank :: runtime.world_size]
        sampling = sampling_options(cfg.sample)
        images, timings = generate(dit, config, tokenizer, labels[indices], sampling=sampling, nfe=cfg.decode.nfe,
                                   batch_size=cfg.sample.batch_size, device=runtime.device, autocast=runtime.autocast,
                                   progress=cfg.progress and runtime.is_main)
        names = [f"{int(i):06d}_c{int(labels[i])}" for i in indices]
        save_images(images, runtime.run_dir / "images", names)
        runtime.barrier()
        metrics = {}
        if runtime.is_main:
            # Every rank's PNGs, in index order (file names start with the zero-padded index).
            written = open_images(runtime.run_dir / "images")
            everything = written.read(0, len(written))
            write_npz(runtime.run_dir / "samples.npz", everything, labels=labels)
            save_class_grid(everything, labels, runtime.run_dir / "grid.png", classes)
            sampler, steps = build_objective(OmegaConf.create(config)).sampling(cfg.sample.sampler, cfg.sample.steps)
            metrics = {
                "num_samples": len(labels), "batch_size": cfg.sample.batch_size,
                **sampling, "sampler": sampler, "steps": steps, "decoder_nfe": cfg.decode.nfe,
                "objective": config["objective"], "device": str(runtime.device),
                "images_per_s": throughput(timings),
                "seconds": {part: sum(t[part] for t in timings) for part in ("ldm", "decode")},
                "ldm_checkpoint": str(resolve_checkpoint(ldm_checkpoint)),
                "tokenizer_checkpoint": str(tokenizer_checkpoint), "samples": str(runtime.run_dir / "samples.npz"),
            }
            runtime.log.info("samples in %s: %s", runtime.run_dir, json.dumps(metrics["images_per_s"]))
        return runtime.finish(metrics)


def main(cfg: DictConfig) -> dict:
    if not cfg.ldm.get("checkpoint"):
        raise ConfigError("ldm.checkpoint is null: set ldm.checkpoint=<stage=ldm run folder or checkpoint file>")
    result = sample_to_folder(cfg, cfg.ldm.checkpoint, cfg.tokenizer.get("checkpoint"))
    print(json.dumps(result))
    return result
