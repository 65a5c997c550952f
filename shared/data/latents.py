"""Cached latents for stage 2: the on-disk format (shards, manifest, channel statistics) and the fast loader.

One split of a cache, as `stage2_ldm/cache.py` writes it:

    <cache_dir>/<split>/
        shard_000000/       the data-set indices [k·shard_size, (k+1)·shard_size) of shard k
            mean.npy        (N, 2, C, h, w) posterior mean; axis 1 is the horizontal flip (0 as is, 1 flipped)
            std.npy         (N, 2, C, h, w) posterior standard deviation
            label.npy       (N,) int64
            index.npy       (N,) int64 data-set index of each row (unreadable images have no row)
            moments.npy     (3, C) float64 per-channel sums of mean, mean² and std² over rows, flips and pixels
            shard.json      row count, skipped images, fingerprints, size and sha256 of each file
        stats.json          per-channel mean and std of the latents (LatentStats)
        manifest.json       written last: a split without it is incomplete

A shard is written under a temporary name and renamed when complete, so a directory named `shard_XXXXXX` is never
half-written: a rerun trusts it and skips it. Arrays are plain .npy files so that they load memory-mapped.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shared.data.sampler import ResumableBatchSampler
from shared.errors import DataError
from shared.files import write_atomically

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATS = "stats.json"
SHARD_INFO = "shard.json"
ARRAY_FILES = ("mean.npy", "std.npy", "label.npy", "index.npy", "moments.npy")
DTYPES = ("float32", "float16")


SHARD_NAME = re.compile(r"^shard_\d{6}$")


def shard_name(shard_id: int) -> str:
    return f"shard_{shard_id:06d}"


# ---------------------------------------------------------------------------------------------------------------
# Writing


def _write_file(path: Path, payload: bytes) -> dict:
    """Write and fsync `payload`; its size and sha256 for the manifest."""
    with open(path, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def channel_moments(mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(3, C) float64 sums over every axis but the channel one of mean, mean² and std². mean, std: (N, 2, C, h, w)."""
    mean, std = mean.astype(np.float64), std.astype(np.float64)
    axes = (0, 1, 3, 4)
    return np.stack([mean.sum(axes), np.square(mean).sum(axes), np.square(std).sum(axes)])


def write_shard(split_dir: Path, shard_id: int, *, mean: np.ndarray, std: np.ndarray, label: np.ndarray,
                index: np.ndarray, skipped: int, fingerprint: dict) -> None:
    """Write one complete shard: into a temporary directory first, renamed to `shard_XXXXXX` once every file is on
    disk. A temporary directory left by an interrupted run is removed first.

    mean, std: (N, 2, C, h, w) in the cache dtype; label, index: (N,) int64; fingerprint: what must match for a
    rerun to reuse the shard (tokenizer, data, split, dtype).
    """
    final = split_dir / shard_name(shard_id)
    for leftover in split_dir.glob(f"{shard_name(shard_id)}.tmp*"):
        shutil.rmtree(leftover)
    temporary = split_dir / f"{shard_name(shard_id)}.tmp-{os.getpid()}"
    temporary.mkdir(parents=True)
    files = {}
    if len(index) > 0:  # a shard whose images were all unreadable has no rows and no arrays
        arrays = {"mean.npy": mean, "std.npy": std, "label.npy": label.astype(np.int64),
                  "index.npy": index.astype(np.int64), "moments.npy": channel_moments(mean, std)}
        files = {name: _write_file(temporary / name, _npy_bytes(array)) for name, array in arrays.items()}
    info = {"count": len(index), "skipped": skipped, "fingerprint": fingerprint, "files": files}
    _write_file(temporary / SHARD_INFO, (json.dumps(info, indent=1) + "\n").encode())
    os.rename(temporary, final)


def shard_damage(shard_dir: Path) -> str | None:
    """Why a complete-looking shard folder cannot be trusted (its shard.json unreadable, a file missing or of
    another size than recorded: a truncation, a partial copy), or None. Cheap: no file is read but shard.json."""
    try:
        info = json.loads((shard_dir / SHARD_INFO).read_text())
        files = info["files"] if info["count"] > 0 else {}
        for name in ARRAY_FILES if files or info["count"] > 0 else ():
            size = (shard_dir / name).stat().st_size
            if size != files[name]["bytes"]:
                return f"{name} has {size} bytes, shard.json records {files[name]['bytes']}"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def read_shard_info(shard_dir: Path) -> dict:
    try:
        return json.loads((shard_dir / SHARD_INFO).read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"{shard_dir / SHARD_INFO} is unreadable ({error}); delete {shard_dir} and rerun "
                        f"stage=cache to rewrite it") from error


