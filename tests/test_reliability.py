"""Reliability of the stages as a user meets them: numeric blow-ups, broken data, inconsistent configs, caches and
checkpoints, unwritable or full disks. Each ends in a counted skip or in one readable error, never in a silently
wrong result. (Kills and pre-emption of real runs: tests/test_fault_injection.py.)"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from shared import runtime as runtime_lib
from shared.data.images import make_image_loader
from shared.data.shards import write_shards
from shared.data.sampler import BatchSplit
from shared.errors import ConfigError, DataError
from shared.train.checkpoint import CheckpointDir, atomic_save, load_checkpoint
from shared.train.backends import OptimConfig
from shared.train.loop import NonFiniteError, TrainModule
from tests.helpers import load_config, run_cli

TINY_TOKENIZER = ["stage=tokenizer", "tokenizer=epsvae_tiny", "data.resolution=32", "tokenizer.train.batch_size=4",
                  "tokenizer.train.log_every=1", "tokenizer.train.sample_every=0", "reconstruct.grid_images=4"]


SYNTHETIC = ("data.train_size=16", "data.val_size=4")


def tokenizer_cfg(output_root: Path, *overrides: str, data=SYNTHETIC):
    return load_config([*TINY_TOKENIZER, *data, *overrides], output_root)


def folder_data(root: Path, *overrides: str) -> tuple[str, ...]:
    return ("data=imagefolder", f"data.root={root}", "data.resolution=32", "data.num_workers=0", *overrides)


pytestmark = pytest.mark.usefixtures("one_thread")


def metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def write_image_folder(root: Path, per_class: int, classes=("n001", "n002")) -> None:
    for split in ("train", "val"):
        for label, wnid in enumerate(classes):
            (root / split / wnid).mkdir(parents=True)
            for i in range(per_class):
                colour = (60 * label + 10 * i, 120, 200 - 15 * i)
                Image.new("RGB", (40, 36), colour).save(root / split / wnid / f"{i}.png")


# ------------------------------------------------------------------------------------------- the entry point
@pytest.mark.slow
def test_user_errors_print_one_line_without_traceback(tmp_path):
    result = run_cli("stage=tokenizer", "tokenizer=epsvae_tiny", "data.resolution=30", f"output_root={tmp_path}",
                     "wandb.mode=disabled", check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error (ConfigError): data.resolution=30 is not divisible by the tokenizer's downsampling factor "
        "tokenizer.downsample=4")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "tokenizer").exists()  # refused before anything was written


# ------------------------------------------------------------------------------------------- numeric faults
def test_exploding_learning_rate_skips_counts_and_stops_with_a_checkpoint(tmp_path):
    max_nonfinite = 3
    cfg = tokenizer_cfg(tmp_path, "name=nan", "tokenizer.train.steps=20", "tokenizer.train.lr=1e6",
                        "tokenizer.train.warmup_steps=0", f"tokenizer.train.max_nonfinite={max_nonfinite}")
    from stage1_tokenizer.train import train_tokenizer

    with pytest.raises(NonFiniteError, match=rf"{max_nonfinite} steps in a row.*loss/velocity") as error:
        train_tokenizer(cfg)
    step = int(re.search(r"last at step (\d+)", str(error.value)).group(1))
    run_dir = tmp_path / "tokenizer" / "nan"
    warnings = [line for line in (run_dir / "log.txt").read_text().splitlines() if "update skipped" in line]
    assert [int(re.search(r"step (\d+):", line).group(1)) for line in warnings] == list(
        range(step - max_nonfinite + 1, step + 1))
    assert all("loss/total" in line for line in warnings)
    assert metric_rows(run_dir)[-1] == {**metric_rows(run_dir)[-1], "step": step, "nonfinite_steps": max_nonfinite}
    checkpoint = load_checkpoint(CheckpointDir(run_dir / "checkpoints").latest())
    assert checkpoint["step"] == step
    assert all(torch.isfinite(w).all() for w in checkpoint["models"]["tokenizer"].values())  # NaN never applied


# ------------------------------------------------------------------------------------------- bad data
def test_broken_images_are_skipped_and_counted_in_the_run_metrics(tmp_path):
    root = tmp_path / "images"
    write_image_folder(root, per_class=3, classes=("n001", "n002", "n003"))
    broken = {"truncated.png": (root / "train" / "n001" / "0.png").read_bytes()[:60], "empty.png": b"",
              "notes.jpg": b"not an image"}
    for name, payload in broken.items():
        (root / "train" / "n002" / name).write_bytes(payload)
    files = sum(1 for _ in (root / "train").rglob("*.*"))
    batch_size = len(broken) + 1  # no batch can be all broken, and steps × batch covers one epoch exactly
    assert files % batch_size == 0
    cfg = tokenizer_cfg(tmp_path, "name=broken", f"tokenizer.train.batch_size={batch_size}",
                        f"tokenizer.train.steps={files // batch_size}", data=folder_data(root))
    from stage1_tokenizer.train import train_tokenizer

    train_tokenizer(cfg)
    rows = metric_rows(tmp_path / "tokenizer" / "broken")
    assert rows[-1]["skipped_images"] == len(broken) and rows[-1]["nonfinite_steps"] == 0
    log = (tmp_path / "tokenizer" / "broken" / "log.txt").read_text()
    assert all(name in log for name in broken)


def test_truncated_webdataset_shard_is_skipped_with_a_warning(tmp_path, caplog):
    root = tmp_path / "images"
    write_image_folder(root, per_class=8)
    manifest = write_shards(root, tmp_path / "shards", "train", shard_size=4, progress=False)
    shards = sorted(str(p) for p in (tmp_path / "shards").glob("train-*.tar"))
    assert len(shards) * 4 == manifest["total"]
    truncated = Path(shards[1])
    truncated.write_bytes(truncated.read_bytes()[:3000])  # the middle of its second member
    cfg = {"kind": "webdataset", "train_urls": shards, "resolution": 32, "num_classes": 2, "shuffle_buffer": 4}
    with caplog.at_level(logging.WARNING, logger="epsvae.data"):
        loader = make_image_loader(cfg, "train", 4, train=True, seed=0, num_workers=0)
        batches = [batch for _, batch in zip(range(2 * len(shards)), loader)]  # two epochs
    assert all(len(batch["image"]) == 4 for batch in batches)  # the stream refills batches past the damage
    assert truncated.name in caplog.text


def test_class_map_without_a_class_folder_is_a_clear_error(tmp_path):
    root = tmp_path / "images"
    write_image_folder(root, per_class=2)
    class_map = tmp_path / "classes.tsv"
    class_map.write_text("wnid\tindex\nn001\t0\n")
    cfg = tokenizer_cfg(tmp_path, data=folder_data(root, f"data.class_map={class_map}"))
    from stage1_tokenizer.train import train_tokenizer

    with pytest.raises(DataError, match=r"\['n002'\].*not in data.class_map"):
        train_tokenizer(cfg)


# ------------------------------------------------------------------------------------------- caches, checkpoints
def write_tokenizer_checkpoint(path: Path, seed: int, *overrides: str) -> Path:
    """A tokenizer checkpoint in the project's format (weights of a fresh network), as stage=tokenizer saves it."""
    from stage1_tokenizer.tokenizer import build_tokenizer
    from stage1_tokenizer.train import model_config

    cfg = load_config([*TINY_TOKENIZER, *overrides])
    torch.manual_seed(seed)
    weights = build_tokenizer(cfg.tokenizer).state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save({"step": 1, "config": model_config(cfg.tokenizer), "models": {"tokenizer": weights},
                 "ema": {"tokenizer": weights}}, path)
    return path


