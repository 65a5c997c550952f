"""From a stage's `train:` config section to the loop's settings and data iterator."""
from __future__ import annotations

from omegaconf import DictConfig

from shared.train.backends import OptimConfig
from shared.train.loop import LoopConfig


def optim_config(train_cfg: DictConfig, prefix: str = "") -> OptimConfig:
    """The optimiser settings `{prefix}lr`, `{prefix}betas`, ... of a `train:` section (prefix "disc_" for the
    discriminator, which shares warm-up and clipping with the generator unless it sets its own)."""
    def get(key, default=None):
        return train_cfg.get(prefix + key, train_cfg.get(key, default))

    return OptimConfig(lr=get("lr"), betas=tuple(get("betas", (0.9, 0.999))), weight_decay=get("weight_decay", 0.0),
                       warmup_steps=get("warmup_steps", 0), grad_clip=get("grad_clip"))


def loop_config(train_cfg: DictConfig, optim: dict[str, OptimConfig]) -> LoopConfig:
    """The loop's settings; `fid_every` (stage=ldm's FID during training) is its evaluation interval."""
    return LoopConfig(steps=train_cfg.steps, batch_size=train_cfg.batch_size, grad_accum=train_cfg.grad_accum,
                      log_every=train_cfg.log_every, ckpt_every=train_cfg.ckpt_every,
                      sample_every=train_cfg.get("sample_every", 0), evaluate_every=train_cfg.get("fid_every", 0),
                      ema_decay=train_cfg.ema_decay,
                      max_nonfinite=train_cfg.get("max_nonfinite", 10),
                      keep_checkpoints=train_cfg.get("keep_checkpoints", 2),
                      keep_steps=tuple(train_cfg.keep_steps), optim=optim)