def write_manifest(split_dir: Path, num_shards: int, header: dict) -> dict:
    """Gather the shards of a split into stats.json and manifest.json (the mark of a complete split).

    header: fingerprints, split, dtype, shard_size, num_classes: copied into the manifest. Returns the manifest.
    """
    missing = [shard_name(k) for k in range(num_shards) if not (split_dir / shard_name(k)).is_dir()]
    if missing:
        raise DataError(f"{split_dir} lacks {len(missing)} shards ({', '.join(missing[:3])}...): a process of "
                        f"stage=cache did not finish; rerun stage=cache to write them")
    shards, latent_shape, moments = [], None, []
    for shard_id in range(num_shards):
        shard_dir = split_dir / shard_name(shard_id)
        info = read_shard_info(shard_dir)
        if info["fingerprint"] != header["fingerprint"]:
            raise DataError(f"{shard_dir} was written with another tokenizer or data set than the rest of "
                            f"{split_dir}; delete it and rerun stage=cache")
        if info["count"] > 0:
            shape = list(np.load(shard_dir / "mean.npy", mmap_mode="r").shape[2:])
            if latent_shape is not None and shape != latent_shape:
                raise DataError(f"{shard_dir} holds latents of shape {shape}, other shards {latent_shape}")
            latent_shape = shape
            moments.append(np.load(shard_dir / "moments.npy"))
        shards.append({"name": shard_name(shard_id), "count": info["count"], "skipped": info["skipped"],
                       "files": info["files"]})
    if latent_shape is None:
        raise DataError(f"every image of {split_dir} was unreadable: nothing was cached")
    stats = LatentStats.from_moments(np.stack(moments), count=sum(s["count"] for s in shards) * 2 *
                                     latent_shape[1] * latent_shape[2])
    write_atomically(split_dir / STATS, json.dumps(stats.to_dict(), indent=1) + "\n")
    manifest = {"format": FORMAT_VERSION, **header, "latent_shape": latent_shape, "shards": shards,
                "total": sum(s["count"] for s in shards), "skipped": sum(s["skipped"] for s in shards)}
    write_atomically(split_dir / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


# ---------------------------------------------------------------------------------------------------------------
# Channel statistics


@dataclass(frozen=True)
class LatentStats:
    """Per-channel mean and std of the latents; stage 2 works on (z - mean_c) / std_c."""

    mean: torch.Tensor  # (C,) float64
    std: torch.Tensor  # (C,) float64

    @classmethod
    def from_moments(cls, shard_moments: np.ndarray, count: int) -> LatentStats:
        """shard_moments: (S, 3, C) float64 per-shard sums; count: elements per channel over all shards.

        The statistics are those of posterior samples z = mean + std·ε, which is what the DiT is trained on, taken
        in closed form: E[z] = E[mean], Var[z] = E[mean²] + E[std²] − E[mean]². Normalising by the spread of the
        means alone would leave samples with variance above one whenever the posterior std is not negligible, and
        the closed form needs no random draws, so the statistics do not depend on a seed. math.fsum adds the
        per-shard sums exactly, so the result does not depend on the order or the number of processes.
        """
        sums = np.array([[math.fsum(shard_moments[:, row, c]) for c in range(shard_moments.shape[2])]
                         for row in range(3)])  # (3, C)
        mean = sums[0] / count
        variance = np.maximum(sums[1] / count + sums[2] / count - mean**2, 0.0)
        return cls(torch.from_numpy(mean), torch.from_numpy(np.sqrt(variance)))

    @classmethod
    def from_dict(cls, values: dict, source: str = "latent statistics") -> LatentStats:
        try:
            mean = torch.tensor(values["channel_mean"], dtype=torch.float64)
            std = torch.tensor(values["channel_std"], dtype=torch.float64)
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(f"{source} has no valid channel_mean / channel_std ({error})") from error
        if mean.shape != std.shape or mean.ndim != 1:
            raise DataError(f"{source}: channel_mean and channel_std must be lists of equal length")
        if not bool((std > 0).all()):
            dead = torch.nonzero(std <= 0).flatten().tolist()
            raise DataError(f"{source}: latent channels {dead} are constant (std 0) and cannot be normalised")
        return cls(mean, std)

    @classmethod
    def load(cls, path: str | Path) -> LatentStats:
        """From a stats.json file, or a split directory of a cache holding one."""
        path = Path(path)
        if path.is_dir():
            path = path / STATS
        try:
            values = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise DataError(f"cannot read latent statistics {path} ({error}); rerun stage=cache") from error
        return cls.from_dict(values, source=str(path))

    def to_dict(self) -> dict:
        """JSON-ready; also what a stage-2 checkpoint stores so that sampling does not need the cache."""
        return {"channel_mean": self.mean.tolist(), "channel_std": self.std.tolist(),
                "of": "posterior samples z = mean + std * eps (closed form)"}

    @property
    def channels(self) -> int:
        return self.mean.numel()

    def _per_channel(self, values: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if z.ndim < 3 or z.shape[-3] != self.channels:
            raise ValueError(f"latents of shape {tuple(z.shape)} do not have {self.channels} channels at dim -3")
        return values.to(device=z.device, dtype=z.dtype).view(-1, 1, 1)  # (C, 1, 1): broadcasts over (B, C, H, W)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self._per_channel(self.mean, z)) / self._per_channel(self.std, z)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z * self._per_channel(self.std, z) + self._per_channel(self.mean, z)


# ---------------------------------------------------------------------------------------------------------------
# Reading


def _sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


class LatentCache:
    """One split of a complete cache, memory-mapped. Its images are addressed by position 0..len-1, in data-set
    order (unreadable images have no position; index.npy maps positions back to data-set indices).

    Opening checks, cheaply, that the manifest exists and that every shard file exists with the size and array
    shape the manifest records; `verify_checksums=True` also hashes every file (slow on large caches: it reads
    them all). A cache of another tokenizer or with another channel count is refused when the caller says what it
    expects.
    """

    def __init__(self, cache_dir: str | Path, split: str, expected_tokenizer_fingerprint: str | None = None,
                 expected_channels: int | None = None, verify_checksums: bool = False):
        self.dir = Path(cache_dir) / split
        manifest_path = self.dir / MANIFEST
        if not manifest_path.is_file():
            raise DataError(f"{manifest_path} does not exist: the latent cache of split {split!r} in {cache_dir} is "
                            f"missing or incomplete; rerun stage=cache (it resumes where it stopped)")
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as error:
            raise DataError(f"{manifest_path} is unreadable ({error}); rerun stage=cache") from error
        if self.manifest.get("format") != FORMAT_VERSION:
            raise DataError(f"{manifest_path} has format {self.manifest.get('format')}, this code reads "
                            f"{FORMAT_VERSION}; rerun stage=cache into a new cache.dir")
        self._check_expectations(expected_tokenizer_fingerprint, expected_channels)
        self.latent_shape = tuple(self.manifest["latent_shape"])  # (C, h, w)

        means, stds, labels, starts = [], [], [], [0]
        for shard in self.manifest["shards"]:
            if shard["count"] == 0:
                continue
            arrays = self._open_shard(shard, verify_checksums)
            means.append(arrays["mean.npy"])
            stds.append(arrays["std.npy"])
            labels.append(np.asarray(arrays["label.npy"]))
            starts.append(starts[-1] + shard["count"])
        self._means, self._stds = means, stds
        self._starts = np.asarray(starts[:-1], dtype=np.int64)  # (S,) first row of each non-empty shard
        self.labels = np.concatenate(labels)  # (N,) int64, small enough to hold in memory

    def _check_expectations(self, fingerprint: str | None, channels: int | None) -> None:
        found = self.manifest["fingerprint"]["tokenizer"]
        if fingerprint is not None and found != fingerprint:
            raise DataError(f"the latent cache {self.dir} was made by another tokenizer (fingerprint {found[:12]}, "
                            f"expected {fingerprint[:12]}): rerun stage=cache with this tokenizer.checkpoint, or "
                            f"point cache.dir at the cache of this tokenizer")
        found_channels = self.manifest["latent_shape"][0]
        if channels is not None and found_channels != channels:
            raise DataError(f"the latent cache {self.dir} has {found_channels} latent channels, the model expects "
                            f"{channels}")

    def _open_shard(self, shard: dict, verify_checksums: bool) -> dict[str, np.ndarray]:
        if not isinstance(shard.get("name"), str) or not SHARD_NAME.match(shard["name"]):
            # The name is joined to the cache folder: "../x" or an absolute path would read files elsewhere.
            raise DataError(f"{self.dir / MANIFEST} names a shard {shard.get('name')!r}, which is not a shard "
                            f"folder name (shard_NNNNNN): the manifest is damaged; rerun stage=cache")
        shard_dir = self.dir / shard["name"]
        count, (c, h, w) = shard["count"], self.manifest["latent_shape"]
        expected_shapes = {"mean.npy": (count, 2, c, h, w), "std.npy": (count, 2, c, h, w), "label.npy": (count,),
                           "index.npy": (count,), "moments.npy": (3, c)}
        arrays = {}
        for name in ARRAY_FILES:
            path, recorded = shard_dir / name, shard["files"][name]
            if not path.is_file():
                raise DataError(f"{path} is missing: the latent cache is damaged; delete {shard_dir} and rerun "
                                f"stage=cache to rewrite it")
            if path.stat().st_size != recorded["bytes"]:
                raise DataError(f"{path} has {path.stat().st_size} bytes, the manifest says {recorded['bytes']}: "
                                f"the file was modified or truncated; delete {shard_dir} and rerun stage=cache")
            if verify_checksums and _sha256_of_file(path) != recorded["sha256"]:
                raise DataError(f"{path} does not match its sha256 checksum in the manifest (verified because "
                                f"verify_checksums is on): delete {shard_dir} and rerun stage=cache")
            try:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except ValueError as error:
                raise DataError(f"{path} is not a readable .npy file ({error}); delete {shard_dir} and rerun "
                                f"stage=cache") from error
            if array.shape != expected_shapes[name]:
                raise DataError(f"{path} has shape {array.shape}, the manifest implies {expected_shapes[name]}")
            arrays[name] = array
        return arrays

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int | None:
        return self.manifest.get("num_classes")

    @property
    def stats(self) -> LatentStats:
        return LatentStats.load(self.dir / STATS)

    def _locate(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Shard and row within it of each position. index: (B,) int64."""
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"latent cache positions must be in [0, {len(self)}), got {index.min()}..{index.max()}")
        shard = np.searchsorted(self._starts, index, side="right") - 1
        return shard, index - self._starts[shard]

    def __getitem__(self, key: tuple[int, bool]) -> dict:
        """key: (position, flip) -> {"mean": (C, h, w), "std": (C, h, w), "label": int}."""
        batch = self.gather([key])
        return {"mean": batch["mean"][0], "std": batch["std"][0], "label": int(batch["label"][0])}

    def gather(self, pairs: Sequence[tuple[int, bool]]) -> dict[str, torch.Tensor]:
        """A batch of (position, flip) pairs -> {"mean": (B, C, h, w) float32, "std": same, "label": (B,) int64}.

        Rows are fetched with one fancy index per shard present in the batch, never per item.
        """
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)  # (B, 2): position, flip
        index, flip = pairs[:, 0], pairs[:, 1]
        shard, row = self._locate(index)
        batch_shape = (len(index), *self.latent_shape)
        mean = np.empty(batch_shape, dtype=self._means[0].dtype)
        std = np.empty(batch_shape, dtype=self._stds[0].dtype)
        by_shard = np.argsort(shard, kind="stable")
        groups = np.split(by_shard, np.flatnonzero(np.diff(shard[by_shard])) + 1)
        for members in groups:
            if members.size == 0:
                continue
            s = shard[members[0]]
            mean[members] = self._means[s][row[members], flip[members]]
            std[members] = self._stds[s][row[members], flip[members]]
        return {"mean": torch.from_numpy(mean).float(), "std": torch.from_numpy(std).float(),
                "label": torch.from_numpy(self.labels[index])}


class LatentLoader:
    """Endless batches of one rank from a LatentCache, in the order of a ResumableBatchSampler.

    The arrays come from memory-mapped shards by fancy indexing, so there are no worker processes: a batch costs
    a few memory copies, far below a DiT step.
    """

    def __init__(self, cache: LatentCache, sampler: ResumableBatchSampler):
        self.cache, self.sampler = cache, sampler
        self._batches = iter(sampler)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.cache.gather(next(self._batches))


def make_latent_loader(cache_dir: str | Path, split: str, batch_size: int, *, seed: int = 0, rank: int = 0,
                       world_size: int = 1, micro_steps: int = 1, start_batch: int = 0, random_flip: bool = True,
                       expected_tokenizer_fingerprint: str | None = None, expected_channels: int | None = None,
                       verify_checksums: bool = False) -> LatentLoader:
    """Infinite iterator of {"mean": (B, C, h, w), "std": (B, C, h, w), "label": (B,) int64} for one rank.

    Batch k is a pure function of (seed, k, rank, world_size, micro_steps), so `start_batch=k` resumes a run
    exactly (shared/data/sampler.py: micro_steps batches of batch_size per rank make one global batch). With
    random_flip, each item's flip is drawn with the order and picks the cached latents of the flipped image.
    """
    cache = LatentCache(cache_dir, split, expected_tokenizer_fingerprint=expected_tokenizer_fingerprint,
                        expected_channels=expected_channels, verify_checksums=verify_checksums)
    if len(cache) < batch_size * world_size * micro_steps:
        raise DataError(f"the latent cache {cache.dir} holds {len(cache)} images, fewer than one global batch "
                        f"({batch_size} x {world_size} processes x {micro_steps} micro-steps)")
    sampler = ResumableBatchSampler(len(cache), batch_size, seed=seed, shuffle=True, random_flip=random_flip,
                                    rank=rank, world_size=world_size, micro_steps=micro_steps,
                                    start_batch=start_batch, infinite=True)
    return LatentLoader(cache, sampler)
