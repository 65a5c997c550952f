"""Reading weights that other code bases wrote, without running anything in them.

    state_dict = read_state_dict("DiT-XL-2-256x256.pt")              # .safetensors, or a torch pickle of tensors
    config, state_dict = read_diffusers_model("sd-vae-ft-ema/")       # a save_pretrained folder (or file + config)
    save_diffusers_folder(config, state_dict, out_dir)                # what <_class_name>.from_pretrained loads

`.safetensors` files are read by safetensors; everything else by torch.load(weights_only=True), which refuses a
pickle that would call any function before it runs. The stage converters (stage1_tokenizer/convert.py,
stage2_ldm/convert.py) map the names.

A config.json is someone else's file too: the converters check every value they read against a schema
(`check_values`) before building or allocating anything, the sizes bounded by what the weights beside it hold
(`WeightsExtent`), and refuse what would not fit in this machine's memory (`check_fits_in_memory`), each with one
DataError naming the key.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import safetensors.torch
import torch

from shared.config_check import Rule
from shared.errors import ConfigError, DataError
from shared.train.checkpoint import safe_torch_load

DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
DIFFUSERS_SHARD_INDEX = "diffusion_pytorch_model.safetensors.index.json"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file or of a torch file holding a state dict (optionally under "ema",
    "model" or "state_dict", the layouts of DiT's and most training scripts' checkpoints)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(path)
        except (OSError, safetensors.SafetensorError) as error:
            raise DataError(f"{path} is not a readable .safetensors file ({error})") from error
    loaded = safe_torch_load(path, str(path), "load it with the code that wrote it and save its state dict alone "
                             "(torch.save(model.state_dict(), ...))")
    for key in ("ema", "model", "state_dict"):  # training checkpoints: the weights, EMA first (DiT's convention)
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
            break
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise DataError(f"{path} does not hold a state dict (names -> tensors)")
    return dict(loaded)


def is_diffusers_model(path: str | Path) -> bool:
    """A save_pretrained folder of one diffusers model (config.json beside its weights)."""
    path = Path(path)
    return (path / DIFFUSERS_CONFIG).is_file() and any(
        (path / name).is_file() for name in (*DIFFUSERS_WEIGHTS, DIFFUSERS_SHARD_INDEX))


def read_json(path: Path, what: str) -> dict:
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"{what} {path} cannot be read ({error})") from error
    if not isinstance(values, dict):
        raise DataError(f"{what} {path} is not a JSON object")
    return values


def read_diffusers_model(path: str | Path, config_path: str | Path | None = None) -> tuple[dict, dict]:
    """(config, state_dict) of a diffusers model: a save_pretrained folder (single or sharded safetensors, or
    .bin), or one weights file with its config.json (`config_path`, default: config.json beside the file)."""
    path = Path(path)
    if path.is_dir():
        if not is_diffusers_model(path):
            raise DataError(f"{path} is not a diffusers model folder (config.json and "
                            f"{' or '.join(DIFFUSERS_WEIGHTS)}); for a model of a pipeline, give its subfolder "
                            f"(e.g. vae/ or transformer/)")
        config = read_json(Path(config_path) if config_path else path / DIFFUSERS_CONFIG, "diffusers config")
        return config, read_folder_weights(path)
    config_path = Path(config_path) if config_path else path.with_name(DIFFUSERS_CONFIG)
    if not config_path.is_file():
        raise DataError(f"{path} comes without its diffusers config: pass import.config=<its config.json>")
    return read_json(config_path, "diffusers config"), read_state_dict(path)


def read_folder_weights(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / DIFFUSERS_SHARD_INDEX
    if index.is_file():
        state_dict = {}
        for shard in shard_files(read_json(index, "shard index"), index):
            state_dict.update(read_state_dict(folder / shard))
        return state_dict
    return read_state_dict(next(folder / name for name in DIFFUSERS_WEIGHTS if (folder / name).is_file()))


def shard_files(index: dict, path: Path) -> list[str]:
    """The file names a shard index's weight_map ({tensor name: file name}) names, each a file of the index's own
    folder; DataError otherwise (a name such as ../vae/x.safetensors would read a file outside it)."""
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise DataError(f"shard index {path}: weight_map must be a non-empty object {{tensor name: file name}}")
    for name in set(weight_map.values()):
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name:
            raise DataError(f"shard index {path}: weight_map names {name!r}, which is not a file name in its folder")
    return sorted(set(weight_map.values()))


@dataclass(frozen=True)
class ListOf:
    """A config.json value that is a list of 1 to `most` items, each fitting `item`."""

    item: object
    most: int


@dataclass(frozen=True)
class WeightsExtent:
    """How much a state dict holds: no size its config describes can be larger, nor a count of layers exceed its
    tensors, or the config is not the one of these weights."""

    tensors: int
    elements: int

    @classmethod
    def of(cls, state: dict[str, torch.Tensor]) -> WeightsExtent:
        return cls(len(state), sum(tensor.numel() for tensor in state.values()))

    def size(self, nullable: bool = False) -> Rule:
        """A channel count or other size: at least 1, at most the elements the weights hold."""
        return Rule(integer=True, low=1, high=max(1, self.elements), nullable=nullable)

    def count(self, low: int = 1) -> Rule:
        """A number of layers or blocks: at most the tensors the weights hold."""
        return Rule(integer=True, low=low, high=max(low, self.tensors))


def _fits(value, kind) -> bool:
    if isinstance(kind, ListOf):
        return isinstance(value, list) and 1 <= len(value) <= kind.most and all(_fits(v, kind.item) for v in value)
    if isinstance(kind, Rule):
        return kind.accepts(value)
    return type(value) is kind  # bool, str: exactly, so that 1 is no bool and True no number


def _described(kind) -> str:
    if isinstance(kind, ListOf):
        return f"a list of 1 to {kind.most} items, each {_described(kind.item)}"
    if isinstance(kind, Rule):
        return kind.describe()
    return {bool: "true or false", str: "a string"}[kind]


def check_values(settings: dict, schema: dict, source: str) -> None:
    """DataError naming the first key of `settings` (a config.json with its defaults filled in) whose value does
    not fit `schema`: {key: a config_check Rule (numbers), bool, str, or ListOf(...)}."""
    for key, kind in schema.items():
        if not _fits(settings[key], kind):
            shown = repr(settings[key])
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise DataError(f"{source}: config.json's {key}={shown} must be {_described(kind)}")


def check_fits_in_memory(size_bytes: int, what: str, source: str) -> None:
    """DataError where `what` would need more memory than this machine has, with the estimate."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if size_bytes > total:
        raise DataError(f"{source}: {what} would need {size_bytes / 2**30:.3g} GiB, more than this machine's "
                        f"{total / 2**30:.3g} GiB: its config.json cannot be the one of these weights")


