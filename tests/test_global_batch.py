"""The global batch (train.batch_size) split across processes and gradient-accumulation micro-steps
(train.grad_accum): the same data order and the same updates (to fp32 rounding) however it is split."""
import json
import os
import subprocess
import sys

import pytest
import torch

from shared import runtime as runtime_lib
from shared.data.sampler import BatchSplit, ResumableBatchSampler
from shared.errors import ConfigError
from shared.train.backends import OptimConfig
from shared.train.loop import LoopConfig, train
from tests.helpers import REPO, ToyRegression, load_config

INPUTS = torch.randn(64, 5, generator=torch.Generator().manual_seed(0))
TARGETS = INPUTS @ torch.randn(5, 1, generator=torch.Generator().manual_seed(1))


class Regression(ToyRegression):
    """A linear regression without noise: its loss is a mean over the batch, so micro-steps add up exactly."""

    def __init__(self):
        super().__init__(seed=0)

    def forward(self, batch, step, phase):
        loss = (self.net(batch["x"]) - batch["y"]).pow(2).mean()
        return loss, {"mse": loss.detach()}


def micro_batches(split: BatchSplit, start_step: int, rank: int = 0, fail_at: int | None = None):
    sampler = ResumableBatchSampler(len(INPUTS), split.per_rank, seed=3, rank=rank, world_size=split.world_size,
                                    micro_steps=split.grad_accum, start_batch=split.first_micro_batch(start_step))
    for micro_batch, pairs in enumerate(sampler, start=split.first_micro_batch(start_step)):
        if micro_batch // split.grad_accum == fail_at:
            raise KeyboardInterrupt("simulated crash")
        index = torch.tensor([i for i, _ in pairs])
        yield {"x": INPUTS[index], "y": TARGETS[index]}


def run(tmp_path, name, grad_accum, steps=10, make_batches=micro_batches):
    runtime = runtime_lib.setup(load_config(["stage=ldm", f"name={name}"], output_root=tmp_path))
    module = Regression()
    loop = LoopConfig(steps=steps, batch_size=16, grad_accum=grad_accum, log_every=1, ckpt_every=4, ema_decay=0.9,
                      optim={"model": OptimConfig(lr=1e-2, warmup_steps=3, grad_clip=0.5)})
    train(runtime, module, make_batches, loop, model_config={"width": 8}, progress=False)
    rows = [json.loads(line) for line in (runtime.run_dir / "metrics.jsonl").read_text().splitlines()]
    return module, rows


def global_batches(global_batch: int, world_size: int, grad_accum: int, steps: int, start_step: int = 0):
    """Per step, the (index, flip) pairs every process takes over all its micro-steps."""
    split = BatchSplit(global_batch, world_size, grad_accum)
    streams = [iter(ResumableBatchSampler(70, split.per_rank, seed=5, rank=rank, world_size=world_size,
                                          micro_steps=grad_accum, start_batch=split.first_micro_batch(start_step)))
               for rank in range(world_size)]
    return [sorted(pair for stream in streams for _ in range(grad_accum) for pair in next(stream))
            for _ in range(steps)]


@pytest.mark.parametrize("world_size,grad_accum", [(2, 1), (4, 1), (1, 2), (2, 4)])
def test_global_batch_k_is_the_same_items_however_it_is_split(world_size, grad_accum):
    whole = global_batches(16, 1, 1, steps=12)  # 70 items: 4 global batches per epoch, 3 epochs
    assert global_batches(16, world_size, grad_accum, steps=12) == whole
    assert global_batches(16, world_size, grad_accum, steps=5, start_step=7) == whole[7:]  # resumed at step 7


def test_a_global_batch_the_split_cannot_divide_is_one_line():
    with pytest.raises(ConfigError, match=r"train.batch_size=16 does not split into 3 processes x 2 micro-steps .*"
                                          r"multiple of 6"):
        BatchSplit(16, 3, 2)
    with pytest.raises(ConfigError, match="train.grad_accum=0"):
        BatchSplit(16, 1, 0)
    assert BatchSplit(256, 8, 4).per_rank == 8


