"""The one validation of a run's name, lists and numeric settings, applied where a stage reads its config
(runtime.setup).

The name must be one folder name: a run writes to ${output_root}/${stage}/${name}/ and nowhere else.

Every numeric leaf of the resolved config is checked against the first rule whose pattern matches its dotted path
(fnmatch, so `*.batch_size` covers data, tokenizer, ldm, cache, sample, ...), and against COMBINATION_RULES where its
range depends on another setting. Every float anywhere must also be finite. A bad value is refused at start-up with
one line that names the key, the value and what it must be, instead of surfacing later as a hang (a negative batch
size), a traceback (a zero batch size, lr=nan) or a silently different computation (decode.nfe=0). A setting that
is a list (LIST_RULES) must be one: a scalar in its place (betas=0.9, pipeline.steps=tokenizer) is refused, not
guessed at.
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
        low, high = (str(bound) if isinstance(bound, int) else f"{bound:g}" for bound in (self.low, self.high))
        if self.low > -math.inf and self.high < math.inf:
            bounds = f" in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        elif self.low > -math.inf:
            bounds = f" {'>' if self.low_open else '>='} {low}"
        else:
            bounds = ""
        return kind + bounds + (", or null" if self.nullable else "") + (", or a name" if self.named else "")


COUNT = Rule(integer=True, low=1)                       # sizes, steps, intervals: at least one
SEED = Rule(integer=True, low=0, high=2**32 - 1)        # what numpy's generators take
DATA_SIZE = Rule(integer=True, low=1, high=2**31 - 1)   # images in a split: an index of int32 at most
RESOLUTION = Rule(integer=True, low=1, high=4096)       # pixels a side: beyond it one image is gigabytes
OPTIONAL_COUNT = Rule(integer=True, low=1, nullable=True)
NON_NEGATIVE_INT = Rule(integer=True, low=0)
POSITIVE = Rule(integer=False, low=0, low_open=True)
NON_NEGATIVE = Rule(integer=False, low=0)
FRACTION = Rule(integer=False, low=0, high=1, high_open=True)  # decays, betas, dropout: 1 would freeze or drop all

LOSS_WEIGHTS = ("velocity", "lpips", "adversarial", "r1", "kl", "reconstruction")

# (dotted-path pattern, rule); the first match decides. Keys not listed only have to be finite if they are floats.
RULES: tuple[tuple[str, Rule], ...] = (
    ("seed", SEED),
    ("*.seed", SEED),
    ("*.batch_size", COUNT),
    ("*.grad_accum", COUNT),            # micro-steps per optimiser step
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
    ("*.fid_every", NON_NEGATIVE_INT),      # 0: no gFID during training
    ("*.fid_samples", COUNT),               # at least 2 where gFIDs are computed: COMBINATION_RULES
    ("*.max_nonfinite", COUNT),
    ("*.keep_checkpoints", COUNT),
    ("launcher.timeout_minutes", POSITIVE),  # how long a collective waits for the other processes
    ("decode.nfe", COUNT),
    # A preset turns a claim off by setting it to null; the resolution claim's name matches the next pattern.
    ("reproduce.claims.resolution", Rule(integer=False, nullable=True)),
    ("*.resolution", RESOLUTION),
    ("*.num_workers", NON_NEGATIVE_INT),
    ("*.num_classes", OPTIONAL_COUNT),
    ("*.train_size", DATA_SIZE),
    ("*.val_size", DATA_SIZE),
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
    ("*.head_channels", OPTIONAL_COUNT),    # null: one attention head over all channels (DDPM's UNet)
    ("*.norm_groups", COUNT),
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

# (dotted path, rule, dotted path of the condition): the rule applies where the condition is a valid number above 0.
COMBINATION_RULES: tuple[tuple[str, Rule, str], ...] = (
    ("ldm.train.fid_samples", Rule(integer=True, low=2), "ldm.train.fid_every"),  # a covariance needs 2 samples
)


@dataclass(frozen=True)
class ListRule:
    """A setting that is a list (a scalar in its place is refused, not guessed at): of exactly `length` items or of
    at least `least`, or null where `nullable`."""

    example: str
    least: int = 0
    length: int | None = None
    nullable: bool = False

    def accepts(self, value) -> bool:
        if value is None:
            return self.nullable
        if not isinstance(value, list):
            return False
        return len(value) == self.length if self.length is not None else len(value) >= self.least

    def describe(self) -> str:
        size = f"{self.length} items" if self.length is not None else f"at least {self.least} item" + \
            ("s" if self.least != 1 else "")
        return f"a list of {size}, e.g. {self.example}" + (", or null" if self.nullable else "")


# (dotted-path pattern, rule) of the settings that are lists; the first match decides. The items are checked by
# RULES above.
LIST_RULES: tuple[tuple[str, ListRule], ...] = (
    ("*.betas", ListRule("[0.9, 0.999]", length=2)),
    ("*.disc_betas", ListRule("[0.0, 0.999]", length=2)),
    ("*.channel_mult", ListRule("[1, 2, 4]", least=1)),
    ("*.attention_levels", ListRule("[16]")),
    ("sample.labels", ListRule("[0, tench, n01440764]", least=1, nullable=True)),
    ("sample.cfg_interval", ListRule("[0, 0.89]", length=2, nullable=True)),
    ("cache.splits", ListRule("[train, val]", least=1)),
    ("pipeline.steps", ListRule("[tokenizer, reconstruct]")),
    ("reproduce.only", ListRule("[vae_f4, epsvae_f4]", least=1, nullable=True)),
    ("bench.sd_vae_channels", ListRule("[128, 256, 512, 512]", least=1)),
    ("paper_speed.compressions", ListRule("[8, 16]", least=1)),
)


def _nodes(node, prefix: str = "") -> Iterator[tuple[str, object]]:
    """(dotted path, value) of every value below `node`, containers included, list items as path.<index>."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield f"{prefix}{key}", value
        yield from _nodes(value, f"{prefix}{key}.")


