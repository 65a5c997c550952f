"""Checkpoints that survive a kill at any moment.

A checkpoint is written to a temporary file in the same folder, fsynced, then renamed over its final name, so a
reader sees either the previous complete file or the new complete file, never half of one. The previous checkpoint
is deleted only after the new one is in place.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch

from shared.errors import DataError

log = logging.getLogger("epsvae")
STEP_FILE = re.compile(r"^step_(\d{9})\.pt$")


def atomic_save(obj, path: Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise DataError(f"could not write checkpoint {path}: {error.strerror or error}; the previous checkpoint "
                        f"in {path.parent} is kept") from error
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or the newest checkpoint of a run folder (`<run>` or `<run>/checkpoints`)."""
    path = Path(path)
    if path.is_dir():
        for directory in (path / "checkpoints", path):
            newest = CheckpointDir(directory).latest()
            if newest is not None:
                return newest
        raise DataError(f"no checkpoint (step_*.pt) in {path} or {path / 'checkpoints'}")
    if not path.is_file():
        raise DataError(f"checkpoint {path} does not exist")
    return path


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """A checkpoint dict from a file or a run folder (its newest checkpoint)."""
    path = resolve_checkpoint(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise DataError(f"checkpoint {path} cannot be read ({type(error).__name__}: {error})") from error


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
        """The newest checkpoint that reads; an unreadable newer one (e.g. a full disk) is reported and skipped."""
        for step in reversed(self.steps()):
            try:
                return load_checkpoint(self.path(step), map_location)
            except DataError as error:
                log.warning("skipping unreadable checkpoint: %s", error)
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
