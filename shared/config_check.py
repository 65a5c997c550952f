"""The one validation of a run's numeric settings, applied where a stage reads its config (runtime.setup).

Every numeric leaf of the resolved config is checked against the first rule whose pattern matches its dotted path
(fnmatch, so `*.batch_size` covers data, tokenizer, ldm, cache, sample, ...). Every float anywhere must also be
finite. A bad value is refused at start-up with one line that names the key, the value and what it must be, instead
of surfacing later as a hang (a negative batch size), a traceback (a zero batch size, lr=nan) or a silently
different computation (decode.nfe=0).
"""
from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterator
from dataclasses import dataclass

from omegaconf import DictConfig, ListConfig, OmegaConf

from shared.errors import ConfigError


@dataclass(frozen=True)
class Rule:
    """What a value must be: a whole number or any real, within bounds, optionally null or a name."""

    integer: bool
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False   # low < value instead of low <= value
    high_open: bool = False  # value < high instead of value <= high
    nullable: bool = False
    named: bool = False      # a string (a name the stage resolves) is accepted too

    def accepts(self, value) -> bool:
        if value is None:
            return self.nullable
        if isinstance(value, str):
            return self.named
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        kind = "a whole number" if self.integer else "a finite number"
        if self.low > -math.inf and self.high < math.inf:
            bounds = f" in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        elif self.low > -math.inf:
            bounds = f" {'>' if self.low_open else '>='} {self.low:g}"
        else:
            bounds = ""
        return kind + bounds + (", or null" if self.nullable else "") + (", or a name" if self.named else "")


COUNT = Rule(integer=True, low=1)                       # sizes, steps, intervals: at least one
OPTIONAL_COUNT = Rule(integer=True, low=1, nullable=True)
NON_NEGATIVE_INT = Rule(integer=True, low=0)
POSITIVE = Rule(integer=False, low=0, low_open=True)
NON_NEGATIVE = Rule(integer=False, low=0)
FRACTION = Rule(integer=False, low=0, high=1, high_open=True)  # decays, betas, dropout: 1 would freeze or drop all

LOSS_WEIGHTS = ("velocity", "lpips", "adversarial", "r1", "kl", "reconstruction")

# (dotted-path pattern, rule); the first match decides. Keys not listed only have to be finite if they are floats.
RULES: tuple[tuple[str, Rule], ...] = (
    ("seed", NON_NEGATIVE_INT),
    ("*.seed", NON_NEGATIVE_INT),
    ("*.batch_size", COUNT),
    ("*.loader_batch_size", COUNT),
    ("*.dit_batch_size", COUNT),
    ("*.image_batch_size", COUNT),
    ("sample.steps", OPTIONAL_COUNT),   # null: the objective's default
    ("*.steps", COUNT),                 # steps=0 would mark a run done with no checkpoint
    ("*.lr", POSITIVE),
    ("*.disc_lr", POSITIVE),
    ("*.betas.*", FRACTION),
    ("*.disc_betas.*", FRACTION),
    ("*.weight_decay", NON_NEGATIVE),
    ("*.warmup_steps", NON_NEGATIVE_INT),
    ("*.ema_decay", FRACTION),
    ("*.grad_clip", Rule(integer=False, low=0, low_open=True, nullable=True)),
    ("*.log_every", COUNT),
    ("*.ckpt_every", COUNT),
    ("*.sample_every", NON_NEGATIVE_INT),   # 0: no previews
    ("*.max_nonfinite", COUNT),
    ("*.keep_checkpoints", COUNT),
    ("decode.nfe", COUNT),
    ("*.resolution", COUNT),
    ("*.num_workers", NON_NEGATIVE_INT),
    ("*.num_classes", OPTIONAL_COUNT),
    ("*.train_size", COUNT),
    ("*.val_size", COUNT),
    # 0 samples the unconditional model, 1 the conditional one, above 1 guides; below 0 would push samples away
    # from their class, which no method here intends.
    ("*.cfg_scale", NON_NEGATIVE),
    ("sample.num_per_class", COUNT),
    ("sample.labels.*", Rule(integer=True, low=0, named=True)),   # a class index, or its name or wnid
    ("sample.cfg_interval.*", Rule(integer=False, low=0, high=1)),
    ("sample.timestep_shift", POSITIVE),
    ("sample.ddim_eta", Rule(integer=False, low=0, high=1)),       # above 1 the DDIM step's variance is undefined
    ("reconstruct.num_images", OPTIONAL_COUNT),
    ("reconstruct.grid_images", NON_NEGATIVE_INT),
    ("evaluate.reference_images", OPTIONAL_COUNT),
    ("evaluate.bootstrap", NON_NEGATIVE_INT),
    ("*.shard_size", COUNT),
    ("*.shuffle_buffer", NON_NEGATIVE_INT),
    ("*.downsample", COUNT),
    ("*.latent_channels", COUNT),
    ("*.base_channels", COUNT),
    ("*.channel_mult.*", COUNT),
    ("*.num_res_blocks", NON_NEGATIVE_INT),
    ("*.head_channels", COUNT),
    ("*.dropout", FRACTION),
    ("*.class_dropout", FRACTION),
    ("*.depth", COUNT),
    ("*.hidden_size", COUNT),
    ("*.num_heads", COUNT),
    ("*.patch_size", COUNT),
    ("*.mlp_ratio", POSITIVE),
    ("*.gamma", POSITIVE),
    ("*.logit_std", POSITIVE),
    ("*.disc_start", NON_NEGATIVE_INT),
    ("export.latent_scale", Rule(integer=False, low=0, low_open=True, nullable=True)),
    *((f"tokenizer.loss.{term}", NON_NEGATIVE) for term in LOSS_WEIGHTS),
    ("*.ndf", COUNT),
    ("*.n_layers", COUNT),
    ("*.embedding_dim", COUNT),
    ("bench.warmup", NON_NEGATIVE_INT),
    *((f"bench.{key}", COUNT) for key in ("repeats", "latent_size", "image_size", "sample_images", "sample_steps",
                                          "sampling_repeats", "loader_images", "fid_images", "matmul_size",
                                          "conv_channels", "conv_size", "sd_vae_channels.*")),
)


def _leaves(node, prefix: str = "") -> Iterator[tuple[str, object]]:
    """(dotted path, value) of every leaf, list items as path.<index>."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}{key}.")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _leaves(value, f"{prefix}{index}.")
    else:
        yield prefix[:-1], node


def _rule_for(path: str) -> Rule | None:
    return next((rule for pattern, rule in RULES if fnmatch.fnmatchcase(path, pattern)), None)


def config_problems(cfg: DictConfig | dict) -> list[str]:
    """One "key=value: must be ..." per invalid setting; empty when every numeric setting is valid."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, (DictConfig, ListConfig)) else cfg
    problems = []
    for path, value in _leaves(container):
        if path == "name":  # a label, even where the command line reads it as a number (name=nan, name=1e3)
            continue
        rule = _rule_for(path)
        if rule is not None:
            if not rule.accepts(value):
                problems.append(f"{path}={value!r} must be {rule.describe()}")
        elif isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{path}={value!r} must be finite")
    return problems


def check_config(cfg: DictConfig | dict) -> None:
    """Raise ConfigError naming every invalid numeric setting of `cfg`."""
    problems = config_problems(cfg)
    if problems:
        raise ConfigError(f"invalid setting{'s' if len(problems) > 1 else ''}: {'; '.join(problems)}")