def _rule_for(path: str) -> Rule | None:
    return next((rule for pattern, rule in RULES if fnmatch.fnmatchcase(path, pattern)), None)


def name_problems(name) -> list[str]:
    """Why `name` cannot name a run folder (empty if it can). A run writes to ${output_root}/${stage}/${name}/, so
    a name is one folder name: a '/', '.' or '..' would put the run in another stage's or run's folder, or outside."""
    text = str(name)
    if text in ("", ".", "..") or "/" in text or "\0" in text:
        return [f"name={text!r} must be one folder name (not empty, '.' or '..', and without '/')"]
    return []


def config_problems(cfg: DictConfig | dict) -> list[str]:
    """One "key=value: must be ..." per invalid setting; empty when the run's name, every list and every numeric
    setting are valid."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, (DictConfig, ListConfig)) else cfg
    values = dict(_nodes(container))
    problems = []
    for path, value in values.items():
        list_rule = next((rule for pattern, rule in LIST_RULES if fnmatch.fnmatchcase(path, pattern)), None)
        if list_rule is not None and not list_rule.accepts(value):
            problems.append(f"{path}={value!r} must be {list_rule.describe()}")
        elif isinstance(value, (dict, list)):
            continue
        elif path == "name":  # a folder name, even where the command line reads it as a number (name=nan, name=1e3)
            problems += name_problems(value)
        elif (rule := _rule_for(path)) is not None:
            if not rule.accepts(value):
                problems.append(f"{path}={value!r} must be {rule.describe()}")
        elif isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{path}={value!r} must be finite")
    for path, rule, condition in COMBINATION_RULES:
        active = _rule_for(condition).accepts(values.get(condition)) and values[condition] > 0
        if active and _rule_for(path).accepts(values.get(path)) and not rule.accepts(values[path]):
            problems.append(f"{path}={values[path]!r} must be {rule.describe()} where {condition} > 0")
    return problems


def check_config(cfg: DictConfig | dict) -> None:
    """Raise ConfigError naming every invalid setting of `cfg`."""
    problems = config_problems(cfg)
    if problems:
        raise ConfigError(f"invalid setting{'s' if len(problems) > 1 else ''}: {'; '.join(problems)}")
