"""Checkpoints that survive a kill at any moment, and that cannot run code when read.

A checkpoint of step N is three files in `<run>/checkpoints/`, each written to a temporary file in the same folder,
fsynced, then renamed over its final name, so a reader sees either the previous complete file or the new complete
file, never half of one:

    step_N.safetensors   the weights: "models.<network>.<parameter>" and "ema.<network>.<parameter>"
    step_N.json          {"step", "config"}: what inference needs beside the weights
    step_N.pt            the training state (step, optimisers, schedulers, RNG, counters, ...): tensors and plain values

The .pt is written last, so its presence marks a complete checkpoint; older checkpoints are deleted only after the
new one is in place. Any failure of the write (a full disk raises RuntimeError from torch.save, not OSError) is one
DataError, and the temporary file is always removed. Inference reads the weights and the JSON only; resuming
assembles the three into the dict that was saved. A checkpoint written before the weights moved out is a single
.pt holding everything (neither a .safetensors nor a .json beside it) and is read as before.

The three files must belong together: the step and a digest of the .json's config are also stored with the weights
(safetensors metadata) and in the training state, and a reader that finds them disagree raises one DataError
(checkpoints written before the digests are read without it). A run folder given as a checkpoint means its newest
checkpoint whose files are there, read and agree: a newer one that does not is skipped with a warning, by every
reader (resume, inference, export).

The .pt holds only tensors and plain values (dicts, lists, tuples, numbers, strings), so every read uses
torch.load(weights_only=True): a file someone shared whose pickle would call a function is refused before anything
in it runs.

A network can also be kept as a weights folder, without training state: `model.safetensors` (its state dict) and
`model.json` ({"network", "step", "config"}). stage=export writes them (pipelines/interop.py); every reader here
takes one wherever it takes a checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import logging
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import safetensors.torch
import torch

from shared.errors import DataError
from shared.files import atomic_file, leftover_temporaries

log = logging.getLogger("epsvae")
STEP_FILE = re.compile(r"^step_(\d{9})\.pt$")
# Checkpoints written before the RNG states were stored as plain values hold numpy's RNG key array. These globals
# only rebuild arrays (numpy's reduce of an ndarray), so allowing them keeps those checkpoints readable without
# allowing code; torch's documentation gives the same list for numpy arrays.
NUMPY_ARRAY_GLOBALS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]


WEIGHTS_FILE = "model.safetensors"
WEIGHTS_CONFIG = "model.json"
# A checkpoint's {network: state_dict} groups, kept in its .safetensors, and the values kept in its .json (the step
# stays in the .pt as well, so that the training state names its step).
WEIGHT_GROUPS = ("models", "ema")
HEADER_KEYS = ("step", "config")
WEIGHTS_SUFFIXES = (".safetensors", ".json")  # the files beside a checkpoint's .pt
# Stored with the weights (safetensors metadata, as text) and in the training state, beside the step: a digest of
# the config in the .json, so that a reader can tell whether the three files belong together.
CONFIG_DIGEST = "config_digest"


def atomic_save(obj, path: Path) -> None:
    """torch.save(obj) to `path`, atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """write(file) as `path`, atomically (shared.files.atomic_file); a failure is one DataError saying what to do."""
    path = Path(path)
    try:
        with atomic_file(path) as file:
            write(file)
    except Exception as error:  # OSError from open/fsync/rename, RuntimeError from torch.save's writer
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0]
        raise DataError(f"could not write checkpoint {path}: {reason}; the previous checkpoint in {path.parent} is "
                        f"kept (free space or fix the folder, then rerun the same command)") from error


def config_digest(config) -> str:
    """sha256 of a stored config as canonical JSON (the same before saving and after reading it back)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def header_fields(header: dict) -> dict[str, str]:
    """The fields that the weights and the training state of a checkpoint with this header store beside it, as the
    text safetensors metadata holds: the step and the config's digest."""
    fields = {CONFIG_DIGEST: config_digest(header.get("config"))}
    if "step" in header:
        fields["step"] = str(header["step"])
    return fields


def check_agreement(label: str, header: dict, stored: dict, where: str) -> None:
    """DataError unless the step and config digest `stored` in `where` (a file of the checkpoint or weights folder
    `label` names) are those of its header. A file written before these were stored has neither, and agrees."""
    for key, expected in header_fields(header).items():
        if key in stored and str(stored[key]) != expected:
            raise DataError(f"{label} does not hold together: {where} records {key} {str(stored[key])[:16]}, "
                            f"its .json {expected[:16]} (a file was edited, or copied from another checkpoint): "
                            f"restore it, or move this checkpoint's files away to use the one before")


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """`tensors` as a .safetensors file with `metadata`, atomically. safetensors refuses tensors that share memory
    (tied weights, or a network and its EMA handed over as the same dict), so every tensor after the first on a
    storage is a copy."""
    stored, seen = {}, set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu()
        storage = tensor.untyped_storage().data_ptr()
        stored[name] = tensor.clone(memory_format=torch.contiguous_format) if storage in seen else tensor.contiguous()
        seen.add(storage)
    atomic_write(path, lambda f: f.write(safetensors.torch.save(stored, metadata=metadata)))