def check_source_weights(state: dict[str, torch.Tensor], allow_nonfinite: bool, source: str) -> None:
    """DataError where a foreign state dict holds a tensor that is not floating point (converting it would cast it
    silently) or, unless allowed, values that are NaN or infinite."""
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            raise DataError(f"{source}: tensor {name} holds {tensor.dtype} values, not floating-point weights")
        if not allow_nonfinite and not torch.isfinite(tensor).all():
            raise DataError(f"{source}: tensor {name} holds NaN or infinite values; pass import.allow_nonfinite=true "
                            f"to import them anyway")


def import_diffusers(needed_by: str) -> ModuleType:
    """The diffusers package, an optional extra; a ConfigError saying how to install it where it is missing."""
    try:
        import diffusers
    except ImportError:
        raise ConfigError(f"{needed_by} needs the diffusers package: pip install -e '.[bench]' "
                          "(setup.sh installs it)") from None
    return diffusers


def save_diffusers_folder(config: dict, state_dict: dict[str, torch.Tensor], out_dir: str | Path) -> torch.nn.Module:
    """Write a folder that `<config["_class_name"]>.from_pretrained` loads, and return the diffusers model. diffusers
    builds the model from the config and takes every weight strictly, so a name a converter got wrong fails here,
    not in the user's code."""
    model_class = getattr(import_diffusers("export.format=diffusers"), config["_class_name"])
    model = model_class(**{key: value for key, value in config.items() if not key.startswith("_")})
    model.load_state_dict(state_dict, strict=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    return model.eval()


def renamed(name: str, rules) -> str | tuple[str, ...]:
    """The counterpart of parameter `name` under the first rule (pattern, replacement) whose pattern matches it
    whole: one name for a string replacement, several (a tensor split or stacked along dim 0) for a tuple."""
    for pattern, replacement in rules:
        if re.fullmatch(pattern, name):
            if isinstance(replacement, str):
                return re.sub(pattern, replacement, name)
            return tuple(re.sub(pattern, target, name) for target in replacement)
    raise ValueError(f"no counterpart for {name}")
