"""Two processes under torchrun (gloo, CPU) compute what one process computes with the same global batch split
into as many parts (grad_accum=2): the same losses and weights (to fp32 rounding), under DDP and under DeepSpeed
ZeRO-1 and ZeRO-2; stage=cache and stage=sample write what one process writes; a killed rank ends the job in bounded
time and a rerun resumes exactly."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.data.latents import LatentCache, shard_name
from shared.train.checkpoint import load_checkpoint
from stage1_tokenizer.train import train_tokenizer
from stage2_ldm.cache import main as cache_main
from stage2_ldm.sample import sample_to_folder
from stage2_ldm.train import train_ldm
from tests.helpers import REPO, load_config, tiny_tokenizer_and_cache, torch_threads

TINY = ["experiment=smoke", "data.train_size=64", "data.val_size=16", "tokenizer.train.steps=4",
        "tokenizer.train.batch_size=8", "tokenizer.train.sample_every=0", "tokenizer.train.ckpt_every=2",
        "tokenizer.train.log_every=1", "tokenizer.loss.disc_start=2", "ldm.train.steps=4", "ldm.train.batch_size=16",
        "ldm.train.log_every=1", "ldm.train.ckpt_every=2", "ldm.train.sample_every=0", "cache.shard_size=64",
        "sample.steps=2", "sample.batch_size=4", "sample.shard_size=8", "sample.num_per_class=1", "decode.nfe=1",
        "device=cpu", "progress=false", "wandb.mode=disabled"]
TIMING_KEYS = {"time", "images_per_s", "train_seconds", "world_size", "per_rank_batch", "grad_accum"}


def torchrun(*args: str, timeout: float = 900, script: Path = REPO / "pipelines" / "run.py"
             ) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 SCRIPT ARGS` (pipelines/run.py), one thread per process."""
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script), *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"torchrun {' '.join(args)} failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny tokenizer and the latent cache of its training split."""
    root = tmp_path_factory.mktemp("two_processes")
    tokenizer, cache = tiny_tokenizer_and_cache(root, TINY)
    return {"root": root, "tokenizer": tokenizer, "cache": cache}


def dit_overrides(made: dict) -> list[str]:
    """stage=ldm on the module's tokenizer and cache, into its folder."""
    return ["stage=ldm", *TINY, f"tokenizer.checkpoint={made['tokenizer']}", f"cache.dir={made['cache']}",
            f"output_root={made['root']}"]


@pytest.fixture(scope="module")
def one_process_dit(made) -> Path:
    """The run folder of the tiny DiT trained by one process with the global batch in two micro-steps: what the
    2-process DiT runs must equal."""
    run_dir = made["root"] / "ldm" / "single"
    with torch_threads(1):
        train_ldm(load_config([*dit_overrides(made), "name=single", "ldm.train.grad_accum=2"], made["root"]),
                  made["cache"], made["tokenizer"], run_dir=run_dir)
    return run_dir


