"""stage=cache: encode a data set once into latent shards (each image and its horizontal flip) + channel statistics.

    python pipelines/run.py stage=cache tokenizer.checkpoint=outputs/tokenizer/RUN data=imagefolder ...

Shard k holds the data-set indices [k·shard_size, (k+1)·shard_size); with several processes, rank r encodes the
shards k ≡ r (mod world_size). Finished shards are never re-encoded, so an interrupted run resumes by running it
again. When every shard exists, rank 0 writes stats.json and manifest.json (format: shared/data/latents.py), so
on several nodes cache.dir must be on a file system that every node sees.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from shared.data.latents import DTYPES, MANIFEST, read_shard_info, shard_damage, shard_name, write_manifest, write_shard
from shared.errors import ConfigError, DataError
from shared.preemption import Preempted, PreemptionFlag, leave_signals_to_the_main_process
from shared.train.checkpoint import load_weights, resolve_checkpoint

log = logging.getLogger("epsvae")

# Data keys that do not change the pixels of an un-flipped image: a cache stays valid when they change.
DATA_KEYS_WITHOUT_EFFECT = ("num_workers", "random_flip", "shuffle_buffer")
# Leading elements of each weight tensor that go into a tokenizer fingerprint: two checkpoints of different runs or
# steps differ in practically every weight, so a prefix identifies them without reading gigabytes.
FINGERPRINT_ELEMENTS = 1024


def tokenizer_fingerprint(checkpoint_path: str | Path, use_ema: bool = True) -> str:
    """sha256 of a tokenizer checkpoint's config, step, weight set (EMA or not) and the leading elements of each
    weight tensor of its "tokenizer" network: the weights alone, so the same in either checkpoint layout (a
    single-file checkpoint is memory-mapped, so only those prefixes are read from it; a .safetensors is read whole).
    checkpoint_path: a checkpoint file or a run folder (its newest checkpoint), as load_tokenizer takes."""
    path = resolve_checkpoint(checkpoint_path)
    checkpoint = load_weights(path, mmap=True)
    weight_set = "ema" if use_ema and "tokenizer" in checkpoint.get("ema", {}) else "models"
    state = checkpoint.get(weight_set, {}).get("tokenizer")
    if state is None or "config" not in checkpoint or "step" not in checkpoint:
        raise DataError(f"{path} is not a tokenizer checkpoint of this project (it needs 'step', 'config' and a "
                        f"'tokenizer' network)")
    digest = hashlib.sha256(json.dumps({"config": checkpoint["config"], "step": checkpoint["step"],
                                        "weights": weight_set}, sort_keys=True, default=str).encode())
    for key, tensor in sorted(state.items()):
        digest.update(f"{key}{tuple(tensor.shape)}{tensor.dtype}".encode())
        prefix = tensor.detach().flatten()[:FINGERPRINT_ELEMENTS].contiguous()
        digest.update(prefix.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def data_fingerprint(data_cfg: DictConfig | Mapping, split: str, num_images: int) -> str:
    """sha256 of the data config (without keys that leave the images unchanged), the split and its size."""
    values = OmegaConf.to_container(data_cfg, resolve=True) if isinstance(data_cfg, DictConfig) else dict(data_cfg)
    values = {key: value for key, value in values.items() if key not in DATA_KEYS_WITHOUT_EFFECT}
    payload = json.dumps({"data": values, "split": split, "num_images": num_images}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


class _IndexedImages(Dataset):
    """Un-flipped items with their data-set index, so that a batch knows which of its images were readable."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, dict | None]:
        return index, self.dataset[(index, False)]


def _collate_readable(items: list[tuple[int, dict | None]]) -> dict:
    """{"index": (B,) int64, "image": (B, 3, H, W) or None, "label": (B,) int64, "skipped": int}; B readable."""
    kept = [(index, item) for index, item in items if item is not None]
    return {"index": torch.tensor([index for index, _ in kept], dtype=torch.int64),
            "image": torch.stack([item["image"] for _, item in kept]) if kept else None,
            "label": torch.tensor([item["label"] for _, item in kept], dtype=torch.int64),
            "skipped": len(items) - len(kept)}


