"""The one training loop: exact resume, non-finite guard, pre-emption, checkpoint safety."""
import json
import os
import signal
import time

import pytest
import safetensors.torch
import torch

from shared import runtime as runtime_lib
from shared.data.sampler import ResumableBatchSampler
from shared.errors import ConfigError
from shared.train.checkpoint import CheckpointDir, load_checkpoint
from shared.preemption import Preempted
from shared.train.backends import OptimConfig
from shared.train.loop import LoopConfig, NonFiniteError, train
from tests.helpers import ToyRegression, load_config

INPUTS = torch.randn(64, 5, generator=torch.Generator().manual_seed(0))
TARGETS = INPUTS @ torch.randn(5, 1, generator=torch.Generator().manual_seed(1))


class Regression(ToyRegression):
    """A noisy linear regression: the loss uses torch's RNG, so RNG state matters for exact resume."""

    def __init__(self, nan_steps=()):
        super().__init__()
        self.nan_steps = set(nan_steps)

    def forward(self, batch, step, phase):
        noisy = batch["x"] + 0.1 * torch.randn_like(batch["x"])
        loss = (self.net(noisy) - batch["y"]).pow(2).mean()
        if step in self.nan_steps:
            loss = loss * float("nan")
        return loss, {"mse": loss.detach()}


def batches_from(split, start_step, fail_at=None, on_batch=None):
    """The micro-batches of one process from step `start_step` on (shared/data/sampler.py)."""
    sampler = ResumableBatchSampler(len(INPUTS), split.per_rank, seed=3, world_size=split.world_size,
                                    micro_steps=split.grad_accum, start_batch=split.first_micro_batch(start_step))
    for micro_batch, pairs in enumerate(sampler, start=split.first_micro_batch(start_step)):
        step = micro_batch // split.grad_accum
        if step == fail_at:
            raise KeyboardInterrupt("simulated crash")
        if on_batch and micro_batch % split.grad_accum == 0:
            on_batch(step)
        index = torch.tensor([i for i, _ in pairs])
        yield {"x": INPUTS[index], "y": TARGETS[index]}


def loop_config(**overrides):
    values = dict(steps=12, batch_size=8, log_every=1, ckpt_every=4, ema_decay=0.9, max_nonfinite=3,
                  optim={"model": OptimConfig(lr=1e-2, warmup_steps=3, grad_clip=1.0)})
    values.update(overrides)
    return LoopConfig(**values)


def make_runtime(tmp_path, name):
    cfg = load_config(["stage=ldm", f"name={name}"], output_root=tmp_path)
    return runtime_lib.setup(cfg)


def losses_by_step(run_dir):
    losses = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        losses[row["step"]] = row["mse"]
    return losses


def run(tmp_path, name, module=None, make_batches=batches_from, **loop_overrides):
    runtime = make_runtime(tmp_path, name)
    torch.manual_seed(0)
    module = module or Regression()
    result = train(runtime, module, make_batches, loop_config(**loop_overrides), model_config={"width": 8},
                   progress=False)
    return runtime, module, result


def test_resume_after_crash_matches_uninterrupted_run(tmp_path):
    full_runtime, full_module, _ = run(tmp_path, "full")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "resumed", make_batches=lambda split, s: batches_from(split, s, fail_at=6))
    assert CheckpointDir(tmp_path / "ldm" / "resumed" / "checkpoints").steps() == [4]
    resumed_runtime, resumed_module, result = run(tmp_path, "resumed")
    assert result.step == 12
    assert losses_by_step(resumed_runtime.run_dir) == pytest.approx(losses_by_step(full_runtime.run_dir), abs=0)
    for a, b in zip(full_module.parameters(), resumed_module.parameters()):
        assert torch.equal(a, b)


def test_a_resumed_run_counts_the_training_time_of_every_invocation(tmp_path):
    def slow(step):  # the first invocation takes at least 0.05 s per step
        time.sleep(0.05)

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "timed", make_batches=lambda split, s: batches_from(split, s, fail_at=6, on_batch=slow))
    checkpoints = CheckpointDir(tmp_path / "ldm" / "timed" / "checkpoints")
    first = torch.load(checkpoints.path(4), weights_only=True)["counters"]["train_seconds"]
    assert first >= 4 * 0.05
    runtime, _, result = run(tmp_path, "timed")
    assert result.train_seconds >= first
    rows = [json.loads(line) for line in (runtime.run_dir / "metrics.jsonl").read_text().splitlines()]
    counted = [row["train_seconds"] for row in rows if row["step"] > 4]
    assert counted == sorted(counted) and counted[0] >= first and counted[-1] == pytest.approx(
        result.train_seconds, abs=0.5)