def rows(run_dir: Path) -> list[dict]:
    return [{key: value for key, value in json.loads(line).items() if key not in TIMING_KEYS}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(run_dir: Path, single_dir: Path, networks: tuple[str, ...]) -> None:
    two, one = rows(run_dir), rows(single_dir)
    assert [row.keys() for row in two] == [row.keys() for row in one]
    for a, b in zip(two, one):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
    two_processes, one_process = load_checkpoint(run_dir), load_checkpoint(single_dir)
    for group in ("models", "ema"):
        for network in networks:
            if network not in one_process[group]:
                continue
            for name, tensor in one_process[group][network].items():
                torch.testing.assert_close(two_processes[group][network][name], tensor, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_ddp_dit_on_two_processes_trains_as_one_process_with_two_micro_steps(made, one_process_dit):
    torchrun(*dit_overrides(made), "launcher=ddp", "name=ddp")
    assert json.loads((made["root"] / "ldm" / "ddp" / "metrics.jsonl").read_text().splitlines()[-1])[
        "per_rank_batch"] == 8
    assert_same_run(made["root"] / "ldm" / "ddp", one_process_dit, ("dit",))


@pytest.mark.slow
@pytest.mark.parametrize("zero", [1, 2])
def test_deepspeed_zero_dit_on_two_processes_trains_as_one_process_with_two_micro_steps(made, one_process_dit, zero):
    """ZeRO-1 shards the optimiser state over the 2 ranks, ZeRO-2 the gradients too; the engine steps our warm-up."""
    pytest.importorskip("deepspeed")  # the distributed extra
    torchrun(*dit_overrides(made), "launcher=deepspeed", f"launcher.config=configs/deepspeed/zero{zero}.json",
             f"name=zero{zero}", script=REPO / "tests" / "deepspeed_rank.py")
    run_dir = made["root"] / "ldm" / f"zero{zero}"
    shards = sorted(path.name for path in (run_dir / "checkpoints" / "deepspeed" / "step_000000004").iterdir())
    assert shards == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                      "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert_same_run(run_dir, one_process_dit, ("dit",))


@pytest.mark.slow
def test_ddp_tokenizer_on_two_processes_trains_as_one_process_with_two_micro_steps(made, one_thread):
    tokenizer = ["stage=tokenizer", *TINY, f"output_root={made['root']}"]
    torchrun(*tokenizer, "launcher=ddp", "name=ddp")
    single = load_config([*tokenizer, "name=single", "tokenizer.train.grad_accum=2"], made["root"])
    train_tokenizer(single, run_dir=made["root"] / "tokenizer" / "single")
    assert_same_run(made["root"] / "tokenizer" / "ddp", made["root"] / "tokenizer" / "single",
                    ("tokenizer", "discriminator"))


@pytest.mark.slow
def test_sampling_on_two_processes_writes_the_samples_of_one(made, one_thread):
    ldm = load_config(["stage=ldm", *TINY, "ldm.train.steps=2", f"tokenizer.checkpoint={made['tokenizer']}"],
                      made["root"])
    checkpoint = train_ldm(ldm, made["cache"], made["tokenizer"], run_dir=made["root"] / "ldm" / "for_sampling")[
        "checkpoint"]
    sample = ["stage=sample", *TINY, f"ldm.checkpoint={checkpoint}", f"tokenizer.checkpoint={made['tokenizer']}",
              f"output_root={made['root']}"]
    torchrun(*sample, "launcher=ddp", "name=two")
    sample_to_folder(load_config([*sample, "name=one"], made["root"]), checkpoint, made["tokenizer"])
    with np.load(made["root"] / "sample" / "two" / "samples.npz") as two, \
            np.load(made["root"] / "sample" / "one" / "samples.npz") as one:
        assert two["arr_0"].shape == (10, 32, 32, 3)
        np.testing.assert_array_equal(two["arr_0"], one["arr_0"])
        np.testing.assert_array_equal(two["arr_1"], one["arr_1"])


@pytest.mark.slow
def test_caching_on_two_processes_writes_the_cache_of_one_also_when_resumed(made):
    """Resumed after a partial run that wrote shards 0 and 2: rank 0 has nothing left to do and waits at the barrier
    (launcher.timeout_minutes) while rank 1 encodes shards 1 and 3."""
    cache = ["stage=cache", *TINY, f"tokenizer.checkpoint={made['tokenizer']}", "cache.shard_size=16",
             f"output_root={made['root']}"]
    one, two = made["root"] / "cache_one", made["root"] / "cache_two"
    cache_main(load_config([*cache, f"cache.dir={one}"], made["root"]))
    for shard in (0, 2):
        shutil.copytree(one / "train" / shard_name(shard), two / "train" / shard_name(shard))
    result = torchrun(*cache, f"cache.dir={two}", "launcher=ddp")
    assert "rank 0 has 2 shards, 2 already done" in result.stderr
    a, b = LatentCache(one, "train"), LatentCache(two, "train")
    pairs = [(index, flip) for index in range(len(a)) for flip in (False, True)]
    assert len(a) == len(b) == 64
    for key, value in a.gather(pairs).items():
        torch.testing.assert_close(b.gather(pairs)[key], value, rtol=0, atol=0)


def worker_of_rank(agent: subprocess.Popen, rank: int) -> int:
    """The pid of torchrun's worker process of `rank` (its environment says RANK)."""
    children = Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text().split()
    for pid in map(int, children):
        environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environment:
            return pid
    raise AssertionError(f"no worker of rank {rank} among {children}")


@pytest.mark.slow
def test_a_killed_rank_ends_the_job_in_bounded_time_and_a_rerun_resumes_exactly(made, one_thread):
    ldm = ["stage=ldm", *TINY, "ldm.train.steps=60", f"tokenizer.checkpoint={made['tokenizer']}",
           f"cache.dir={made['cache']}", f"output_root={made['root']}"]
    run_dir = made["root"] / "ldm" / "killed"
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              str(REPO / "pipelines" / "run.py"), *ldm, "launcher=ddp", "name=killed"],
                             env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 900
        while not (run_dir / "checkpoints" / "step_000000002.pt").is_file():
            assert agent.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.05)
        os.kill(worker_of_rank(agent, 1), signal.SIGKILL)
        killed = time.monotonic()
        assert agent.wait(timeout=180) != 0
        assert time.monotonic() - killed < 180
    finally:
        if agent.poll() is None:
            agent.kill()
    assert not (run_dir / "DONE").exists()
    torchrun(*ldm, "launcher=ddp", "name=killed")  # the rerun resumes from the newest complete checkpoint
    single = load_config([*ldm, "name=uninterrupted", "ldm.train.grad_accum=2"], made["root"])
    train_ldm(single, made["cache"], made["tokenizer"], run_dir=made["root"] / "ldm" / "uninterrupted")
    assert_same_run(run_dir, made["root"] / "ldm" / "uninterrupted", ("dit",))