@torch.inference_mode()
def encode_with_flip(tokenizer: torch.nn.Module, images: torch.Tensor, device: torch.device,
                     autocast: Callable = contextlib.nullcontext) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of each image and of its mirror image: (B, 2, C, h, w) float32 each, on the CPU.

    images: (B, 3, H, W) in [-1, 1]. Both views go through the encoder as one batch of 2B.
    """
    images = images.to(device, non_blocking=True)
    with autocast():
        posterior = tokenizer.encode(torch.cat([images, images.flip(-1)]))  # (2B, C, h, w)

    def by_image(values: torch.Tensor) -> torch.Tensor:
        return values.float().unflatten(0, (2, -1)).transpose(0, 1).cpu()  # (2B, ...) -> (B, 2, ...)

    return by_image(posterior.mean), by_image(posterior.std)


def _pending_shards(split_dir: Path, shards: list[int], fingerprint: dict) -> list[int]:
    """The shards among `shards` not yet complete; complete ones must come from the same tokenizer and data. A
    damaged shard (truncated file, unreadable shard.json) is removed and counts as not yet written."""
    pending = []
    for shard_id in shards:
        shard_dir = split_dir / shard_name(shard_id)
        damage = shard_damage(shard_dir) if shard_dir.is_dir() else None
        if damage is not None:
            log.warning("cache %s: %s is damaged (%s); writing it again", split_dir.name, shard_dir.name, damage)
            shutil.rmtree(shard_dir)
        if not shard_dir.is_dir():
            pending.append(shard_id)
        elif read_shard_info(shard_dir)["fingerprint"] != fingerprint:
            raise DataError(f"{shard_dir} holds latents of another tokenizer, data set or dtype than this run: "
                            f"choose another cache.dir or delete {split_dir.parent}")
    return pending


def cache_latents(tokenizer: torch.nn.Module, data_cfg: DictConfig | Mapping, split: str, out_dir: str | Path, *,
                  shard_size: int, batch_size: int, device: torch.device, autocast: Callable = contextlib.nullcontext,
                  rank: int = 0, world_size: int = 1, tokenizer_fingerprint: str, progress: bool = True,
                  barrier: Callable[[], None] | None = None, dtype: str = "float32", dataset=None) -> Path:
    """Encode `split` of the data into `out_dir/<split>/`; returns that directory.

    Every process calls this with its rank; `barrier` (e.g. Runtime.barrier) lets rank 0 write the manifest only
    once all shards exist. Without a barrier, rank 0 writes it when it is done and fails if a shard is missing.
    dataset: the map-style image data set to encode (default: build_image_dataset(data_cfg, split)).
    batch_size counts images: each goes through the encoder with its flip, so the encoder sees 2·batch_size.
    """
    data_cfg = data_cfg if isinstance(data_cfg, DictConfig) else OmegaConf.create(dict(data_cfg))
    if dtype not in DTYPES:
        raise ConfigError(f"cache.dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    if shard_size <= 0 or batch_size <= 0:
        raise ConfigError(f"cache.shard_size ({shard_size}) and cache.batch_size ({batch_size}) must be positive")
    if dataset is None:
        if data_cfg.get("kind") == "webdataset":
            raise ConfigError("stage=cache needs random access to the images and data.kind=webdataset is a stream: "
                              "cache from the image folder the shards were made from (data=imagefolder data.root=...)")
        from shared.data.images import build_image_dataset

        dataset = build_image_dataset(data_cfg, split)
    num_images = len(dataset)
    if num_images == 0:
        raise DataError(f"split {split!r} of the data has no images to cache")

    split_dir = Path(out_dir) / split
    split_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = {"tokenizer": tokenizer_fingerprint, "data": data_fingerprint(data_cfg, split, num_images),
                   "split": split, "shard_size": shard_size, "dtype": dtype}
    num_shards = -(-num_images // shard_size)
    mine = list(range(rank, num_shards, world_size))
    pending = _pending_shards(split_dir, mine, fingerprint)
    log.info("cache %s: %d images in %d shards; rank %d has %d shards, %d already done", split, num_images,
             num_shards, rank, len(mine), len(mine) - len(pending))

    if pending:
        _encode_shards(tokenizer, dataset, split_dir, pending, fingerprint, shard_size=shard_size,
                       batch_size=batch_size, device=device, autocast=autocast, dtype=dtype,
                       num_workers=int(data_cfg.get("num_workers", 0)), progress=progress and rank == 0)
    if barrier is not None:
        barrier()
    if rank == 0:
        header = {"fingerprint": fingerprint, "split": split, "dtype": dtype, "shard_size": shard_size,
                  "num_classes": getattr(dataset, "num_classes", None)}
        manifest = write_manifest(split_dir, num_shards, header)
        log.info("cache %s: %d images (%d unreadable skipped), latents %s, in %s", split, manifest["total"],
                 manifest["skipped"], manifest["latent_shape"], split_dir)
    if barrier is not None:
        barrier()  # no rank goes on to read the cache before the manifest exists
    return split_dir


def _encode_shards(tokenizer: torch.nn.Module, dataset, split_dir: Path, shards: list[int], fingerprint: dict, *,
                   shard_size: int, batch_size: int, device: torch.device, autocast: Callable, dtype: str,
                   num_workers: int, progress: bool) -> None:
    """Encode and write `shards`, one after the other, from one DataLoader (its workers live across shards)."""
    num_images = len(dataset)
    shard_ranges = {k: range(k * shard_size, min((k + 1) * shard_size, num_images)) for k in shards}
    # Batches never straddle two shards, so a shard's latents do not depend on which shards are encoded with it.
    batches_of = {k: [list(r[i : i + batch_size]) for i in range(0, len(r), batch_size)] for k, r in shard_ranges.items()}
    loader = DataLoader(_IndexedImages(dataset), batch_sampler=[b for k in shards for b in batches_of[k]],
                        num_workers=num_workers, collate_fn=_collate_readable,
                        worker_init_fn=leave_signals_to_the_main_process,
                        pin_memory=torch.device(device).type == "cuda")
    batches = iter(loader)
    tokenizer.eval()
    with PreemptionFlag() as preemption, tqdm(total=sum(len(r) for r in shard_ranges.values()), unit="img", desc=f"cache {split_dir.name}",
              disable=not progress, smoothing=0.1) as bar:
        for shard_id in shards:
            means, stds, labels, indices, skipped = [], [], [], [], 0
            for _ in batches_of[shard_id]:
                batch = next(batches)
                skipped += batch["skipped"]
                if batch["image"] is not None:
                    mean, std = encode_with_flip(tokenizer, batch["image"], device, autocast)
                    means.append(mean.numpy().astype(dtype))
                    stds.append(std.numpy().astype(dtype))
                    labels.append(batch["label"].numpy())
                    indices.append(batch["index"].numpy())
                bar.update(len(batch["index"]) + batch["skipped"])
            if skipped:
                log.warning("cache %s: %d unreadable images skipped in %s", split_dir.name, skipped, shard_name(shard_id))
            write_shard(split_dir, shard_id, mean=_concatenate(means), std=_concatenate(stds),
                        label=_concatenate(labels), index=_concatenate(indices), skipped=skipped,
                        fingerprint=fingerprint)
            if preemption.signal_name:
                raise Preempted(f"received {preemption.signal_name}: shards up to {shard_name(shard_id)} are "
                                f"written in {split_dir}; rerun the same command to encode the rest")


def _concatenate(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.empty(0)


def cache_to_folder(cfg: DictConfig, tokenizer_checkpoint: str | Path, out_dir: str | Path,
                    splits: list[str]) -> dict:
    """Encode `splits` of cfg.data with the tokenizer at `tokenizer_checkpoint` into `out_dir`; returns the stage's
    result: the folder and, for every split it holds, its size and latent shape."""
    from shared.runtime import setup
    from stage1_tokenizer.tokenizer import load_tokenizer

    if not splits:
        raise ConfigError("cache.splits is empty: name the splits to cache, e.g. cache.splits=[train]")
    use_ema = bool(cfg.decode.use_ema)
    tokenizer_checkpoint = resolve_checkpoint(tokenizer_checkpoint)
    fingerprint = tokenizer_fingerprint(tokenizer_checkpoint, use_ema=use_ema)
    with setup(cfg, run_dir=out_dir) as runtime:
        tokenizer = load_tokenizer(tokenizer_checkpoint, runtime.device, use_ema=use_ema)
        for split in splits:
            cache_latents(tokenizer, cfg.data, split, out_dir, shard_size=int(cfg.cache.shard_size),
                          batch_size=int(cfg.cache.batch_size), device=runtime.device, autocast=runtime.autocast,
                          rank=runtime.rank, world_size=runtime.world_size, tokenizer_fingerprint=fingerprint,
                          progress=bool(cfg.progress), barrier=runtime.barrier,
                          dtype=str(cfg.cache.get("dtype", "float32")))
        # Every split the folder holds, also those an earlier run cached: the folder is what later stages read.
        manifests = {path.parent.name: json.loads(path.read_text())
                     for path in sorted(Path(out_dir).glob(f"*/{MANIFEST}"))}
        return runtime.finish({
            "dir": str(out_dir), "tokenizer_checkpoint": str(tokenizer_checkpoint),
            "tokenizer_fingerprint": fingerprint,
            "splits": {split: {key: manifest[key] for key in ("total", "skipped", "latent_shape")}
                       for split, manifest in manifests.items()}})


def main(cfg: DictConfig) -> dict:
    checkpoint = cfg.tokenizer.get("checkpoint")
    if not checkpoint:
        raise ConfigError("tokenizer.checkpoint is null: stage=cache encodes with a trained tokenizer; set "
                          "tokenizer.checkpoint=<run folder of stage=tokenizer, or a checkpoint file>")
    return cache_to_folder(cfg, checkpoint, cfg.cache.dir, list(cfg.cache.splits))