def test_accumulated_micro_steps_give_the_updates_of_one_large_step(tmp_path, one_thread):
    whole, whole_rows = run(tmp_path, "whole", grad_accum=1)
    accumulated, rows = run(tmp_path, "accumulated", grad_accum=4)
    for a, b in zip(whole.parameters(), accumulated.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert [row["mse"] for row in rows] == pytest.approx([row["mse"] for row in whole_rows], rel=1e-5)
    assert [row["model/grad_norm"] for row in rows] == pytest.approx([row["model/grad_norm"] for row in whole_rows],
                                                                     rel=1e-5)
    assert {key: rows[-1][key] for key in ("global_batch", "world_size", "per_rank_batch", "grad_accum")} == {
        "global_batch": 16, "world_size": 1, "per_rank_batch": 4, "grad_accum": 4}
    assert "x 4 micro-steps (train.grad_accum) x 4 per process" in (tmp_path / "ldm" / "accumulated" /
                                                                   "log.txt").read_text()


def test_a_run_resumed_with_another_split_keeps_its_global_batch_and_data_order(tmp_path, one_thread):
    """The per-process batch changes as it does on another number of processes (4 micro-steps of 4 stand for 4
    processes of 4): the same global batches, so the same updates."""
    whole, whole_rows = run(tmp_path, "whole", grad_accum=1)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "moved", grad_accum=1, make_batches=lambda split, start: micro_batches(split, start, fail_at=6))
    resumed, rows = run(tmp_path, "moved", grad_accum=4)
    assert [row["step"] for row in rows] == list(range(1, 11))
    assert [row["per_rank_batch"] for row in rows] == [16] * 4 + [4] * 6
    assert [row["mse"] for row in rows] == pytest.approx([row["mse"] for row in whole_rows], rel=1e-5)
    for a, b in zip(whole.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def deepspeed_weights(root: str) -> None:
    """Train the regression under DeepSpeed (ZeRO-1, one CPU process) with 1 and with 4 micro-steps and save both
    final weights and the initial ones to root/weights.pt. Run in a process of its own: DeepSpeed keeps its process
    groups in module globals, which another in-process DeepSpeed run would find stale."""
    import importlib

    # DeepSpeed compiles a shared-memory all-reduce for multi-process CPU runs on first use; one process never uses it.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    weights = {"initial": Regression().state_dict()}
    for grad_accum in (1, 4):
        runtime = runtime_lib.setup(load_config(["stage=ldm", f"name=ds{grad_accum}", "launcher=deepspeed"], root))
        module = Regression()
        loop = LoopConfig(steps=6, batch_size=16, grad_accum=grad_accum, log_every=1, ckpt_every=6,
                          optim={"model": OptimConfig(lr=1e-2, warmup_steps=3, grad_clip=0.5)})
        train(runtime, module, micro_batches, loop, model_config={}, progress=False,
              deepspeed_config={"zero_optimization": {"stage": 1}, "steps_per_print": 10**6})
        weights[grad_accum] = module.state_dict()
    torch.save(weights, f"{root}/weights.pt")


@pytest.mark.slow
def test_deepspeed_accumulates_micro_steps_into_the_update_of_one_large_step(tmp_path):
    pytest.importorskip("deepspeed")  # the distributed extra
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", f"from tests.test_global_batch import deepspeed_weights; "
                             f"deepspeed_weights({str(tmp_path)!r})"], env=env, cwd=REPO, timeout=600,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    weights = torch.load(tmp_path / "weights.pt", weights_only=True)
    for name, tensor in weights[1].items():
        torch.testing.assert_close(weights[4][name], tensor, rtol=1e-5, atol=1e-6)
        assert not torch.equal(tensor, weights["initial"][name])
