"""shared/files.py: a file written atomically is the old one or the whole new one, and leaves no temporary."""
from __future__ import annotations

import pytest

from shared.files import atomic_file, write_atomically


def test_a_write_replaces_the_whole_file_and_leaves_nothing_else(tmp_path):
    path = tmp_path / "result.json"
    write_atomically(path, "old\n")
    write_atomically(path, b"new\n")
    assert path.read_text() == "new\n"
    assert [entry.name for entry in tmp_path.iterdir()] == ["result.json"]


def test_a_write_that_fails_halfway_keeps_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "shard.tar"
    write_atomically(path, "complete\n")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_file(path) as file:
            file.write(b"half of a new")
            file.flush()
            raise RuntimeError("disk full")
    assert path.read_text() == "complete\n"
    assert [entry.name for entry in tmp_path.iterdir()] == ["shard.tar"]


def test_a_failed_first_write_leaves_no_file(tmp_path):
    with pytest.raises(ValueError):
        with atomic_file(tmp_path / "stats.npz") as file:
            file.write(b"partial")
            raise ValueError("interrupted")
    assert list(tmp_path.iterdir()) == []