def save_json(path: Path, values: dict) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(values, indent=2).encode() + b"\n"))


def save_weights_folder(directory: str | Path, network: str, state_dict: dict, config: dict, step: int = 0) -> Path:
    """A weights folder: `model.safetensors` (state_dict) and `model.json`; returns the folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    header = {"network": network, "step": step, "config": config}
    save_safetensors(directory / WEIGHTS_FILE, state_dict, header_fields(header))
    save_json(directory / WEIGHTS_CONFIG, header)
    return directory


def save_checkpoint(state: dict, path: Path) -> None:
    """`state` as the weights (step_N.safetensors), the header (step_N.json) and, last, the training state (`path`,
    step_N.pt), so that a .pt is never there without its weights. The weights and the training state also store
    the step and the config's digest (`header_fields`). Network names hold no dot (tensor names split at the first
    two)."""
    header = {key: state[key] for key in HEADER_KEYS if key in state}
    fields = header_fields(header)
    save_safetensors(path.with_suffix(".safetensors"),
                     {f"{group}.{network}.{name}": tensor for group in WEIGHT_GROUPS
                      for network, state_dict in state.get(group, {}).items() for name, tensor in state_dict.items()},
                     fields)
    save_json(path.with_suffix(".json"), header)
    training_state = {key: value for key, value in state.items() if key not in (*WEIGHT_GROUPS, "config")}
    atomic_save({**training_state, CONFIG_DIGEST: fields[CONFIG_DIGEST]}, path)


def is_single_file(path: Path) -> bool:
    """Whether checkpoint `path` is a single .pt holding everything, as written before the weights moved out into a
    .safetensors and a .json (neither is beside it)."""
    return path.suffix != ".safetensors" and not any(path.with_suffix(suffix).exists() for suffix in WEIGHTS_SUFFIXES)


def _read_header(header_path: Path, weights_path: Path, label: str) -> dict:
    """The JSON object at `header_path`, checked against the metadata of the .safetensors at `weights_path` (read
    without its tensors); a missing, unreadable or disagreeing file is one DataError starting with `label`."""
    try:
        header = json.loads(header_path.read_text())
        if not isinstance(header, dict):
            raise ValueError(f"{header_path.name} is not a JSON object")
        with safetensors.safe_open(weights_path, framework="pt") as weights:
            metadata = weights.metadata() or {}
    except (OSError, ValueError, safetensors.SafetensorError) as error:
        raise DataError(f"{label} cannot be read ({type(error).__name__}: {error})") from error
    check_agreement(label, header, metadata, weights_path.name)
    return header


def _read_tensors(weights_path: Path, label: str, device: str = "cpu") -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(weights_path, device=device)
    except (OSError, safetensors.SafetensorError) as error:
        raise DataError(f"{label} cannot be read ({type(error).__name__}: {error})") from error


def read_checkpoint_header(path: Path) -> dict:
    """{"step", "config"} of a checkpoint (`path` is any of its files) from its .json, checked against what its
    .safetensors stores beside the weights; reads no tensor and no pickle."""
    return _read_header(path.with_suffix(".json"), path.with_suffix(".safetensors"), f"checkpoint {path}")


def load_checkpoint_weights(path: Path, device: str = "cpu") -> dict:
    """{"step", "config", "models", "ema"} of a checkpoint from its .safetensors and .json, checked to agree; `path`
    is any of its files. Reads no pickle."""
    checkpoint = read_checkpoint_header(path)
    for key, tensor in _read_tensors(path.with_suffix(".safetensors"), f"checkpoint {path}", device).items():
        parts = key.split(".", 2)
        if len(parts) != 3 or parts[0] not in WEIGHT_GROUPS:
            raise DataError(f"checkpoint {path} holds a tensor {key!r}, not <models|ema>.<network>.<parameter>: it "
                            f"was not written by this toolkit")
        group, network, name = parts
        checkpoint.setdefault(group, {}).setdefault(network, {})[name] = tensor
    return checkpoint


def is_weights_folder(path: Path) -> bool:
    return path.is_dir() and (path / WEIGHTS_CONFIG).is_file()


def load_weights_folder(directory: Path) -> dict:
    """A weights folder as a checkpoint dict: {"step", "config", "models": {network: state_dict}}."""
    label = f"weights folder {directory}"
    header = _read_header(directory / WEIGHTS_CONFIG, directory / WEIGHTS_FILE, label)
    if not {"network", "step", "config"} <= set(header):
        raise DataError(f"{label} cannot be read ({WEIGHTS_CONFIG} lacks network, step or config): export it again "
                        f"with stage=export")
    state_dict = _read_tensors(directory / WEIGHTS_FILE, label)
    return {"step": header["step"], "config": header["config"], "models": {header["network"]: state_dict}}


def check_intact(path: Path) -> Path:
    """`path`, if the header and weights of checkpoint `path` read and agree (without reading a tensor); DataError
    otherwise. A single-file checkpoint has no parts to compare: reading it is its check."""
    if not is_single_file(path):
        read_checkpoint_header(path)
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file (its .pt, or its .safetensors for the weights alone), a weights folder, or the newest
    intact checkpoint (its .pt) of a run folder (`<run>` or `<run>/checkpoints`): newer ones whose files are
    missing, unreadable or disagree are skipped with a warning."""
    path = Path(path)
    if is_weights_folder(path):
        return path
    if path.is_dir():
        for directory in (path / "checkpoints", path):
            newest = CheckpointDir(directory).newest_readable(check_intact)
            if newest is not None:
                return newest
        raise DataError(f"no checkpoint (step_*.pt) in {path} or {path / 'checkpoints'}")
    if not path.is_file():
        raise DataError(f"checkpoint {path} does not exist")
    return path


