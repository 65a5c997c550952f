"""Files that appear complete or not at all.

    with atomic_file(path) as file:      # a binary file object
        file.write(...)
    write_atomically(path, text_or_bytes)

The content goes to a hidden temporary file beside `path` (same file system, so the rename is atomic), is flushed to
disk, then renamed over `path`, and the rename itself is flushed with the directory. A crash or an exception at any
point leaves the previous file (or none) under `path`: readers never see half a file. An exception also removes the
temporary; a process killed mid-write leaves it, hidden, for `leftover_temporaries` to find.
Checkpoints, shard archives, latent-cache manifests, FID statistics, sample .npz files and a run's config, result
and markers are all written this way. `json_text` writes results as standard JSON.
"""
from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator


def _temporary_name(path: Path) -> Path:
    """The hidden temporary `atomic_file` writes `path` through (per process, so two writers never share one)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def leftover_temporaries(directory: Path, name_pattern: str) -> Iterator[Path]:
    """The temporaries of files named like `name_pattern` (a glob) in `directory` that writers killed mid-write left
    behind (never read: they have no such name)."""
    return directory.glob(f".{name_pattern}.*.tmp")


@contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file to write; it becomes `path` when the block ends without an exception (see the module)."""
    path = Path(path)
    temporary = _temporary_name(path)
    try:
        with open(temporary, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)  # gone already after the rename; a failed write must not leave it behind
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


def write_atomically(path: str | Path, content: str | bytes) -> None:
    """`content` (text as UTF-8) as the whole of `path`, atomically."""
    with atomic_file(path) as file:
        file.write(content.encode() if isinstance(content, str) else content)


def json_text(data) -> str:
    """`data` as standard JSON (indented, with a final newline) that any parser reads: a non-finite float, such as
    the unbounded side of an interval, is written as null."""
    def finite(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {key: finite(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(item) for item in value]
        return value

    return json.dumps(finite(data), indent=2, allow_nan=False) + "\n"
