"""Fault injection through the command line: real training and caching subprocesses are killed (SIGKILL, also
in the middle of a checkpoint or shard write), pre-empted (SIGTERM, SIGINT) and rerun with the same command.

The interrupted runs must end where an uninterrupted run of the same command ends: the same per-step losses in
metrics.jsonl (every row, including the rows of steps that were computed again after a kill), the same weights,
EMA and optimiser state, and the same latent shards. Every rerun must resume from the newest complete checkpoint.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from shared.train.checkpoint import CheckpointDir, load_checkpoint
from tests.helpers import REPO, load_config, torch_threads

pytestmark = pytest.mark.slow

STEPS = 12
# Values that differ between two runs of the same computation.
TIMING_KEYS = {"time", "images_per_s", "train_seconds"}
TOKENIZER = ["stage=tokenizer", "experiment=smoke", "seed=1", "data.train_size=32", "data.val_size=8",
             f"tokenizer.train.steps={STEPS}", "tokenizer.train.batch_size=4", "tokenizer.train.log_every=1",
             "tokenizer.train.ckpt_every=1", "tokenizer.train.sample_every=0", "tokenizer.loss.disc_start=3"]
CACHE = ["stage=cache", "experiment=smoke", "data.train_size=48", "cache.shard_size=4", "cache.batch_size=4"]
LDM = ["stage=ldm", "experiment=smoke", "seed=1", f"ldm.train.steps={STEPS}", "ldm.train.batch_size=8",
       "ldm.train.log_every=1", "ldm.train.ckpt_every=1", "ldm.train.sample_every=0"]


def start(args: list[str], log_path: Path) -> subprocess.Popen:
    """`run.py ARGS` in the background, single-threaded (bit-identical arithmetic in every run), stderr to a file."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, str(REPO / "pipelines" / "run.py"), *args, "wandb.mode=disabled",
                                 "progress=false"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, log_path: Path, timeout: float = 300) -> str:
    process.wait(timeout=timeout)
    output = log_path.read_text()
    assert process.returncode == 0, f"run.py failed ({process.returncode}):\n{output}"
    return output