def safe_torch_load(path: Path, label: str, refused_advice: str, *, allowed_globals=(), map_location="cpu",
                    mmap: bool = False) -> object:
    """torch.load(weights_only=True) of a file from anywhere, also allowing `allowed_globals`: a pickle that would
    call anything else is one DataError naming it (`label` holds ...: `refused_advice`) with nothing in it run, and
    a truncated or foreign file is one DataError too."""
    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:  # what weights_only raises for anything but tensors and plain values
        found = re.search(r"GLOBAL (\S+)", str(error))
        what = f"a reference to {found.group(1)}" if found else "Python objects beyond tensors and plain values"
        raise DataError(f"{label} holds {what}, which a safe load refuses, so nothing in it was run: "
                        f"{refused_advice}") from None
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise DataError(f"{label} cannot be read ({type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else ''})") from error


def load_checkpoint(path: str | Path, map_location="cpu", mmap: bool = False) -> dict:
    """The checkpoint dict that was saved, from a checkpoint file, a weights folder or a run folder (its newest
    checkpoint), read without running any code: the .pt's training state with the weights and header beside it.

    mmap: map the tensors of a single-file checkpoint instead of reading them (cheap when only a few values are
    needed); a .safetensors is mapped anyway.
    """
    path = resolve_checkpoint(path)
    if path.is_dir():
        return load_weights_folder(path)
    device = str(map_location)  # safetensors takes a device's name
    if path.suffix == ".safetensors":
        return load_checkpoint_weights(path, device)  # the weights alone: no training state to add
    weights = None if is_single_file(path) else load_checkpoint_weights(path, device)
    checkpoint = safe_torch_load(path, f"checkpoint {path}", "it was not written by this toolkit. Train with this "
                                 "toolkit, or load the weights with the code that wrote them and save them as tensors",
                                 allowed_globals=NUMPY_ARRAY_GLOBALS, map_location=map_location, mmap=mmap)
    if not isinstance(checkpoint, dict):
        raise DataError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not this toolkit's checkpoint dict")
    if weights is not None:
        check_agreement(f"checkpoint {path}", weights, checkpoint, path.name)
        checkpoint.pop(CONFIG_DIGEST, None)
        checkpoint.update(weights)
    return checkpoint


def load_weights(path: str | Path, mmap: bool = False) -> dict:
    """{"step", "config", "models", and "ema" where kept} of a checkpoint file, weights folder or run folder, for
    inference: the .safetensors and .json alone (the .pt may be gone). A single-file checkpoint written before the
    weights moved out is read whole."""
    path = resolve_checkpoint(path)
    if path.is_dir():
        return load_weights_folder(path)
    if is_single_file(path):
        return load_checkpoint(path, mmap=mmap)
    return load_checkpoint_weights(path)


