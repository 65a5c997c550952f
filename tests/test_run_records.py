"""A run's record stays true, and names and outputs stay where they belong (hostile inputs, round 2, sections 1-2).

Each case ended, before its fix, in a record that no longer described what was trained, or in a run or export
written over another one's files; each now ends in a correct result or one line `error (...): ...`.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch
from omegaconf import OmegaConf

from pipelines.configs import group_config
from shared import runtime as runtime_lib
from shared.config_check import check_config
from shared.errors import ConfigError, DataError
from shared.files import json_text
from shared.train.checkpoint import (CheckpointDir, atomic_save, load_checkpoint, load_weights, resolve_checkpoint,
                                     save_json)
from tests.helpers import REPO, load_config, run_cli

TINY_TOKENIZER = ["stage=tokenizer", "tokenizer=epsvae_tiny", "data.resolution=32", "data.train_size=16",
                  "data.val_size=4", "tokenizer.train.batch_size=4", "tokenizer.train.log_every=1",
                  "tokenizer.train.sample_every=0", "tokenizer.train.ckpt_every=1", "reconstruct.grid_images=4",
                  "name=run"]

pytestmark = pytest.mark.usefixtures("one_thread")


def train(output_root: Path, *overrides: str) -> dict:
    from stage1_tokenizer.train import train_tokenizer

    return train_tokenizer(load_config([*TINY_TOKENIZER, *overrides], output_root))


def tokenizer_checkpoints(directory: Path, steps=(1, 2)) -> CheckpointDir:
    """Checkpoints of a tiny tokenizer as training saves them, each step with other weights; no training."""
    config = group_config("tokenizer", "epsvae_tiny")
    config.pop("train")
    from stage1_tokenizer.tokenizer import build_tokenizer

    checkpoints = CheckpointDir(directory, keep=len(steps))
    for step in steps:
        torch.manual_seed(step)
        weights = build_tokenizer(config).state_dict()
        checkpoints.save({"step": step, "config": config, "models": {"tokenizer": weights},
                          "ema": {"tokenizer": weights}, "counters": {}}, step)
    return checkpoints


def file_bytes(folder: Path) -> dict[str, bytes]:
    """What a folder records: every file but the log (which a refused rerun extends) and the lock."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file() and path.name not in ("log.txt", ".lock")}


# ------------------------------------------------------------------------------------ 1: settings of a run
@pytest.mark.parametrize("finished", [True, False], ids=["finished", "unfinished"])
def test_a_named_run_rerun_with_other_settings_is_refused_naming_each_change(tmp_path, finished):
    """It continued (or said "nothing to do") silently and rewrote config.yaml with values its steps never used."""
    train(tmp_path, "tokenizer.train.steps=2")
    run = tmp_path / "tokenizer" / "run"
    if not finished:
        (run / "DONE").unlink()
        CheckpointDir(run / "checkpoints").path(2).unlink()
    before = file_bytes(run)
    with pytest.raises(ConfigError) as error:
        train(tmp_path, "tokenizer.train.steps=2", "tokenizer.train.lr=0.0005", "tokenizer.train.ema_decay=0.5")
    message = str(error.value)
    recorded = load_config(TINY_TOKENIZER).tokenizer.train
    assert f"{run} ran with other settings (tokenizer.train.ema_decay: {recorded.ema_decay!r} -> 0.5; " \
           f"tokenizer.train.lr: {recorded.lr!r} -> 0.0005)" in message, message
    assert "name=" in message and "resume_changed=true" in message and "\n" not in message
    assert file_bytes(run) == before  # nothing trained, nothing rewritten