def test_milestone_checkpoints_are_written_kept_and_change_nothing_else(tmp_path):
    plain_runtime, plain_module, _ = run(tmp_path, "plain")
    runtime, module, _ = run(tmp_path, "milestones", keep_checkpoints=1, keep_steps=(3, 6))
    # ckpt_every 4 writes 4, 8, 12; the milestones 3 and 6 are written although 4 does not divide them, and stay.
    assert CheckpointDir(runtime.run_dir / "checkpoints").steps() == [3, 6, 12]
    assert losses_by_step(runtime.run_dir) == pytest.approx(losses_by_step(plain_runtime.run_dir), abs=0)
    for a, b in zip(plain_module.parameters(), module.parameters()):
        assert torch.equal(a, b)


def test_checkpoints_keep_the_weights_apart_from_the_training_state(tmp_path):
    runtime, module, _ = run(tmp_path, "layout", steps=4)
    path = CheckpointDir(runtime.run_dir / "checkpoints").path(4)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.with_suffix(s).name for s in (".json", ".pt",
                                                                                                ".safetensors")]
    parameters = set(module.net.state_dict())
    assert set(safetensors.torch.load_file(path.with_suffix(".safetensors"))) == {
        f"{group}.net.{name}" for group in ("models", "ema") for name in parameters}
    assert json.loads(path.with_suffix(".json").read_text()) == {"step": 4, "config": {"width": 8}}
    assert set(torch.load(path, weights_only=True)) == {"step", "counters", "rng", "backend", "config_digest"}


def test_a_single_file_checkpoint_written_before_the_weights_moved_out_resumes(tmp_path):
    full_runtime, full_module, _ = run(tmp_path, "full")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "old", make_batches=lambda split, s: batches_from(split, s, fail_at=6))
    checkpoints = CheckpointDir(tmp_path / "ldm" / "old" / "checkpoints")
    state = load_checkpoint(checkpoints.path(4))
    for file in checkpoints.directory.iterdir():
        file.unlink()
    del state["counters"]["train_seconds"]  # nor did it count the training time
    torch.save(state, checkpoints.path(4))  # the old layout: weights, EMA and training state in one file
    old_runtime, old_module, result = run(tmp_path, "old")
    assert result.step == 12 and result.train_seconds is None  # its time before step 4 is unknown
    assert losses_by_step(old_runtime.run_dir) == pytest.approx(losses_by_step(full_runtime.run_dir), abs=0)
    for a, b in zip(full_module.parameters(), old_module.parameters()):
        assert torch.equal(a, b)


def test_non_finite_step_is_skipped_and_counted(tmp_path):
    runtime, module, result = run(tmp_path, "one-bad-step", module=Regression(nan_steps={5}))
    assert result.nonfinite_steps == 1
    rows = [json.loads(line) for line in (runtime.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert 6 not in [row["step"] for row in rows]  # the skipped step has no log row
    assert rows[-1]["nonfinite_steps"] == 1
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_non_finite_steps_in_a_row_stop_with_checkpoint(tmp_path):
    with pytest.raises(NonFiniteError, match=r"last at step 7.*mse"):
        run(tmp_path, "blowup", module=Regression(nan_steps=range(5, 100)))
    steps = CheckpointDir(tmp_path / "ldm" / "blowup" / "checkpoints").steps()
    assert steps[-1] == 7


def test_sigterm_writes_checkpoint_and_exits(tmp_path):
    def sigterm_at_step_3(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Preempted, match="SIGTERM"):
        run(tmp_path, "preempted", make_batches=lambda split, s: batches_from(split, s, on_batch=sigterm_at_step_3))
    assert CheckpointDir(tmp_path / "ldm" / "preempted" / "checkpoints").steps() == [4]


def test_truncated_newest_checkpoint_falls_back_to_previous(tmp_path):
    runtime, _, _ = run(tmp_path, "trunc", steps=8)
    checkpoints = CheckpointDir(runtime.run_dir / "checkpoints")
    assert checkpoints.steps() == [4, 8]
    newest = checkpoints.path(8)
    newest.write_bytes(newest.read_bytes()[:100])
    assert checkpoints.load_latest()["step"] == 4


def test_checkpoint_of_another_model_config_is_refused(tmp_path):
    runtime = make_runtime(tmp_path, "other")
    train(runtime, Regression(), batches_from, loop_config(steps=4), model_config={"width": 8}, progress=False)
    with pytest.raises(ConfigError, match="another model config"):
        train(runtime, Regression(), batches_from, loop_config(steps=8), model_config={"width": 16}, progress=False)