def refuse_code_in(directory: Path, allowed: frozenset[str]) -> None:
    """DataError if a torch file under `directory` references a global outside `allowed` (and numpy's arrays).

    For files that another library reads with weights_only=False (DeepSpeed's optimiser shards): the pickles are
    scanned, not run, so a file that would call anything else is refused before that library opens it.
    """
    allowed = allowed | {f"{g.__module__}.{g.__qualname__}" for g in NUMPY_ARRAY_GLOBALS}
    for file in sorted(Path(directory).rglob("*.pt")):
        try:
            unexpected = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(file)) - allowed)
        except Exception as error:
            raise DataError(f"checkpoint file {file} cannot be read ({type(error).__name__}: {error})") from error
        if unexpected:
            raise DataError(f"checkpoint file {file} references {', '.join(unexpected)}, which a safe load refuses, "
                            f"so it was not opened: it was not written by this toolkit's training")


class CheckpointDir:
    """`<run>/checkpoints/step_000001000.pt`, ...; keeps the newest `keep`, and those of `keep_steps` (the
    milestones a study of the training budget evaluates) for good."""

    def __init__(self, directory: str | Path, keep: int = 2, keep_steps: tuple[int, ...] = ()):
        self.directory = Path(directory)
        self.keep = max(1, keep)
        self.keep_steps = frozenset(keep_steps)

    def steps(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.directory.iterdir() if (m := STEP_FILE.match(p.name)))

    def path(self, step: int) -> Path:
        return self.directory / f"step_{step:09d}.pt"

    def save(self, state: dict, step: int) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.remove_incomplete()
        path = self.path(step)
        try:
            save_checkpoint(state, path)
        except DataError:
            self.remove_incomplete()  # the weights written before the training state failed
            raise
        for old in (step for step in self.steps()[: -self.keep] if step not in self.keep_steps):
            # The .pt first: the checkpoint stops existing before its weights go.
            for file in (self.path(old), *(self.path(old).with_suffix(suffix) for suffix in WEIGHTS_SUFFIXES)):
                file.unlink(missing_ok=True)
        return path

    def remove_incomplete(self) -> None:
        """Remove what a writer killed mid-write leaves: its temporary file, and the weights and header of a step
        whose .pt never landed. Neither is ever read, and a checkpoint can be gigabytes."""
        for leftover in leftover_temporaries(self.directory, "step_*"):
            leftover.unlink(missing_ok=True)
        for suffix in WEIGHTS_SUFFIXES:
            for part in self.directory.glob(f"step_*{suffix}"):
                if not part.with_suffix(".pt").exists():
                    part.unlink(missing_ok=True)

    def latest(self) -> Path | None:
        return self.path(self.steps()[-1]) if self.steps() else None

    def newest_readable(self, read: Callable[[Path], object]):
        """read(path) of the newest checkpoint it reads without a DataError; a newer one that fails (a full disk, a
        deleted or edited file) is reported and skipped. None when there is none; a DataError when there are some
        and none reads, since starting over from step 0 would silently throw the run away."""
        problems = []
        for step in reversed(self.steps()):
            try:
                return read(self.path(step))
            except DataError as error:
                log.warning("skipping unreadable checkpoint: %s", error)
                problems.append(str(error))
        if problems:
            raise DataError(f"none of the {len(problems)} checkpoints in {self.directory} can be read (newest: "
                            f"{problems[0]}); move them out of the folder to train this run from step 0, or use a "
                            f"new name=...")
        return None

    def load_latest(self, map_location="cpu") -> dict | None:
        """The newest checkpoint that reads, whole (`newest_readable`)."""
        return self.newest_readable(lambda path: load_checkpoint(path, map_location))


def load_model_state(path: str | Path, name: str, use_ema: bool = True) -> tuple[dict, dict]:
    """(state_dict, model config) of network `name`, without optimiser or training state.

    The EMA weights are returned when present and asked for.
    """
    return network_state(load_weights(path), name, use_ema, path)


def network_state(checkpoint: dict, name: str, use_ema: bool, path: str | Path) -> tuple[dict, dict]:
    """(state_dict, model config) of network `name` in a checkpoint dict read from `path` (for the error message):
    its EMA weights when present and asked for."""
    models = checkpoint.get("models", {})
    source = checkpoint["ema"] if use_ema and name in checkpoint.get("ema", {}) else models
    if name not in source:
        raise DataError(f"checkpoint {path} has no network {name!r} (it has {sorted(models)})")
    return source[name], checkpoint.get("config", {})


def fit_weights(network: torch.nn.Module, state_dict: dict, path: str | Path) -> None:
    """Load `state_dict` from the checkpoint `path` into `network`, built from the config stored beside it. Weights
    that do not fit (a checkpoint from before the config digests whose .json was edited, or whose files come from
    two checkpoints) are one DataError, not load_state_dict's RuntimeError of missing keys and shapes."""
    try:
        network.load_state_dict(state_dict)
    except RuntimeError as error:
        detail = str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else str(error)
        raise DataError(f"checkpoint {path} does not hold together: its weights do not fit the network its config "
                        f"describes ({detail}); restore its files or use another checkpoint") from None

