"""Where metrics.jsonl's rows also go (`logger=`): a stopped and resumed run continues its wandb run, and TensorBoard
holds the same scalars as metrics.jsonl, each step once."""
import json
import struct

import pytest
import torch
from omegaconf import open_dict

from shared import runtime as runtime_lib
from shared.errors import ConfigError
from shared.train.backends import OptimConfig
from shared.train.loop import LoopConfig, train
from tests.helpers import ToyRegression, load_config

INPUTS = torch.randn(16, 5, generator=torch.Generator().manual_seed(0))
TARGETS = INPUTS.sum(dim=1, keepdim=True)
STEPS, STOP_AT = 8, 6  # checkpoints every 4 steps: the rerun resumes from step 4 and logs steps 5 and 6 again


class Regression(ToyRegression):
    def forward(self, batch, step, phase):
        loss = (self.net(batch["x"]) - batch["y"]).pow(2).mean()
        return loss, {"mse": loss.detach()}


def batches(split, start_step, stop_at=None):
    for step in range(start_step, STEPS):
        if step == stop_at:
            raise KeyboardInterrupt("stopped")
        for _ in range(split.grad_accum):
            yield {"x": INPUTS, "y": TARGETS}


def run(cfg, stop_at=None):
    """Train the toy run of `cfg` in its run folder (resuming it), stopped before step `stop_at` if given."""
    loop = LoopConfig(steps=STEPS, batch_size=16, log_every=1, ckpt_every=4, ema_decay=0.9, max_nonfinite=3,
                      optim={"model": OptimConfig(lr=1e-2, warmup_steps=0, grad_clip=1.0)})
    with runtime_lib.setup(cfg, resume=True) as runtime:
        train(runtime, Regression(seed=0), lambda split, start: batches(split, start, stop_at), loop,
              model_config={"width": 8}, progress=False)


def config(tmp_path, *overrides):
    return load_config(["stage=ldm", "name=toy", *overrides], output_root=tmp_path)


def logged_mse(run_dir):
    return {row["step"]: row["mse"] for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def wandb_records(path):
    """The records of a `.wandb` file: wandb's transaction log (a 7-byte header, then LevelDB-log chunks: CRC,
    length, kind, in 32 KiB blocks) of wandb_internal_pb2.Record messages."""
    from wandb.proto import wandb_internal_pb2

    data, position, pending = path.read_bytes(), 7, b""
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a chunk header is padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:
            break
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_a_stopped_and_resumed_run_logs_into_the_same_wandb_run(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    cfg = config(tmp_path)
    with open_dict(cfg):
        cfg.wandb.mode = "offline"
    with pytest.raises(KeyboardInterrupt):
        run(cfg, stop_at=STOP_AT)
    run_dir = tmp_path / "ldm" / "toy"
    run_id = (run_dir / runtime_lib.WANDB_RUN_ID_FILE).read_text().strip()
    run(cfg)
    wandb.teardown()  # the service writes the .wandb files on its own time: wait for it

    logged = {}  # wandb run id -> the steps of the rows logged into it
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        records = list(wandb_records(path))
        (started,) = [record.run.run_id for record in records if record.WhichOneof("record_type") == "run"]
        steps = [json.loads(item.value_json) for record in records if record.WhichOneof("record_type") == "history"
                 for item in record.history.item if list(item.nested_key) == ["_step"]]
        logged.setdefault(started, []).extend(steps)
    assert list(logged) == [run_id]
    assert set(logged[run_id]) == set(range(1, STEPS + 1))


def test_tensorboard_holds_the_logged_scalars_each_step_once(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = config(tmp_path, "logger=tensorboard")
    with pytest.raises(KeyboardInterrupt):
        run(cfg, stop_at=STOP_AT)
    run(cfg)
    run_dir = tmp_path / "ldm" / "toy"
    events = EventAccumulator(str(run_dir / runtime_lib.TENSORBOARD_DIR))
    events.Reload()
    assert {"mse", "model/lr", "images_per_s"} <= set(events.Tags()["scalars"])
    shown = {event.step: event.value for event in events.Scalars("mse")}
    assert [event.step for event in events.Scalars("mse")] == list(range(1, STEPS + 1))  # steps 5, 6 once
    assert shown == pytest.approx(logged_mse(run_dir), rel=1e-6)  # TensorBoard keeps float32
    assert not (run_dir / runtime_lib.WANDB_RUN_ID_FILE).exists()


def test_an_unknown_logger_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match="logger='mlflow' is not one of wandb, tensorboard, none"):
        runtime_lib.setup(config(tmp_path, "logger=mlflow"))
    assert not (tmp_path / "ldm").exists()
