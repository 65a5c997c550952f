"""stage=ldm: train the class-conditional DiT on cached latents (it never reads an image).

Each step draws a fresh posterior sample z = μ + σ·ε from the cached moments (the cache holds both the image and
its horizontal flip), normalises it per channel with the cache's statistics, and hands it to the objective (ADM
DDPM or rectified flow, stage2_ldm/objective.py). The statistics, latent shape and tokenizer go into every
checkpoint, so sampling needs nothing but the checkpoint.

Every ldm.train.fid_every steps (0: never) the EMA DiT's gFID with its spread goes into metrics.jsonl and wandb
(`training_fid`), to choose checkpoints by.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from shared import runtime as runtime_lib
from shared.data.latents import LatentCache, LatentStats, make_latent_loader
from shared.data.sampler import BatchSplit
from shared.errors import ConfigError, DataError
from shared.nn import enable_activation_checkpointing
from shared.train.checkpoint import resolve_checkpoint
from shared.train.ema import EMA
from shared.train.loop import TrainModule, train
from shared.train.settings import loop_config, optim_config
from stage1_tokenizer.tokenizer import load_tokenizer
from stage2_ldm.dit import dit_from_model_config
from stage2_ldm.objective import build_objective
from stage2_ldm.sample import SampleDrawer, batch_seed, preview_grid, sampling_options, tokenizer_path

TRAINING_ONLY_KEYS = ("train", "checkpoint")
REPO = Path(__file__).resolve().parents[1]


class LatentDiffusionTraining(TrainModule):
    def __init__(self, dit: torch.nn.Module, objective, stats: LatentStats):
        super().__init__()
        self.dit, self.objective, self.stats = dit, objective, stats

    def phases(self) -> list[str]:
        return ["dit"]

    def phase_parameters(self, phase: str) -> list[torch.nn.Parameter]:
        return list(self.dit.parameters())

    def networks(self) -> dict[str, torch.nn.Module]:
        return {"dit": self.dit}

    def forward(self, batch: dict, step: int, phase: str):
        z = batch["mean"] + batch["std"] * torch.randn_like(batch["std"])  # (B, C, h, w) posterior sample
        return self.objective.loss(self.dit, self.stats.normalize(z), batch["label"])


def model_config(cfg: DictConfig, cache: LatentCache, tokenizer_checkpoint: str | None) -> dict:
    """What sampling needs to rebuild the DiT and go back to images: architecture, latent geometry, classes, the
    normalisation statistics and the tokenizer the latents came from."""
    config = OmegaConf.to_container(cfg.ldm, resolve=True)
    for key in TRAINING_ONLY_KEYS:
        config.pop(key, None)
    channels, height, width = cache.latent_shape
    if height != width:
        raise DataError(f"the latent cache {cache.dir} holds {height}x{width} latents; the DiT needs square ones")
    num_classes = cache.num_classes or cfg.data.get("num_classes")
    if not num_classes:
        raise DataError(f"the latent cache {cache.dir} does not record its number of classes; set data.num_classes")
    config.update(in_channels=channels, input_size=height, num_classes=int(num_classes),
                  latent_stats=cache.stats.to_dict(), tokenizer_checkpoint=tokenizer_checkpoint,
                  tokenizer_fingerprint=cache.manifest["fingerprint"]["tokenizer"])
    return config


def deepspeed_config(cfg: DictConfig) -> dict | None:
    """The JSON of launcher.config; the loop's backend sets its batch sizes and accumulation from train.*."""
    if cfg.launcher.kind != "deepspeed":
        return None
    path = Path(cfg.launcher.config)
    path = path if path.is_absolute() else REPO / path
    if not path.is_file():
        raise ConfigError(f"launcher.config={cfg.launcher.config}: no DeepSpeed config at {path}")
    return json.loads(path.read_text())


def _gather_to_main(value, runtime) -> list | None:
    """Every process's `value` (picklable) in rank order on the main process; None on the others."""
    if not runtime.distributed:
        return [value]
    values = [None] * runtime.world_size
    dist.all_gather_object(values, value)
    return values if runtime.is_main else None


