"""Checkpoints that survive a kill at any moment, and that cannot run code when read.

A checkpoint is written to a temporary file in the same folder, fsynced, then renamed over its final name, so a
reader sees either the previous complete file or the new complete file, never half of one. The previous checkpoint
is deleted only after the new one is in place. Any failure of the write (a full disk raises RuntimeError from
torch.save, not OSError) is one DataError, and the temporary file is always removed.

A checkpoint holds only tensors and plain values (dicts, lists, tuples, numbers, strings), so every read uses
torch.load(weights_only=True): a file someone shared whose pickle would call a function is refused before anything
in it runs.

A network can also be kept as a weights folder, without training state and without pickle: `model.safetensors` (its
state dict) and `model.json` ({"network", "step", "config"}). stage=export writes them (pipelines/interop.py);
every reader here takes one wherever it takes a checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import safetensors.torch
import torch

from shared.errors import DataError

log = logging.getLogger("epsvae")
STEP_FILE = re.compile(r"^step_(\d{9})\.pt$")
# Checkpoints written before the RNG states were stored as plain values hold numpy's RNG key array. These globals
# only rebuild arrays (numpy's reduce of an ndarray), so allowing them keeps those checkpoints readable without
# allowing code; torch's documentation gives the same list for numpy arrays.
NUMPY_ARRAY_GLOBALS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]


WEIGHTS_FILE = "model.safetensors"
WEIGHTS_CONFIG = "model.json"


def atomic_save(obj, path: Path) -> None:
    """torch.save(obj) to `path`, atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """write(file) into a temporary file beside `path`, fsynced, then renamed to `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as error:  # OSError from open/fsync/rename, RuntimeError from torch.save's writer
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0]
        raise DataError(f"could not write checkpoint {path}: {reason}; the previous checkpoint in {path.parent} is "
                        f"kept (free space or fix the folder, then rerun the same command)") from error
    finally:
        tmp.unlink(missing_ok=True)  # gone already after the rename; a failed write must not leave it behind
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


def save_weights_folder(directory: str | Path, network: str, state_dict: dict, config: dict, step: int = 0) -> Path:
    """A weights folder: `model.safetensors` (state_dict) and `model.json`; returns the folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state_dict.items()}
    atomic_write(directory / WEIGHTS_FILE, lambda f: f.write(safetensors.torch.save(tensors)))
    header = {"network": network, "step": step, "config": config}
    atomic_write(directory / WEIGHTS_CONFIG, lambda f: f.write(json.dumps(header, indent=2).encode() + b"\n"))
    return directory


def is_weights_folder(path: Path) -> bool:
    return path.is_dir() and (path / WEIGHTS_CONFIG).is_file()


def load_weights_folder(directory: Path) -> dict:
    """A weights folder as a checkpoint dict: {"step", "config", "models": {network: state_dict}}."""
    try:
        header = json.loads((directory / WEIGHTS_CONFIG).read_text())
        state_dict = safetensors.torch.load_file(directory / WEIGHTS_FILE)
        return {"step": header["step"], "config": header["config"], "models": {header["network"]: state_dict}}
    except (OSError, ValueError, KeyError, TypeError, safetensors.SafetensorError) as error:
        raise DataError(f"weights folder {directory} cannot be read ({type(error).__name__}: {error}); export it "
                        f"again with stage=export") from error


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, a weights folder, or the newest checkpoint of a run folder (`<run>` or
    `<run>/checkpoints`)."""
    path = Path(path)
    if is_weights_folder(path):
        return path
    if path.is_dir():
        for directory in (path / "checkpoints", path):
            newest = CheckpointDir(directory).latest()
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
    """A checkpoint dict from a file, a weights folder or a run folder (its newest checkpoint), read without running
    any code.

    mmap: map the tensors from the file instead of reading them (cheap when only a few values are needed).
    """
    path = resolve_checkpoint(path)
    if path.is_dir():
        return load_weights_folder(path)
    checkpoint = safe_torch_load(path, f"checkpoint {path}", "it was not written by this toolkit. Train with this "
                                 "toolkit, or load the weights with the code that wrote them and save them as tensors",
                                 allowed_globals=NUMPY_ARRAY_GLOBALS, map_location=map_location, mmap=mmap)
    if not isinstance(checkpoint, dict):
        raise DataError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not this toolkit's checkpoint dict")
    return checkpoint


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
    """`<run>/checkpoints/step_000001000.pt`, ...; keeps the newest `keep`."""

    def __init__(self, directory: str | Path, keep: int = 2):
        self.directory = Path(directory)
        self.keep = max(1, keep)

    def steps(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.directory.iterdir() if (m := STEP_FILE.match(p.name)))

    def path(self, step: int) -> Path:
        return self.directory / f"step_{step:09d}.pt"

    def save(self, state: dict, step: int) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        # A writer killed mid-write leaves its temporary file (never read: it has no step_*.pt name); a
        # checkpoint can be gigabytes, so the next save removes it.
        for leftover in self.directory.glob(".step_*.pt.*.tmp"):
            leftover.unlink(missing_ok=True)
        path = self.path(step)
        atomic_save(state, path)
        for old in self.steps()[: -self.keep]:
            self.path(old).unlink(missing_ok=True)
        return path

    def latest(self) -> Path | None:
        return self.path(self.steps()[-1]) if self.steps() else None

    def load_latest(self, map_location="cpu") -> dict | None:
        """The newest checkpoint that reads; an unreadable newer one (e.g. a full disk) is reported and skipped.
        None when there is none; a DataError when there are some and none reads, since starting over from step 0
        would silently throw the run away."""
        problems = []
        for step in reversed(self.steps()):
            try:
                return load_checkpoint(self.path(step), map_location)
            except DataError as error:
                log.warning("skipping unreadable checkpoint: %s", error)
                problems.append(str(error))
        if problems:
            raise DataError(f"none of the {len(problems)} checkpoints in {self.directory} can be read (newest: "
                            f"{problems[0]}); move them out of the folder to train this run from step 0, or use a "
                            f"new name=...")
        return None


def load_model_state(path: str | Path, name: str, use_ema: bool = True) -> tuple[dict, dict]:
    """(state_dict, model config) of network `name`, without optimiser or training state.

    The EMA weights are returned when present and asked for.
    """
    checkpoint = load_checkpoint(path)
    source = checkpoint.get("ema", {}) if use_ema and name in checkpoint.get("ema", {}) else checkpoint["models"]
    if name not in source:
        raise DataError(f"checkpoint {path} has no network {name!r} (it has {sorted(checkpoint['models'])})")
    return source[name], checkpoint.get("config", {})