@pytest.mark.parametrize("other", [[], ["tokenizer.latent_channels=8"]], ids=["other-weights", "other-channels"])
def test_ldm_refuses_a_cache_made_by_another_tokenizer(tmp_path, other):
    from stage2_ldm.cache import main as cache_main
    from stage2_ldm.train import train_ldm

    tokenizer = write_tokenizer_checkpoint(tmp_path / "tokenizer.pt", seed=0)
    common = ["experiment=smoke", "data.train_size=16", "cache.shard_size=16", f"cache.dir={tmp_path / 'cache'}"]
    cache_main(load_config(["stage=cache", *common, f"tokenizer.checkpoint={tokenizer}"], tmp_path))
    another = write_tokenizer_checkpoint(tmp_path / "another.pt", 1, *other)
    cfg = load_config(["stage=ldm", *common, f"tokenizer.checkpoint={another}", "ldm.train.batch_size=4"], tmp_path)
    with pytest.raises(DataError, match="was made by another tokenizer.*rerun stage=cache"):
        train_ldm(cfg, cfg.cache.dir, cfg.tokenizer.checkpoint)


def test_rerun_into_a_run_of_another_model_config_is_refused(tmp_path):
    from stage1_tokenizer.train import train_tokenizer

    train_tokenizer(tokenizer_cfg(tmp_path, "name=run", "tokenizer.train.steps=1"))
    with pytest.raises(ConfigError, match="another model config"):  # even when asked to continue with changes
        train_tokenizer(tokenizer_cfg(tmp_path, "name=run", "tokenizer.train.steps=2",
                                      "tokenizer.encoder.base_channels=8", "resume_changed=true"))


def test_rerun_with_a_name_continues_that_run_even_beside_a_newer_one(tmp_path):
    first = runtime_lib.setup(load_config(["stage=ldm", "name=first"], tmp_path), resume=True)
    newer = runtime_lib.setup(load_config(["stage=ldm", "name=newer"], tmp_path), resume=True)
    again = runtime_lib.setup(load_config(["stage=ldm", "name=first"], tmp_path), resume=True)
    for runtime in (first, newer, again):
        runtime.close()
    assert newer.run_dir != first.run_dir and again.run_dir == first.run_dir