def wait_until(process: subprocess.Popen, condition, timeout: float = 120) -> None:
    """Poll `condition` every millisecond until it holds; fails if the process exits first."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, "the run ended before the fault could be injected"
        assert time.monotonic() < deadline, "timed out waiting for the run to get there"
        time.sleep(0.001)


def metric_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def complete_steps(checkpoint_dir: Path) -> list[int]:
    """Steps of the named checkpoints, after checking that each one is a complete, loadable file."""
    steps = CheckpointDir(checkpoint_dir).steps()
    for step in steps:
        assert load_checkpoint(CheckpointDir(checkpoint_dir).path(step))["step"] == step
    return steps


def temporary_checkpoints(checkpoint_dir: Path) -> list[str]:
    return [p.name for p in checkpoint_dir.glob(".step_*.tmp")] if checkpoint_dir.is_dir() else []


def interrupt_and_resume(args: list[str], run_dir: Path, logs: Path, faults: list[str]) -> list[str]:
    """Run `args` to completion through the given faults, rerunning the same command after each; returns the
    output of every attempt. Faults: SIGTERM / SIGINT (a few steps in), "kill-during-write" (SIGKILL while a
    checkpoint is being written), "kill" (SIGKILL a seeded random time after the run made progress)."""
    checkpoints = run_dir / "checkpoints"
    delays = random.Random(7)
    outputs = []
    for attempt, fault in enumerate([*faults, None]):
        resume_step = (complete_steps(checkpoints) or [0])[-1]
        rows_before = len(metric_rows(run_dir))
        log_path = logs / f"attempt{attempt}.log"
        process = start(args, log_path)
        if fault is None:
            outputs.append(finish(process, log_path))
        else:
            # Progress since this attempt started: the signal handlers are installed and training is under way.
            wait_until(process, lambda: len(metric_rows(run_dir)) >= rows_before + 2)
            if fault in ("SIGTERM", "SIGINT"):
                process.send_signal(getattr(signal, fault))
            elif fault == "kill-during-write":
                wait_until(process, lambda: temporary_checkpoints(checkpoints))
                process.kill()
            else:
                time.sleep(delays.uniform(0.0, 0.5))
                process.kill()
            process.wait(timeout=120)
            outputs.append(log_path.read_text())
            # A pre-empted run exits with status 1 (a SystemExit with its message), a killed one by SIGKILL.
            expected = 1 if fault in ("SIGTERM", "SIGINT") else -signal.SIGKILL
            assert process.returncode == expected, f"exit status {process.returncode} after {fault}:\n{outputs[-1]}"
        if resume_step:
            path = CheckpointDir(checkpoints).path(resume_step)
            assert f"resumed from {path} at step {resume_step}" in outputs[-1]
        if fault == "kill-during-write":
            assert temporary_checkpoints(checkpoints), "the kill did not land inside a checkpoint write"
        if fault in ("SIGTERM", "SIGINT"):
            saved = complete_steps(checkpoints)[-1]
            assert f"received {fault}: saved step {saved} in {checkpoints}" in outputs[-1]
            assert "Traceback" not in outputs[-1]
            assert metric_rows(run_dir)[-1]["step"] == saved  # the step in progress finished first
    return outputs


def assert_same_run(reference: Path, resumed: Path) -> None:
    """Every metrics row of `resumed` (steps computed twice appear twice) equals the reference row of its step,
    and the final checkpoints hold the same weights, EMA and optimiser state."""
    expected = {row["step"]: {k: v for k, v in row.items() if k not in TIMING_KEYS} for row in metric_rows(reference)}
    rows = metric_rows(resumed)
    assert sorted(expected) == list(range(1, STEPS + 1)) and {row["step"] for row in rows} == set(expected)
    for row in rows:
        assert {k: v for k, v in row.items() if k not in TIMING_KEYS} == expected[row["step"]], row["step"]
    final = [load_checkpoint(CheckpointDir(run / "checkpoints").path(STEPS))
             for run in (reference, resumed)]
    for key in ("models", "ema", "backend"):
        assert_equal_nested(final[0][key], final[1][key], key)
    assert not temporary_checkpoints(resumed / "checkpoints")  # a killed writer's leftover is cleaned up
    assert (resumed / "DONE").is_file()


def assert_equal_nested(a, b, where: str) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_equal_nested(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_nested(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def tokenizer_runs(tmp_path_factory):
    """(reference run, interrupted run, outputs of its attempts): the reference runs beside the interruptions."""
    root = tmp_path_factory.mktemp("tokenizer")
    reference_log = root / "reference.log"
    reference = start([*TOKENIZER, f"output_root={root / 'reference'}", "name=run"], reference_log)
    run_dir = root / "interrupted" / "tokenizer" / "run"
    outputs = interrupt_and_resume([*TOKENIZER, f"output_root={root / 'interrupted'}", "name=run"], run_dir, root,
                                   faults=["SIGTERM", "kill-during-write", "kill"])
    finish(reference, reference_log)
    return root / "reference" / "tokenizer" / "run", run_dir, outputs


def test_tokenizer_survives_sigterm_and_kills_and_resumes_exactly(tokenizer_runs):
    reference, interrupted, _ = tokenizer_runs
    assert any("disc/total" in row for row in metric_rows(reference))  # the GAN phase was part of the run
    assert_same_run(reference, interrupted)


def cache_files(cache_dir: Path) -> dict:
    """{shard: {file: sha256}} from the manifest, after checking the files against it."""
    manifest = json.loads((cache_dir / "train" / "manifest.json").read_text())
    from shared.data.latents import LatentCache

    LatentCache(cache_dir, "train", verify_checksums=True)
    return {shard["name"]: {name: f["sha256"] for name, f in shard["files"].items()} for shard in manifest["shards"]}


@pytest.fixture(scope="module")
def reference_cache(tokenizer_runs, tmp_path_factory):
    """The latent cache of the reference tokenizer, made in-process without interruption (single-threaded, as
    the subprocesses)."""
    from stage2_ldm.cache import main as cache_main

    reference, _, _ = tokenizer_runs
    cache_dir = tmp_path_factory.mktemp("cache") / "reference"
    cfg = load_config([*CACHE, f"tokenizer.checkpoint={reference}", f"cache.dir={cache_dir}"])
    with torch_threads(1):
        cache_main(cfg)
    return cache_dir


def cache_run_in_a_shard(tokenizer_runs, tmp_path, log_name: str):
    """(process, its arguments, the cache folder) of a stage=cache run that is writing a shard right now."""
    reference, _, _ = tokenizer_runs
    cache_dir = tmp_path / "cache"
    args = [*CACHE, f"tokenizer.checkpoint={reference}", f"cache.dir={cache_dir}"]
    process = start(args, tmp_path / log_name)
    split_dir = cache_dir / "train"
    wait_until(process, lambda: split_dir.is_dir() and any(".tmp" in p.name for p in split_dir.iterdir()))
    return process, args, cache_dir


def test_cache_killed_during_a_shard_write_completes_to_the_same_cache(tokenizer_runs, reference_cache, tmp_path):
    process, args, cache_dir = cache_run_in_a_shard(tokenizer_runs, tmp_path, "killed.log")
    split_dir = cache_dir / "train"
    process.kill()
    process.wait(timeout=60)
    assert not (split_dir / "manifest.json").exists()
    finish(start(args, tmp_path / "rerun.log"), tmp_path / "rerun.log")
    assert not [p.name for p in split_dir.iterdir() if ".tmp" in p.name]
    assert cache_files(cache_dir) == cache_files(reference_cache)


@pytest.mark.parametrize("fault", ["SIGTERM", "SIGINT"])
def test_cache_preempted_stops_after_its_shard_and_completes_to_the_same_cache(tokenizer_runs, reference_cache,
                                                                             tmp_path, fault):
    process, args, cache_dir = cache_run_in_a_shard(tokenizer_runs, tmp_path, "preempted.log")
    split_dir = cache_dir / "train"
    process.send_signal(getattr(signal, fault))
    process.wait(timeout=60)
    output = (tmp_path / "preempted.log").read_text()
    assert process.returncode == 1 and "Traceback" not in output, output
    assert f"received {fault}: shards up to shard_" in output.strip().splitlines()[-1]
    assert not (split_dir / "manifest.json").exists()
    finish(start(args, tmp_path / "rerun.log"), tmp_path / "rerun.log")
    assert cache_files(cache_dir) == cache_files(reference_cache)


def test_cache_rerun_rewrites_a_truncated_shard(tokenizer_runs, reference_cache, tmp_path):
    """A shard file cut short after the run (a partial copy, a full disk elsewhere) is found by its recorded size
    on the next run of stage=cache, and written again."""
    import shutil

    from stage2_ldm.cache import main as cache_main

    reference, _, _ = tokenizer_runs
    cache_dir = tmp_path / "cache"
    shutil.copytree(reference_cache, cache_dir)
    mean = cache_dir / "train" / "shard_000001" / "mean.npy"
    mean.write_bytes(mean.read_bytes()[: mean.stat().st_size // 2])
    with torch_threads(1):  # as the reference cache was made
        cache_main(load_config([*CACHE, f"tokenizer.checkpoint={reference}", f"cache.dir={cache_dir}"]))
    assert cache_files(cache_dir) == cache_files(reference_cache)


def test_ldm_survives_sigint_and_kills_and_resumes_exactly(tokenizer_runs, reference_cache, tmp_path):
    tokenizer, _, _ = tokenizer_runs
    args = [*LDM, f"cache.dir={reference_cache}", f"tokenizer.checkpoint={tokenizer}", "name=run"]
    reference_log = tmp_path / "reference.log"
    reference = start([*args, f"output_root={tmp_path / 'reference'}"], reference_log)
    run_dir = tmp_path / "interrupted" / "ldm" / "run"
    interrupt_and_resume([*args, f"output_root={tmp_path / 'interrupted'}"], run_dir, tmp_path,
                         faults=["SIGINT", "kill-during-write"])
    finish(reference, reference_log)
    assert_same_run(tmp_path / "reference" / "ldm" / "run", run_dir)
