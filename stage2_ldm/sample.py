"""stage=sample: class-conditional samples from a trained DiT, decoded by the stage-1 tokenizer.

    python pipelines/run.py stage=sample ldm.checkpoint=outputs/ldm/RUN sample.cfg_scale=1.5 decode.nfe=3

Writes to the run folder: shards/shard_<s>.npz (uint8 samples as they are made, sample.shard_size each),
images/<index>_c<label>.png (with sample.save_png), grid.png (a row per class, its index and name beside it),
samples.npz (the ADM evaluator's layout: arr_0 uint8 N×H×W×3, arr_1 labels, streamed from the shards) and
result.json with the sampling settings and images/s of the LDM part, the decoding part and the whole: the median
over the full batches, after an untimed warm-up batch of the same size, with the range. The `sample:` section of
the config chooses the sampler and its options (stage2_ldm/objective.py), and the classes, by index or name
(stage2_ldm/classes.py).

Batch b of the samples is drawn from its own seed (`batch_seed`), so the samples do not depend on the number of
processes, and a run killed part-way resumes from its last complete shard (rerun with the same name=) and ends
with the samples of an uninterrupted run. No process holds more than one shard in memory.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from shared import runtime as runtime_lib
from shared.data.image_files import ImageSet, NpzWriter, open_images, save_image_grid, save_images, write_npz
from shared.data.latents import LatentStats
from shared.data.transforms import quantize_to_uint8
from shared.errors import ConfigError, DataError
from shared.files import write_atomically
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


def batch_seed(seed: int, batch: int) -> int:
    """The seed of sampling batch `batch` (labels[batch B : (batch + 1) B]): a batch's noise depends on the run's seed
    and its place in the list alone, not on the process that draws it or on what was drawn before it."""
    return int(np.random.SeedSequence([seed, batch]).generate_state(1)[0])


class SampleDrawer:
    """Decoded samples of a DiT, one batch at a time, each from its own seed."""

    def __init__(self, dit, config: dict, tokenizer, *, sampling: dict, nfe: int, device: torch.device, autocast):
        """sampling: the options of Objective.sample (`sampling_options`); nfe: the decoder's steps."""
        self.dit, self.tokenizer = dit, tokenizer
        self.objective = build_objective(OmegaConf.create(config))
        self.stats = LatentStats.from_dict(config["latent_stats"])
        self.latent_shape = (config["in_channels"], config["input_size"], config["input_size"])
        self.sampling, self.nfe, self.device, self.autocast = sampling, nfe, device, autocast

    @torch.no_grad()
    def draw(self, labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, dict]:
        """uint8 images (B, 3, H, W) of `labels` (B,), drawn from the random stream of `seed` (the caller's stream is
        left as it was), and {"images", "ldm", "decode"}: B and the seconds in the DiT sampler and in decoding."""
        device = self.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            labels = labels.to(device)
            noise = torch.randn(len(labels), *self.latent_shape, device=device)
            synchronize(device)
            began = time.perf_counter()
            with self.autocast():
                latents = self.objective.sample(self.dit, noise, labels, **self.sampling)
            synchronize(device)
            sampled = time.perf_counter()
            with self.autocast():
                decoded = self.tokenizer.decode(self.stats.denormalize(latents.float()), nfe=self.nfe)
            synchronize(device)
        timing = {"images": len(labels), "ldm": sampled - began, "decode": time.perf_counter() - sampled}
        return quantize_to_uint8(decoded.float().clamp(-1, 1)).cpu(), timing


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
    drawer = SampleDrawer(dit.eval(), config, tokenizer, sampling=sampling_options(cfg.sample), nfe=cfg.decode.nfe,
                          device=runtime.device, autocast=runtime.autocast)
    images, _ = drawer.draw(labels, batch_seed(cfg.seed, 0))
    save_image_grid(images, runtime.run_dir / "samples" / f"step_{step:07d}.png", nrow=len(labels) // 2)


def save_class_grid(samples: ImageSet, labels: torch.Tensor, path: Path, classes: ClassNames | None,
                    rows: int = 16, per_class: int = 8) -> None:
    """One row per class (the first `rows` sampled), up to `per_class` of its samples (read from `samples`, whose
    image i has label labels[i]), with the class's index and name (from `classes`; None: the index alone) beside
    it: classes read by eye."""
    shown = labels.unique()[:rows].tolist()
    members = [torch.nonzero(labels == label).flatten()[:per_class].tolist() for label in shown]
    width = max(len(row) for row in members)
    blank = torch.zeros(3, *samples.image_size, dtype=torch.uint8)
    cells = [samples.read(row[i], row[i] + 1)[0] if i < len(row) else blank for row in members for i in range(width)]
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


SHARDS = "shards"
SHARD_SETTINGS = "settings.json"


def shard_path(folder: Path, shard: int) -> Path:
    return folder / SHARDS / f"shard_{shard:06d}.npz"


def claim_shards(folder: Path, settings: dict, runtime) -> None:
    """Record the settings the shards in `folder` are drawn with, or refuse (on every process) shards drawn with
    other ones."""
    path = folder / SHARDS / SHARD_SETTINGS
    recorded = json.loads(path.read_text()) if path.is_file() else settings
    changed = [f"{key}: {recorded.get(key)!r} -> {value!r}" for key, value in settings.items()
               if recorded.get(key) != value]
    if changed:
        raise ConfigError(f"the sample shards in {path.parent} were drawn with other settings ({'; '.join(changed)}); "
                          f"use another name=... or delete {path.parent}")
    if runtime.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, json.dumps(settings, indent=2) + "\n")
    runtime.barrier()