def test_rerun_without_a_name_continues_the_unfinished_run_of_the_same_config(tmp_path):
    unfinished = runtime_lib.setup(load_config(["stage=ldm", "name=unfinished"], tmp_path), resume=True)
    unfinished.close()
    rerun = runtime_lib.setup(load_config(["stage=ldm"], tmp_path), resume=True)  # name: the date and time
    rerun.close()
    other = runtime_lib.setup(load_config(["stage=ldm", "ldm.train.lr=0.5"], tmp_path), resume=True)
    other.close()
    assert rerun.run_dir == unfinished.run_dir and other.run_dir != unfinished.run_dir


# ------------------------------------------------------------------------------------------- impossible configs
def test_deepspeed_options_without_deepspeed_are_refused(tmp_path):
    with pytest.raises(Exception, match=r"Could not override 'launcher.config'"):  # Hydra: not a key of local
        load_config(["stage=tokenizer", "launcher.config=configs/deepspeed/zero2.json"])
    cfg = load_config(["stage=tokenizer", "+launcher.config=configs/deepspeed/zero2.json"], tmp_path)
    with pytest.raises(ConfigError, match="launcher.config=.* is a DeepSpeed option but launcher=local"):
        runtime_lib.setup(cfg)


class OnePhase(TrainModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(2, 1)

    def phases(self):
        return ["net"]

    def phase_parameters(self, phase):
        return list(self.net.parameters())

    def networks(self):
        return {"net": self.net}


def test_zero_stage_3_is_refused_before_the_engine_starts():
    pytest.importorskip("deepspeed")
    from shared.train.backends import DeepSpeedBackend

    runtime = SimpleNamespace(device=torch.device("cpu"), autocast_dtype=None)
    with pytest.raises(ConfigError, match="ZeRO stage 3"):
        DeepSpeedBackend(runtime, OnePhase(), {"net": OptimConfig(lr=1e-3)}, {"zero_optimization": {"stage": 3}},
                         BatchSplit(8, 1, 1))


# ------------------------------------------------------------------------------------------- disk
def test_unwritable_output_folder_fails_at_start_up(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match=f"{blocker}.* is not writable.*output_root"):
        runtime_lib.setup(load_config(["stage=ldm", "name=run"], blocker))


def _full_disk_during_save(monkeypatch):
    real_save = torch.save

    def save(obj, f):  # half a checkpoint reaches the disk, then it is full
        real_save(obj, f)
        f.truncate(f.tell() // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", save)


def _full_disk_during_rename(monkeypatch):
    def replace(source, target):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("fault", [_full_disk_during_save, _full_disk_during_rename], ids=["save", "rename"])
def test_failed_checkpoint_write_is_an_error_and_keeps_the_last_good_one(tmp_path, monkeypatch, fault):
    checkpoints = CheckpointDir(tmp_path, keep=1)
    checkpoints.save({"step": 1, "weights": torch.ones(1000)}, 1)
    fault(monkeypatch)
    # The write that fails names its file: the training state (torch.save), or the weights (the first rename).
    with pytest.raises(DataError, match=r"could not write checkpoint .*step_000000002\.(pt|safetensors): No space left "
                                        r"on device; the previous checkpoint .* is kept"):
        checkpoints.save({"step": 2, "weights": torch.zeros(1000)}, 2)
    monkeypatch.undo()
    assert checkpoints.steps() == [1] and checkpoints.load_latest()["step"] == 1
    # No temporary file left, nor step 2's weights.
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"step_000000001{suffix}" for suffix in
                                                         (".json", ".pt", ".safetensors")]


def test_channels_last_training_computes_what_contiguous_training_does(tmp_path):
    from stage1_tokenizer.train import train_tokenizer

    steps = ("tokenizer.train.steps=3", "tokenizer.train.ckpt_every=2", "tokenizer.loss.disc_start=1")
    contiguous = Path(train_tokenizer(tokenizer_cfg(tmp_path, "name=contiguous", *steps))["checkpoint"]).parents[1]
    channels_last = Path(train_tokenizer(tokenizer_cfg(tmp_path, "name=nhwc", "channels_last=true",
                                                       *steps))["checkpoint"]).parents[1]
    for plain, nhwc in zip(metric_rows(contiguous), metric_rows(channels_last), strict=True):
        for key in ("loss/velocity", "loss/lpips", "loss/adversarial", "disc/loss"):
            if key in plain:
                assert nhwc[key] == pytest.approx(plain[key], rel=1e-3, abs=1e-5), key


def test_the_runtime_closes_its_log_file_when_a_stage_fails(tmp_path):
    from shared.runtime import setup

    cfg = load_config(["stage=tokenizer", "device=cpu"], output_root=tmp_path)
    with pytest.raises(RuntimeError, match="stage failed"):
        with setup(cfg, run_dir=tmp_path / "run") as runtime:
            log = runtime.log
            assert any(isinstance(handler, logging.FileHandler) for handler in log.handlers)
            raise RuntimeError("stage failed")
    assert not any(isinstance(handler, logging.FileHandler) for handler in log.handlers)