def test_resume_changed_continues_the_run_and_keeps_the_settings_of_its_earlier_steps(tmp_path):
    train(tmp_path, "tokenizer.train.steps=2")
    run = tmp_path / "tokenizer" / "run"
    recorded = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"))
    result = train(tmp_path, "tokenizer.train.steps=3", "tokenizer.train.lr=0.0005", "resume_changed=true")
    assert result["step"] == 3 and (run / "DONE").is_file()
    (entry,) = [json.loads(line) for line in (run / "settings_history.jsonl").read_text().splitlines()]
    assert entry["until_step"] == 2
    assert entry["changed"] == {"tokenizer.train.lr": [recorded["tokenizer"]["train"]["lr"], 0.0005],
                                "tokenizer.train.steps": [2, 3]}
    assert entry["config"] == recorded
    assert OmegaConf.load(run / "config.yaml").tokenizer.train.lr == 0.0005  # the settings from step 2 on
    assert [json.loads(row)["step"] for row in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    train(tmp_path, "tokenizer.train.steps=3", "tokenizer.train.lr=0.0005")  # now its settings: nothing to do
    assert len((run / "settings_history.jsonl").read_text().splitlines()) == 1


def test_resume_changed_cannot_change_the_networks_and_then_records_nothing(tmp_path):
    train(tmp_path, "tokenizer.train.steps=1")
    run = tmp_path / "tokenizer" / "run"
    before = file_bytes(run)
    with pytest.raises(ConfigError, match="another model config"):
        train(tmp_path, "tokenizer.train.steps=2", "tokenizer.encoder.base_channels=8", "resume_changed=true")
    assert file_bytes(run) == before and not (run / "settings_history.jsonl").exists()


def test_a_run_made_before_a_key_existed_still_resumes(tmp_path):
    """A key the record lacks was added to the configs later; its default keeps the earlier behaviour. A run made
    before this rule (its config.yaml without resume_changed, no settings history) resumes as it did."""
    train(tmp_path, "tokenizer.train.steps=1")
    run = tmp_path / "tokenizer" / "run"
    old = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"))
    del old["resume_changed"], old["reconstruct"]["noise_seeds"]
    (run / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(old)))
    (run / "DONE").unlink()  # unfinished: a rerun of the same settings without a name finds it too
    default_name = [option for option in TINY_TOKENIZER if option != "name=run"]
    assert runtime_lib.find_resumable_run(tmp_path / "tokenizer",
                                          load_config([*default_name, "tokenizer.train.steps=1"], tmp_path)) == run
    assert train(tmp_path, "tokenizer.train.steps=1")["step"] == 1
    assert not (run / "settings_history.jsonl").exists()


def test_a_run_whose_recorded_settings_cannot_be_read_is_refused(tmp_path):
    run = tmp_path / "tokenizer" / "run"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("tokenizer: [unclosed\n")
    with pytest.raises(DataError, match=rf"{run / 'config.yaml'} cannot be read .* restore it, or choose a new name"):
        runtime_lib.setup(load_config(TINY_TOKENIZER, tmp_path), resume=True)
    assert (run / "config.yaml").read_text() == "tokenizer: [unclosed\n"


def test_how_a_run_is_split_shown_or_laid_out_is_no_difference(tmp_path):
    """Micro-steps, recomputed activations, loader workers, the memory layout: the same computation, so the same run
    (a run resumed on another number of GPUs changes train.grad_accum to keep its global batch)."""
    train(tmp_path, "tokenizer.train.steps=1")
    layout = ["tokenizer.train.grad_accum=2", "tokenizer.train.activation_checkpointing=true", "data.num_workers=1",
              "channels_last=true", "pipeline.steps=[]"]
    with runtime_lib.setup(load_config([*TINY_TOKENIZER, "tokenizer.train.steps=1", *layout], tmp_path),
                           resume=True) as runtime:
        assert runtime._superseded is None


def test_the_pipeline_and_the_run_folders_share_one_rule_for_differences():
    from pipelines import pipeline

    assert not hasattr(pipeline, "_differences")
    recorded = {"a": 1, "b": {"c": 2}}
    assert runtime_lib.config_differences(recorded, {"a": 1, "b": {"c": 2, "new": 0}, "new": 1}) == []
    assert runtime_lib.config_differences(recorded, {"a": 3, "b": {}}) == [("a", 1, 3), ("b.c", 2, None)]


# ------------------------------------------------------------------------------------ 1: one process per run folder
LOCK_HOLDER = """
import os, sys, time
from pathlib import Path
from shared.runtime import lock_run_folder
Path(sys.argv[1]).mkdir(parents=True, exist_ok=True)
lock_run_folder(Path(sys.argv[1]))
worker = os.fork() if sys.argv[2] == "with-worker" else None
if worker == 0:  # a data loader worker, forked after the lock was taken
    time.sleep(120)
    os._exit(0)
print("locked", worker or "", flush=True)
time.sleep(120)
"""