def draw_shards(drawer: SampleDrawer, labels: torch.Tensor, *, seed: int, batch_size: int, shard_batches: int,
                folder: Path, save_png: bool, runtime, progress: bool) -> list[dict]:
    """Draw this process's missing shards; returns the timings of the batches drawn (a warm-up batch untimed).

    Shard s holds batches [s S, (s + 1) S) of `labels` (S = shard_batches), batch b drawn from batch_seed(seed, b);
    process r makes the shards s = r, r + W, ... Each shard is an ADM-layout .npz (uint8 images, labels) that appears
    whole or not at all, after its PNGs: a rerun draws only the missing shards, and any number of processes writes
    the shards one process writes."""
    num_batches = -(-len(labels) // batch_size)
    num_shards = -(-num_batches // shard_batches)
    missing = [s for s in range(runtime.rank, num_shards, runtime.world_size) if not shard_path(folder, s).is_file()]
    if runtime.is_main:
        runtime.log.info("%d of %d sample shards to draw (%d images each)", len(missing), num_shards,
                         shard_batches * batch_size)
    if missing:  # lazy initialisation (kernels, allocator, autotuning for this shape) is not throughput
        drawer.draw(labels[:batch_size], seed)
    timings = []
    for shard in tqdm(missing, desc="sample shards", unit="shard", disable=not progress):
        images, shard_labels = [], []
        for batch in range(shard * shard_batches, min((shard + 1) * shard_batches, num_batches)):
            batch_labels = labels[batch * batch_size : (batch + 1) * batch_size]
            drawn, timing = drawer.draw(batch_labels, batch_seed(seed, batch))
            images.append(drawn)
            shard_labels.append(batch_labels)
            timings.append(timing)
        images, shard_labels = torch.cat(images), torch.cat(shard_labels)
        if save_png:
            first = shard * shard_batches * batch_size
            names = [f"{first + i:06d}_c{int(label)}" for i, label in enumerate(shard_labels)]
            save_images(images, folder / "images", names)
        write_npz(shard_path(folder, shard), images, labels=shard_labels)
    return timings


def join_shards(folder: Path, labels: torch.Tensor, num_shards: int, path: Path) -> Path:
    """The shards, in order, streamed into one ADM-layout .npz (arr_0 uint8 N x H x W x 3, arr_1 `labels`)."""
    shards = [open_images(shard_path(folder, s)) for s in range(num_shards)]
    written = 0
    with NpzWriter(path, len(labels), *shards[0].image_size) as writer:
        for shard in shards:
            for _, images in shard.batches(256):
                writer.write(images, labels[written : written + len(images)])
                written += len(images)
    return path


def sample_to_folder(cfg: DictConfig, ldm_checkpoint: str | Path, tokenizer_checkpoint: str | Path | None = None,
                     out_dir: str | Path | None = None) -> dict:
    """Sample with the DiT at `ldm_checkpoint`, decode with the tokenizer at `tokenizer_checkpoint` (None: the one
    the DiT recorded) and write the shards, images, grid and samples.npz; returns the stage's result (settings,
    images/s of this run's batches and the npz's path; empty on other processes than the main one). Several
    processes split the shards; a rerun in the same folder resumes from the shards on disk (`draw_shards`)."""
    with runtime_lib.setup(cfg, run_dir=out_dir) as runtime:
        dit, config = load_dit(ldm_checkpoint, runtime.device, use_ema=True)
        tokenizer_checkpoint = tokenizer_path(config, tokenizer_checkpoint)
        tokenizer = load_tokenizer(tokenizer_checkpoint, runtime.device, use_ema=bool(cfg.decode.use_ema))
        classes = data_classes(cfg, config["num_classes"], runtime.log)
        labels = labels_to_sample(cfg.sample, config["num_classes"], classes)
        sampling = sampling_options(cfg.sample)
        batch_size = cfg.sample.batch_size
        shard_batches = max(1, cfg.sample.shard_size // batch_size)
        claim_shards(runtime.run_dir, {
            "ldm_checkpoint": str(resolve_checkpoint(ldm_checkpoint)),
            "tokenizer_checkpoint": str(tokenizer_checkpoint), "use_ema": bool(cfg.decode.use_ema),
            "decoder_nfe": cfg.decode.nfe, **sampling, "seed": cfg.seed,
            "labels_sha256": hashlib.sha256(labels.numpy().tobytes()).hexdigest(), "batch_size": batch_size,
            "shard_batches": shard_batches}, runtime)
        drawer = SampleDrawer(dit, config, tokenizer, sampling=sampling, nfe=cfg.decode.nfe, device=runtime.device,
                              autocast=runtime.autocast)
        timings = draw_shards(drawer, labels, seed=cfg.seed, batch_size=batch_size, shard_batches=shard_batches,
                              folder=runtime.run_dir, save_png=cfg.sample.save_png, runtime=runtime,
                              progress=cfg.progress and runtime.is_main)
        runtime.barrier()
        metrics = {}
        if runtime.is_main:
            num_shards = -(-len(labels) // (batch_size * shard_batches))
            samples = join_shards(runtime.run_dir, labels, num_shards, runtime.run_dir / "samples.npz")
            save_class_grid(open_images(samples), labels, runtime.run_dir / "grid.png", classes)
            sampler, steps = build_objective(OmegaConf.create(config)).sampling(cfg.sample.sampler, cfg.sample.steps)
            metrics = {
                "num_samples": len(labels), "batch_size": batch_size,
                **sampling, "sampler": sampler, "steps": steps, "decoder_nfe": cfg.decode.nfe,
                "objective": config["objective"], "device": str(runtime.device),
                "images_per_s": throughput(timings) if timings else None,  # None: every shard was drawn before
                "seconds": {part: sum(t[part] for t in timings) for part in ("ldm", "decode")},
                "ldm_checkpoint": str(resolve_checkpoint(ldm_checkpoint)),
                "tokenizer_checkpoint": str(tokenizer_checkpoint), "samples": str(samples),
            }
            runtime.log.info("samples in %s: %s", runtime.run_dir, json.dumps(metrics["images_per_s"]))
        return runtime.finish(metrics)


def main(cfg: DictConfig) -> dict:
    if not cfg.ldm.get("checkpoint"):
        raise ConfigError("ldm.checkpoint is null: set ldm.checkpoint=<stage=ldm run folder or checkpoint file>")
    result = sample_to_folder(cfg, cfg.ldm.checkpoint, cfg.tokenizer.get("checkpoint"))
    print(json.dumps(result))
    return result
