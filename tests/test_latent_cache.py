"""The latent cache (stage2_ldm/cache.py) and its loader (shared/data/latents.py), with a tiny stand-in tokenizer."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from shared.data.images import build_image_dataset
from shared.data.latents import LatentCache, LatentStats, make_latent_loader
from shared.errors import ConfigError, DataError
from shared.train.checkpoint import CheckpointDir
from stage2_ldm.cache import cache_latents, tokenizer_fingerprint

DATA = {"kind": "synthetic", "resolution": 16, "num_classes": 5, "train_size": 22, "val_size": 8, "seed": 0,
        "num_workers": 0}
SHARD_SIZE, BATCH_SIZE = 8, 3  # 22 images: shards of 8, 8, 6, each in batches of 3 (the last one short)
CHANNELS = 4


class StandInTokenizer(torch.nn.Module):
    """Downsample 4x, then fixed random 3x3 convolutions: mean, and softplus(.) as std. Counts encoder calls and
    can fail on a chosen call to simulate a crash."""

    def __init__(self, fail_on_call: int | None = None):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.to_mean = torch.nn.Conv2d(3, CHANNELS, 3, padding=1)
        self.to_std = torch.nn.Conv2d(3, CHANNELS, 3, padding=1)
        for conv in (self.to_mean, self.to_std):
            conv.weight.data = torch.randn(conv.weight.shape, generator=generator)
            conv.bias.data = torch.randn(conv.bias.shape, generator=generator)
        self.latent_channels, self.downsample = CHANNELS, 4
        self.calls, self.fail_on_call = 0, fail_on_call

    def encode(self, images: torch.Tensor) -> SimpleNamespace:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("simulated crash")
        pooled = F.avg_pool2d(images, self.downsample)
        return SimpleNamespace(mean=self.to_mean(pooled), std=F.softplus(self.to_std(pooled)))


class WithUnreadable(torch.utils.data.Dataset):
    """A data set whose items at `bad` indices are unreadable (None), as the image data sets report them."""

    def __init__(self, dataset, bad: set[int]):
        self.dataset, self.bad, self.num_classes = dataset, bad, dataset.num_classes

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        return None if key[0] in self.bad else self.dataset[key]


def run_cache(out_dir: Path, tokenizer=None, **options) -> Path:
    settings = {"shard_size": SHARD_SIZE, "batch_size": BATCH_SIZE, "device": torch.device("cpu"),
                "tokenizer_fingerprint": "tok-a", "progress": False, **options}
    return cache_latents(tokenizer or StandInTokenizer(), DATA, "train", out_dir, **settings)


def manifest(split_dir: Path) -> dict:
    return json.loads((split_dir / "manifest.json").read_text())


@pytest.fixture(scope="module")
def cached(tmp_path_factory) -> Path:
    """A complete one-process cache of the train split: the reference the other tests compare with."""
    out_dir = tmp_path_factory.mktemp("reference")
    run_cache(out_dir)
    return out_dir


def test_cache_holds_the_encodings_of_each_image_and_its_flip(cached):
    dataset = build_image_dataset(DATA, "train")
    cache = LatentCache(cached, "train", verify_checksums=True)
    assert len(cache) == len(dataset) == manifest(cached / "train")["total"]
    assert cache.latent_shape == (CHANNELS, 4, 4) and cache.num_classes == DATA["num_classes"]
    tokenizer = StandInTokenizer()
    for index in (0, 9, len(dataset) - 1):
        for flip in (False, True):
            item = dataset[(index, flip)]
            with torch.no_grad():
                posterior = tokenizer.encode(item["image"][None])
            latent = cache[(index, flip)]
            torch.testing.assert_close(latent["mean"], posterior.mean[0])
            torch.testing.assert_close(latent["std"], posterior.std[0])
            assert latent["label"] == item["label"]


def test_gather_equals_item_by_item_access_across_shards(cached):
    cache = LatentCache(cached, "train")
    pairs = [(21, True), (0, False), (8, True), (15, False), (3, True), (16, True)]
    batch = cache.gather(pairs)
    assert batch["mean"].shape == (6, CHANNELS, 4, 4) and batch["label"].dtype == torch.int64
    for row, pair in enumerate(pairs):
        item = cache[pair]
        torch.testing.assert_close(batch["mean"][row], item["mean"])
        torch.testing.assert_close(batch["std"][row], item["std"])
        assert batch["label"][row] == item["label"]
    assert not torch.equal(cache[(5, False)]["mean"], cache[(5, True)]["mean"])


def test_interrupted_cache_resumes_without_re_encoding_finished_shards(cached, tmp_path):
    crashing = StandInTokenizer(fail_on_call=5)  # shard 0 takes 3 calls, so this dies inside shard 1
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_cache(tmp_path, crashing)
    split_dir = tmp_path / "train"
    assert (split_dir / "shard_000000").is_dir() and not (split_dir / "shard_000001").exists()
    with pytest.raises(DataError, match="rerun stage=cache"):
        LatentCache(tmp_path, "train")

    resumed = StandInTokenizer()
    run_cache(tmp_path, resumed)
    assert resumed.calls == 3 + 2  # shard 1 (8 images) and shard 2 (6 images) in batches of 3; shard 0 skipped
    assert manifest(split_dir)["shards"] == manifest(cached / "train")["shards"]

    again = StandInTokenizer()
    run_cache(tmp_path, again)
    assert again.calls == 0


def test_leftover_temporary_shard_is_ignored_and_rewritten(cached, tmp_path):
    leftover = tmp_path / "train" / "shard_000001.tmp-12345"
    leftover.mkdir(parents=True)
    (leftover / "mean.npy").write_bytes(b"half-written")
    run_cache(tmp_path)
    assert not leftover.exists()
    assert manifest(tmp_path / "train")["shards"] == manifest(cached / "train")["shards"]


def test_two_ranks_write_the_same_cache_as_one(cached, tmp_path):
    for rank in (1, 0):  # rank 0 last: it writes the manifest once every shard exists
        tokenizer = StandInTokenizer()
        run_cache(tmp_path, tokenizer, rank=rank, world_size=2)
        assert tokenizer.calls == {0: 3 + 2, 1: 3}[rank]  # rank 0: shards 0 and 2, rank 1: shard 1
    one_rank, two_ranks = manifest(cached / "train"), manifest(tmp_path / "train")
    assert two_ranks == one_rank
    assert (tmp_path / "train" / "stats.json").read_text() == (cached / "train" / "stats.json").read_text()


def test_manifest_waits_for_missing_shards_of_other_ranks(tmp_path):
    with pytest.raises(DataError, match="lacks 1 shards"):
        run_cache(tmp_path, rank=0, world_size=2)


def test_stats_normalise_posterior_samples_to_zero_mean_unit_std(cached):
    cache = LatentCache(cached, "train")
    stats = cache.stats
    everything = cache.gather([(i, flip) for i in range(len(cache)) for flip in (False, True)])
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([everything["mean"] + everything["std"] * torch.randn(everything["std"].shape,
                                                                             generator=generator)
                         for _ in range(50)]).flatten(0, 1)  # (50·2N, C, h, w) posterior samples
    normalized = stats.normalize(draws)
    per_channel = normalized.transpose(0, 1).flatten(1)  # (C, everything)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(CHANNELS), atol=0.03, rtol=0)
    torch.testing.assert_close(per_channel.std(1), torch.ones(CHANNELS), atol=0.03, rtol=0)
    # The means alone spread less than the samples: normalising them would not give unit variance.
    assert (stats.normalize(everything["mean"]).transpose(0, 1).flatten(1).std(1) < 0.97).all()


def test_normalize_round_trip_follows_device_and_dtype(cached):
    stats = LatentStats.load(cached / "train")
    z = torch.randn(3, CHANNELS, 4, 4, dtype=torch.bfloat16)
    normalized = stats.normalize(z)
    assert normalized.dtype == torch.bfloat16
    z = torch.randn(3, CHANNELS, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(stats.denormalize(stats.normalize(z)), z)
    torch.testing.assert_close(stats.normalize(z)[:, 1], (z[:, 1] - stats.mean[1]) / stats.std[1])
    assert LatentStats.from_dict(stats.to_dict()).std.tolist() == stats.std.tolist()
    with pytest.raises(ValueError, match="channels"):
        stats.normalize(torch.zeros(2, CHANNELS + 1, 4, 4))


def test_loader_resumes_exactly_from_start_batch(cached):
    full = make_latent_loader(cached, "train", batch_size=4, seed=3)
    batches = [next(full) for _ in range(8)]  # 5 batches per epoch: crosses into the second epoch
    resumed = make_latent_loader(cached, "train", batch_size=4, seed=3, start_batch=5)
    for expected in batches[5:]:
        got = next(resumed)
        for key in ("mean", "std", "label"):
            assert torch.equal(got[key], expected[key])
    first_pairs = full.sampler.epoch_items(0)[:4]
    assert {flip for _, flip in full.sampler.epoch_items(0)} == {False, True}
    for row, (index, flip) in enumerate(first_pairs):
        torch.testing.assert_close(batches[0]["mean"][row], full.cache[(index, flip)]["mean"])


def test_loader_ranks_see_disjoint_items(cached):
    labels = []
    for rank in (0, 1):
        loader = make_latent_loader(cached, "train", batch_size=5, seed=1, rank=rank, world_size=2)
        pairs = loader.sampler.epoch_items(0)
        batch = next(loader)
        assert torch.equal(batch["label"], torch.from_numpy(loader.cache.labels[[i for i, _ in pairs[:5]]]))
        labels.append({index for index, _ in pairs})
    assert not labels[0] & labels[1]


def copy_cache(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination)
    return destination


def test_loader_refuses_a_tampered_shard(cached, tmp_path):
    damaged = copy_cache(cached, tmp_path / "cache")
    mean_file = damaged / "train" / "shard_000001" / "mean.npy"
    payload = bytearray(mean_file.read_bytes())
    payload[-1] ^= 0xFF  # same size, other content: only the checksum sees it
    mean_file.write_bytes(bytes(payload))
    make_latent_loader(damaged, "train", batch_size=4)
    with pytest.raises(DataError, match="sha256.*verify_checksums"):
        make_latent_loader(damaged, "train", batch_size=4, verify_checksums=True)
    mean_file.write_bytes(bytes(payload[:-16]))
    with pytest.raises(DataError, match="shard_000001.*bytes"):
        make_latent_loader(damaged, "train", batch_size=4)
    mean_file.unlink()
    with pytest.raises(DataError, match="mean.npy is missing"):
        make_latent_loader(damaged, "train", batch_size=4)


def test_loader_refuses_missing_manifest_other_tokenizer_and_channels(cached, tmp_path):
    with pytest.raises(DataError, match="fingerprint"):
        make_latent_loader(cached, "train", batch_size=4, expected_tokenizer_fingerprint="tok-b")
    with pytest.raises(DataError, match="3 latent channels|4 latent channels"):
        make_latent_loader(cached, "train", batch_size=4, expected_channels=CHANNELS - 1)
    make_latent_loader(cached, "train", batch_size=4, expected_tokenizer_fingerprint="tok-a",
                       expected_channels=CHANNELS)
    incomplete = copy_cache(cached, tmp_path / "cache")
    (incomplete / "train" / "manifest.json").unlink()
    with pytest.raises(DataError, match="manifest.json.*incomplete"):
        make_latent_loader(incomplete, "train", batch_size=4)


def test_rerun_with_another_tokenizer_refuses_the_existing_shards(cached, tmp_path):
    other = copy_cache(cached, tmp_path / "cache")
    with pytest.raises(DataError, match="another tokenizer"):
        run_cache(other, tokenizer_fingerprint="tok-b")


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    dataset = WithUnreadable(build_image_dataset(DATA, "train"), bad={2, 8, 9, 10, 11, 12, 13, 14, 15})
    split_dir = run_cache(tmp_path, dataset=dataset)
    counts = [(shard["count"], shard["skipped"]) for shard in manifest(split_dir)["shards"]]
    assert counts == [(7, 1), (0, 8), (6, 0)]  # shard 1 is entirely unreadable
    cache = LatentCache(tmp_path, "train", verify_checksums=True)
    assert len(cache) == 13 and manifest(split_dir)["skipped"] == 9
    assert cache[(2, False)]["label"] == dataset[(3, False)]["label"]  # positions skip the unreadable image 2


def test_float16_cache_loads_as_float32_close_to_float32(cached, tmp_path):
    run_cache(tmp_path, dtype="float16")
    half, full = LatentCache(tmp_path, "train"), LatentCache(cached, "train")
    pairs = [(i, i % 2 == 0) for i in range(len(full))]
    got, expected = half.gather(pairs), full.gather(pairs)
    assert got["mean"].dtype == torch.float32
    torch.testing.assert_close(got["mean"], expected["mean"], atol=1e-2, rtol=1e-3)
    assert (tmp_path / "train" / "shard_000000" / "mean.npy").stat().st_size < \
        (cached / "train" / "shard_000000" / "mean.npy").stat().st_size


def test_bad_options_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="cache.dtype"):
        run_cache(tmp_path, dtype="int8")
    with pytest.raises(ConfigError, match="data=imagefolder"):
        cache_latents(StandInTokenizer(), {"kind": "webdataset", "train_urls": "x.tar"}, "train", tmp_path,
                      shard_size=4, batch_size=2, device=torch.device("cpu"), tokenizer_fingerprint="t")


def test_tokenizer_fingerprint_tells_checkpoints_apart(tmp_path):
    def save(name: str, seed: int, step: int) -> Path:
        torch.manual_seed(seed)
        weights = {"tokenizer": torch.nn.Linear(4, 4).state_dict()}
        path = tmp_path / name
        torch.save({"step": step, "config": {"kind": "epsvae"}, "models": weights, "ema": weights}, path)
        return path

    first = tokenizer_fingerprint(save("a.pt", seed=0, step=10))
    assert tokenizer_fingerprint(save("copy.pt", seed=0, step=10)) == first
    assert tokenizer_fingerprint(save("other_seed.pt", seed=1, step=10)) != first
    assert tokenizer_fingerprint(save("later.pt", seed=0, step=11)) != first
    assert tokenizer_fingerprint(tmp_path / "a.pt", use_ema=False) != first
    with pytest.raises(DataError, match="missing.pt"):
        tokenizer_fingerprint(tmp_path / "missing.pt")
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="broken.pt"):
        tokenizer_fingerprint(tmp_path / "broken.pt")


def test_tokenizer_fingerprint_is_the_same_in_either_checkpoint_layout(tmp_path):
    """It identifies the weights: the single file written before the weights moved out and today's layout agree."""
    torch.manual_seed(0)
    weights = {"tokenizer": torch.nn.Linear(4, 4).state_dict()}
    state = {"step": 10, "config": {"kind": "epsvae"}, "models": weights,
             "ema": {"tokenizer": {name: tensor + 1 for name, tensor in weights["tokenizer"].items()}}}
    torch.save(state, tmp_path / "old.pt")
    new = CheckpointDir(tmp_path / "checkpoints").save(state, 10)
    for use_ema in (True, False):
        expected = tokenizer_fingerprint(tmp_path / "old.pt", use_ema=use_ema)
        assert tokenizer_fingerprint(new, use_ema=use_ema) == expected
        assert tokenizer_fingerprint(new.with_suffix(".safetensors"), use_ema=use_ema) == expected