def hold_lock(run_dir: Path, worker: bool = False) -> tuple[subprocess.Popen, int | None]:
    """A process holding the lock of `run_dir` (with a forked worker), and the worker's PID."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(run_dir), "with-worker" if worker else "-"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    said = holder.stdout.readline().split()
    assert said[0] == "locked", said
    return holder, int(said[1]) if worker else None


def test_a_run_folder_in_use_is_refused_naming_the_process_and_a_dead_one_s_lock_is_taken_over(tmp_path):
    """Two runs of one name both trained, one resuming the other's checkpoints while it ran. The holder's data
    loader workers (forked children, which outlive a killed parent for a few seconds) do not keep the lock."""
    run_dir = tmp_path / "tokenizer" / "run"
    holder, worker = hold_lock(run_dir, worker=True)
    try:
        with pytest.raises(ConfigError, match=rf"{run_dir} is in use by another process \(PID {holder.pid} on "):
            runtime_lib.setup(load_config(TINY_TOKENIZER, tmp_path), resume=True)
        assert not (run_dir / "config.yaml").exists()
        holder.send_signal(signal.SIGKILL)  # killed as by kill -9: its lock file stays, naming it; its worker lives
        holder.wait()
        assert str(holder.pid) in (run_dir / ".lock").read_text()
        with runtime_lib.setup(load_config(TINY_TOKENIZER, tmp_path), resume=True) as runtime:
            assert runtime.run_dir == run_dir
        assert (run_dir / ".lock").read_text().startswith(f"{os.getpid()} on ")
    finally:
        holder.kill()
        os.kill(worker, signal.SIGKILL)
        holder.wait()


@pytest.mark.slow
def test_a_second_training_on_a_folder_in_use_is_one_line(tmp_path):
    run_dir = tmp_path / "tokenizer" / "run"
    holder, _ = hold_lock(run_dir)
    try:
        result = run_cli(*TINY_TOKENIZER, f"output_root={tmp_path}", "wandb.mode=disabled", check=False, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error (ConfigError): {run_dir} is in use by another "
                                                              f"process (PID {holder.pid} on ")


# ------------------------------------------------------------------------------------ 1: checkpoints that fail
def test_every_reader_of_a_run_folder_skips_a_newest_checkpoint_that_lost_its_weights(tmp_path):
    """Resume said "written for another model config", export "holds neither a tokenizer nor a DiT", and the
    intact checkpoint before was never tried."""
    from pipelines.interop import export_weights
    from stage1_tokenizer.tokenizer import load_tokenizer
    from stage2_ldm.cache import tokenizer_fingerprint

    run = tmp_path / "tokenizer" / "run"
    checkpoints = tokenizer_checkpoints(run / "checkpoints")
    checkpoints.path(2).with_suffix(".safetensors").unlink()
    step_1 = checkpoints.path(1)
    assert checkpoints.load_latest()["step"] == 1  # resume
    assert resolve_checkpoint(run) == step_1 and load_weights(run)["step"] == 1
    expected = load_weights(step_1)["ema"]["tokenizer"]
    assert all(torch.equal(load_tokenizer(run, "cpu").state_dict()[key], value) for key, value in expected.items())
    assert tokenizer_fingerprint(run) == tokenizer_fingerprint(step_1)
    exported = export_weights(load_config(["stage=export", f"export.source={run}", "name=out"], tmp_path))
    assert exported["source"] == str(step_1)
    with pytest.raises(DataError, match=r"step_000000002\.pt cannot be read \(FileNotFoundError"):
        load_checkpoint(checkpoints.path(2))


def test_a_run_whose_newest_checkpoint_lost_its_weights_resumes_from_the_one_before(tmp_path):
    result = train(tmp_path, "tokenizer.train.steps=2")
    Path(result["checkpoint"]).with_suffix(".safetensors").unlink()
    assert train(tmp_path, "tokenizer.train.steps=2")["step"] == 2
    rows = (tmp_path / "tokenizer" / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(row)["step"] for row in rows] == [1, 2]


EDITS = {  # how the files of a checkpoint come to disagree
    "config edited": lambda path: save_json(path.with_suffix(".json"), {
        **json.loads(path.with_suffix(".json").read_text()),
        "config": {**json.loads(path.with_suffix(".json").read_text())["config"], "latent_channels": 3}}),
    "step edited": lambda path: save_json(path.with_suffix(".json"), {
        **json.loads(path.with_suffix(".json").read_text()), "step": 5}),
    "training state of another checkpoint": lambda path: path.write_bytes(path.with_name("other.pt").read_bytes()),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_a_checkpoint_whose_files_disagree_is_one_data_error(tmp_path, edit):
    """An edited .json gave a RuntimeError traceback from load_state_dict."""
    from stage1_tokenizer.tokenizer import load_tokenizer

    checkpoints = tokenizer_checkpoints(tmp_path / "checkpoints")
    other = tokenizer_checkpoints(tmp_path / "other", steps=(3,)).path(3)
    other.rename(tmp_path / "checkpoints" / "other.pt")
    newest = checkpoints.path(2)
    EDITS[edit](newest)
    readers = [lambda: load_checkpoint(newest)]
    if edit != "training state of another checkpoint":  # inference reads the weights and the .json alone
        readers.append(lambda: load_tokenizer(newest, "cpu"))
    for read in readers:
        with pytest.raises(DataError, match=rf"checkpoint {newest} does not hold together: .* records "):
            read()
    assert checkpoints.load_latest()["step"] == 1  # a run folder falls back to the checkpoint before


def written_before_the_digests(path: Path) -> dict:
    """Strip the step and config digests from the checkpoint `path`, as checkpoints were written before them; its
    weights."""
    weights = safetensors.torch.load_file(path.with_suffix(".safetensors"))
    path.with_suffix(".safetensors").write_bytes(safetensors.torch.save(weights))  # no metadata
    training_state = torch.load(path, weights_only=True)
    del training_state["config_digest"]
    atomic_save(training_state, path)
    return weights


def test_a_checkpoint_written_before_the_digests_still_loads(tmp_path):
    checkpoints = tokenizer_checkpoints(tmp_path, steps=(1,))
    path = checkpoints.path(1)
    weights = written_before_the_digests(path)
    assert load_checkpoint(path)["step"] == 1 and resolve_checkpoint(tmp_path) == path
    assert set(load_weights(path)["models"]["tokenizer"]) == {key.split(".", 2)[2] for key in weights
                                                             if key.startswith("models.")}


def test_a_checkpoint_from_before_the_digests_with_an_edited_config_is_one_data_error(tmp_path):
    """Without digests the edit is found only when the weights meet the network the edited config builds."""
    from stage1_tokenizer.tokenizer import load_tokenizer

    path = tokenizer_checkpoints(tmp_path, steps=(1,)).path(1)
    written_before_the_digests(path)
    EDITS["config edited"](path)
    with pytest.raises(DataError, match=rf"checkpoint {path} does not hold together: its weights do not fit "):
        load_tokenizer(path, "cpu")


# ------------------------------------------------------------------------------------ 2: names and outputs
@pytest.mark.parametrize("name", ["../tokenizer/run", "../../escape", "/tmp/absolute", "..", ".", "a/b", ""])
def test_a_name_outside_its_stage_folder_is_refused_before_anything_is_written(tmp_path, name):
    cfg = load_config(["stage=import", f"name='{name}'"], tmp_path)
    assert cfg.name == name
    with pytest.raises(ConfigError, match=r"name=.* must be one folder name") as error:
        check_config(cfg)
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match=r"must be one folder name"):
        runtime_lib.setup(cfg)
    assert not any(tmp_path.iterdir())


def diffusers_autoencoder(folder: Path) -> Path:
    """A tiny random diffusers AutoencoderKL folder: what stage=import takes."""
    diffusers = pytest.importorskip("diffusers")  # the bench extra
    diffusers.AutoencoderKL(block_out_channels=(32,), norm_num_groups=32, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",),
                            up_block_types=("UpDecoderBlock2D",)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("stage", ["import", "export"])
def test_an_import_or_export_into_an_existing_folder_is_refused(tmp_path, stage):
    """An export into an existing export folder mixed a diffusers AutoencoderKL with a DiT's model.json and
    replaced config.yaml and result.json without a word; an import replaced the imported checkpoint."""
    from pipelines.interop import export_weights, import_weights

    if stage == "export":
        write, source = export_weights, tokenizer_checkpoints(tmp_path / "source", steps=(1,)).path(1)
    else:
        write, source = import_weights, diffusers_autoencoder(tmp_path / "source")
    cfg = load_config([f"stage={stage}", f"{stage}.source={source}", "name=out"], tmp_path)
    write(cfg)
    folder = tmp_path / stage / "out"
    before = file_bytes(folder)
    with pytest.raises(ConfigError, match=rf"{folder} holds the output of an earlier stage={stage}: choose another "
                                          rf"name=\.\.\., or delete that folder"):
        write(cfg)
    assert file_bytes(folder) == before


def test_an_output_folder_that_is_a_file_or_read_only_is_one_line(tmp_path):
    blocker = tmp_path / "results"
    blocker.write_text("a file")
    with pytest.raises(ConfigError, match=rf"{blocker} is a file, not a folder: set reproduce.out=\.\.\. to a "
                                          rf"folder you can write to"):
        runtime_lib.check_writable_folder(blocker, "reproduce.out")
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    read_only = tmp_path / "read-only"
    read_only.mkdir(mode=0o555)
    with pytest.raises(ConfigError, match=rf"the folder {read_only / 'out'} is not writable \(Permission denied\): "
                                          rf"set reproduce.out="):
        runtime_lib.check_writable_folder(read_only / "out", "reproduce.out")


def test_results_are_standard_json_with_an_unbounded_side_as_null():
    text = json_text({"ratio": math.inf, "ci95": [0.5, math.inf], "nested": {"nan": math.nan, "ok": 1.5}})
    assert json.loads(text) == {"ratio": None, "ci95": [0.5, None], "nested": {"nan": None, "ok": 1.5}}
    assert "Infinity" not in text and "NaN" not in text


def test_a_pipeline_step_resumed_after_interruptions_records_the_wall_time_of_every_invocation(tmp_path,
                                                                                               monkeypatch):
    """A step stopped by a pre-emption and resumed by rerunning reports the time of both invocations, not the last's;
    a step run again from scratch (its marker deleted) reports its new run alone."""
    from pipelines import pipeline as pipeline_lib
    from shared.preemption import Preempted

    clock = iter([100.0, 103.0, 200.0, 205.5, 300.0, 301.0])
    monkeypatch.setattr(pipeline_lib, "time", SimpleNamespace(perf_counter=lambda: next(clock)))  # this module's clock
    cfg = OmegaConf.create({"output_root": str(tmp_path), "name": "run", "pipeline": {"steps": ["sample"]}})

    def stopped(folder: Path) -> dict:
        folder.mkdir(parents=True)
        raise Preempted("received SIGTERM")

    def finishes(folder: Path) -> dict:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / runtime_lib.RESULT_FILE).write_text('{"samples": 1}\n')
        (folder / runtime_lib.DONE_FILE).write_text("done\n")
        return {"samples": 1}

    with pytest.raises(Preempted):
        pipeline_lib.Pipeline(cfg).run_step("sample", stopped)
    pipeline_lib.Pipeline(cfg).run_step("sample", finishes)  # a new process: what it knows is on disk
    seconds = tmp_path / "pipeline" / "run" / "seconds.json"
    assert json.loads(seconds.read_text()) == {"sample": 8.5}
    assert pipeline_lib.Pipeline(cfg).run_step("sample", stopped) == {"samples": 1}  # finished: not run, not timed
    assert json.loads(seconds.read_text()) == {"sample": 8.5}

    (tmp_path / "pipeline" / "run" / "sample" / runtime_lib.DONE_FILE).unlink()
    pipeline_lib.Pipeline(cfg).run_step("sample", finishes)
    assert json.loads(seconds.read_text()) == {"sample": 1.0}
