"""stage=ldm: train the class-conditional DiT on cached latents (it never reads an image).

Each step draws a fresh posterior sample z = μ + σ·ε from the cached moments (the cache holds both the image and
its horizontal flip), normalises it per channel with the cache's statistics, and hands it to the objective (ADM
DDPM or rectified flow, stage2_ldm/objective.py). The statistics, latent shape and tokenizer go into every
checkpoint, so sampling needs nothing but the checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from shared import runtime as runtime_lib
from shared.data.latents import LatentCache, LatentStats, make_latent_loader
from shared.errors import ConfigError, DataError
from shared.train.checkpoint import resolve_checkpoint
from shared.train.loop import TrainModule, train
from shared.train.settings import loop_config, optim_config
from stage2_ldm.dit import dit_from_model_config
from stage2_ldm.objective import build_objective
from stage2_ldm.sample import preview_grid

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


def deepspeed_config(cfg: DictConfig, micro_batch: int) -> dict | None:
    if cfg.launcher.kind != "deepspeed":
        return None
    path = Path(cfg.launcher.config)
    path = path if path.is_absolute() else REPO / path
    if not path.is_file():
        raise ConfigError(f"launcher.config={cfg.launcher.config}: no DeepSpeed config at {path}")
    config = json.loads(path.read_text())
    config["train_micro_batch_size_per_gpu"] = micro_batch
    config.setdefault("gradient_accumulation_steps", 1)
    return config


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
        if cfg.compile:
            dit.compile()  # in place: parameter names, and so checkpoints, stay those of the plain module
        module = LatentDiffusionTraining(dit, build_objective(cfg.ldm), cache.stats)
        runtime.log.info("DiT: %.2fM parameters on %d latents of shape %s",
                         sum(p.numel() for p in dit.parameters()) / 1e6, len(cache), cache.latent_shape)
        loop = loop_config(train_cfg, {"dit": optim_config(train_cfg)})

        def make_batches(start_step: int):
            return make_latent_loader(cache_dir, "train", train_cfg.batch_size, seed=cfg.seed, rank=runtime.rank,
                                      world_size=runtime.world_size, start_batch=start_step,
                                      expected_tokenizer_fingerprint=expected_fingerprint)

        def preview(step: int, ema) -> None:
            preview_grid(cfg, step, ema.model, config, runtime)

        result = train(runtime, module, make_batches, loop, model_config=config, images_per_batch=train_cfg.batch_size,
                       on_sample=preview if previews else None,
                       deepspeed_config=deepspeed_config(cfg, train_cfg.batch_size), progress=cfg.progress)
        return runtime.finish({"checkpoint": str(result.checkpoint), "step": result.step,
                               "nonfinite_steps": result.nonfinite_steps, "cache_dir": str(cache_dir),
                               "tokenizer_checkpoint": tokenizer_checkpoint})


def main(cfg: DictConfig) -> dict:
    return train_ldm(cfg, cfg.cache.dir, cfg.tokenizer.get("checkpoint"), previews=True)