def training_fid(cfg: DictConfig, config: dict, runtime) -> Callable[[int, EMA], dict]:
    """The evaluation of stage=ldm: gFID of ldm.train.fid_samples samples of the EMA DiT (classes in turn, the
    sample: settings, decoded with the DiT's tokenizer) against the reference of cfg.evaluate, with its bootstrap
    spread (evaluate.bootstrap). Every process draws its share of the batches, each from its own seed (the same
    samples' noise at every evaluation, whatever the number of processes); the main process computes the FID.
    The reference is resolved now, so that a missing one fails before training."""
    from shared.metrics.evaluate import resolve_reference
    from shared.metrics.fid import InceptionStatistics
    from shared.metrics.paired import fid_spread

    if not config.get("tokenizer_checkpoint"):
        raise ConfigError("ldm.train.fid_every decodes samples with the tokenizer of the latents: set "
                          "tokenizer.checkpoint=<its stage=tokenizer run>")
    tokenizer = load_tokenizer(tokenizer_path(config, None), runtime.device, use_ema=bool(cfg.decode.use_ema))
    reference = resolve_reference(cfg, runtime.device, {}) if runtime.is_main else None
    runtime.barrier()
    labels = torch.arange(cfg.ldm.train.fid_samples) % config["num_classes"]
    batch_size = cfg.sample.batch_size
    batches = range(runtime.rank, -(-len(labels) // batch_size), runtime.world_size)

    def evaluate(step: int, ema: EMA) -> dict:
        drawer = SampleDrawer(ema.model.eval(), config, tokenizer, sampling=sampling_options(cfg.sample),
                              nfe=cfg.decode.nfe, device=runtime.device, autocast=runtime.autocast)
        inception = InceptionStatistics(runtime.device, keep_features=True)
        for batch in batches:
            images, _ = drawer.draw(labels[batch * batch_size : (batch + 1) * batch_size], batch_seed(cfg.seed, batch))
            inception.update(images)
        sizes = [len(labels[batch * batch_size : (batch + 1) * batch_size]) for batch in batches]
        mine = list(zip(batches, inception.features().split(sizes))) if sizes else []
        shares = _gather_to_main(mine, runtime)
        if shares is None:
            return {}
        features = torch.cat([features for _, features in sorted((pair for share in shares for pair in share),
                                                                 key=lambda pair: pair[0])])  # in sample order
        fid = fid_spread(features, reference=(reference["mu"], reference["sigma"]), device=runtime.device,
                         bootstrap=cfg.evaluate.bootstrap, seed=cfg.evaluate.subset_seed)
        runtime.log.info("step %d: gFID %.3f ± %s (%d samples)", step, fid["value"], fid["std"], len(features))
        return {"gfid": fid["value"], "gfid_std": fid["std"], "gfid_samples": len(features)}

    return evaluate


def train_ldm(cfg: DictConfig, cache_dir: str | Path, tokenizer_checkpoint: str | Path | None,
              run_dir: str | Path | None = None, previews: bool = False) -> dict:
    """Train (or resume) the DiT on the latent cache at `cache_dir`; returns the stage's result: the final
    checkpoint (`checkpoint`) and its step. tokenizer_checkpoint: the tokenizer the cache was encoded with; when
    given, the cache must have been, and the DiT records it for decoding its samples. previews: every
    ldm.train.sample_every steps, decode a grid of the EMA DiT's samples (stage2_ldm/sample.py:preview_grid)."""
    cache_dir = Path(cache_dir)
    expected_fingerprint = None
    if tokenizer_checkpoint:
        from stage2_ldm.cache import tokenizer_fingerprint

        tokenizer_checkpoint = str(resolve_checkpoint(tokenizer_checkpoint))
        expected_fingerprint = tokenizer_fingerprint(tokenizer_checkpoint, use_ema=bool(cfg.decode.use_ema))
    with runtime_lib.setup(cfg, run_dir=run_dir, resume=True) as runtime:
        train_cfg = cfg.ldm.train
        cache = LatentCache(cache_dir, "train", expected_tokenizer_fingerprint=expected_fingerprint)
        config = model_config(cfg, cache, tokenizer_checkpoint)
        dit = dit_from_model_config(config)
        if train_cfg.activation_checkpointing:
            enable_activation_checkpointing(dit)
        if cfg.compile:
            dit.compile()  # in place: parameter names, and so checkpoints, stay those of the plain module
        module = LatentDiffusionTraining(dit, build_objective(cfg.ldm), cache.stats)
        runtime.log.info("DiT: %.2fM parameters on %d latents of shape %s",
                         sum(p.numel() for p in dit.parameters()) / 1e6, len(cache), cache.latent_shape)
        loop = loop_config(train_cfg, {"dit": optim_config(train_cfg)})

        def make_batches(split: BatchSplit, start_step: int):
            return make_latent_loader(cache_dir, "train", split.per_rank, seed=cfg.seed, rank=runtime.rank,
                                      world_size=split.world_size, micro_steps=split.grad_accum,
                                      start_batch=split.first_micro_batch(start_step),
                                      expected_tokenizer_fingerprint=expected_fingerprint)

        def preview(step: int, ema) -> None:
            preview_grid(cfg, step, ema.model, config, runtime)

        result = train(runtime, module, make_batches, loop, model_config=config,
                       on_sample=preview if previews else None,
                       on_evaluate=training_fid(cfg, config, runtime) if train_cfg.fid_every else None,
                       deepspeed_config=deepspeed_config(cfg), progress=cfg.progress)
        return runtime.finish({"checkpoint": str(result.checkpoint), "step": result.step,
                               "nonfinite_steps": result.nonfinite_steps,
                               "train_seconds": result.train_seconds, "cache_dir": str(cache_dir),
                               "tokenizer_checkpoint": tokenizer_checkpoint})


def main(cfg: DictConfig) -> dict:
    return train_ldm(cfg, cfg.cache.dir, cfg.tokenizer.get("checkpoint"), previews=True)
