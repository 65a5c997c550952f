"""The main job: `stage=pipeline experiment=smoke` (shortened), its report, and resuming by rerunning it."""
import json

import pytest

from shared.runtime import finished_result
from shared.train.checkpoint import load_weights
from tests.helpers import run_cli

pytestmark = pytest.mark.slow

SHORT = ["stage=pipeline", "experiment=smoke", "data.train_size=128", "data.val_size=16", "tokenizer.train.steps=20",
         "tokenizer.train.batch_size=8", "tokenizer.train.sample_every=10", "tokenizer.train.ckpt_every=10",
         "ldm.train.steps=20", "ldm.train.batch_size=16", "ldm.train.sample_every=10", "ldm.train.ckpt_every=10",
         "reconstruct.num_images=16", "sample.num_per_class=2", "sample.steps=5", "decode.nfe=1",
         "evaluate.reference_images=32", "wandb.mode=disabled", "progress=false"]


@pytest.mark.quality
def test_the_main_job_s_tokenizer_reconstructs_recognisably(tmp_path):
    """README's first command must show a working tokenizer: at least 20 dB PSNR at its decoder NFE (seed 0). Four
    minutes of training on one core: a quality check (`pytest -m quality`), outside README's test command."""
    common = ["experiment=smoke", f"output_root={tmp_path}", "seed=0", "wandb.mode=disabled", "progress=false"]
    run_cli("stage=tokenizer", *common, timeout=1800)  # about 3 minutes on one idle core
    metrics = json.loads(run_cli("stage=reconstruct", *common, "evaluate.bootstrap=0").stdout.strip().splitlines()[-1])
    assert metrics["decoder_nfe"] == 2 and metrics["num_images"] == 64
    assert metrics["psnr"] >= 20.0, metrics


def test_smoke_pipeline_reports_every_number_and_resumes(tmp_path):
    run_cli(*SHORT, f"output_root={tmp_path}")
    root = tmp_path / "pipeline" / "smoke"
    report = json.loads((root / "report.json").read_text())
    assert report["reconstruction"]["rfid"] > 0 and report["reconstruction"]["psnr"] > 0
    assert report["reconstruction"]["num_images"] == 16 and report["reconstruction"]["decoder_nfe"] == 1
    assert report["generation"]["gfid"] > 0 and report["generation"]["num_samples"] == 20
    assert report["generation"]["steps"] == 5 and report["generation"]["sampler"] == "euler"
    assert all(report["throughput_images_per_s"][part] > 0 for part in ("ldm", "decode", "total"))
    assert set(report["wall_seconds"]) == {"tokenizer", "reconstruct", "cache", "ldm", "sample", "evaluate"}
    assert "| gFID |" in (root / "report.md").read_text()
    for grid in ("tokenizer/samples/recon_0000020.png", "ldm/samples/step_0000020.png", "sample/grid.png",
                 "reconstruct/reconstructions_nfe1.png"):
        assert (root / grid).is_file(), grid

    for step in report["wall_seconds"]:  # the one contract: every step's folder holds its result and marker
        assert finished_result(root / step) is not None, step
    assert report["reconstruction"]["rfid"] == finished_result(root / "reconstruct")["rfid"]

    again = run_cli(*SHORT, f"output_root={tmp_path}")  # every step has finished: nothing is redone
    assert "INFO stage=" not in again.stderr
    assert json.loads((root / "report.json").read_text())["wall_seconds"] == report["wall_seconds"]

    (root / "sample" / "DONE").unlink()  # the marker alone decides: that step runs again, and only it
    third = run_cli(*SHORT, f"output_root={tmp_path}")
    assert [line.split("run_dir=")[1].split()[0] for line in third.stderr.splitlines() if "INFO stage=" in line] \
        == [str(root / "sample")]


def test_a_pipeline_folder_refuses_a_rerun_with_a_different_config(tmp_path):
    # Only the steps before tokenizer training run, so the refusal is reached in seconds.
    first = run_cli(*SHORT, f"output_root={tmp_path}", "pipeline.steps=[]")
    assert (tmp_path / "pipeline" / "smoke" / "pipeline_config.yaml").is_file(), first.stderr
    changed = run_cli(*SHORT, f"output_root={tmp_path}", "pipeline.steps=[]", "tokenizer.train.steps=21", check=False)
    assert changed.returncode != 0
    assert "different config" in changed.stderr and "tokenizer.train.steps: 20 -> 21" in changed.stderr
    assert "Traceback" not in changed.stderr


def test_a_key_added_to_the_configs_after_a_folder_was_made_is_no_difference(tmp_path):
    # The record of a folder made before `reconstruct.noise_seeds` existed: the key's default keeps that behaviour.
    first = run_cli(*SHORT, f"output_root={tmp_path}", "pipeline.steps=[]")
    record = tmp_path / "pipeline" / "smoke" / "pipeline_config.yaml"
    assert record.is_file(), first.stderr
    record.write_text(record.read_text().replace("  noise_seeds: 2\n", ""))
    assert "noise_seeds" not in record.read_text()
    again = run_cli(*SHORT, f"output_root={tmp_path}", "pipeline.steps=[]", check=False)
    assert again.returncode == 0, again.stderr
    changed = run_cli(*SHORT, f"output_root={tmp_path}", "pipeline.steps=[]", "reconstruct.num_images=15", check=False)
    assert changed.returncode != 0 and "reconstruct.num_images: 16 -> 15" in changed.stderr


def test_a_run_can_take_the_tokenizer_another_run_trained(tmp_path):
    missing = run_cli(*SHORT, f"output_root={tmp_path}", "name=dit", "pipeline.tokenizer_run=smoke", check=False)
    assert missing.returncode != 0 and "pipeline.tokenizer_run=smoke" in missing.stderr
    assert "Traceback" not in missing.stderr
    run_cli(*SHORT, f"output_root={tmp_path}", "pipeline.steps=[tokenizer]")
    source = tmp_path / "pipeline" / "smoke"
    # a longer DiT on that tokenizer: the command's own tokenizer settings give way to the run's
    other_data = run_cli(*SHORT, f"output_root={tmp_path}", "name=dit", "pipeline.tokenizer_run=smoke",
                         "data.resolution=64", check=False)
    assert other_data.returncode != 0 and "data.resolution: 32 -> 64" in other_data.stderr
    took = run_cli(*SHORT, f"output_root={tmp_path}", "name=dit", "pipeline.tokenizer_run=smoke",
                   "pipeline.steps=[tokenizer,reconstruct,cache,ldm]", "tokenizer.train.steps=7", "ldm.train.steps=30")
    assert "takes that run's tokenizer settings (tokenizer.train.steps: 7 -> 20)" in took.stderr
    root = tmp_path / "pipeline" / "dit"
    assert not (root / "tokenizer").exists()  # nothing was trained again
    checkpoint = finished_result(source / "tokenizer")["checkpoint"]
    assert finished_result(root / "reconstruct")["checkpoint"] == checkpoint
    dit = load_weights(finished_result(root / "ldm")["checkpoint"], mmap=True)
    assert dit["config"]["tokenizer_checkpoint"] == checkpoint
    report = json.loads((root / "report.json").read_text())
    assert report["tokenizer"]["train_steps"] == 20 and report["ldm"]["train_steps"] == 30
    assert "tokenizer_run: smoke" in (root / "pipeline_config.yaml").read_text()
    # another source is another run: the folder refuses it
    run_cli(*SHORT, f"output_root={tmp_path}", "name=other", "pipeline.steps=[tokenizer]", "seed=1")
    changed = run_cli(*SHORT, f"output_root={tmp_path}", "name=dit", "pipeline.tokenizer_run=other",
                      "pipeline.steps=[reconstruct]", check=False)
    assert changed.returncode != 0 and "different config" in changed.stderr
    # a run that trained its own tokenizer cannot swap it for another under its finished steps
    swapped = run_cli(*SHORT, f"output_root={tmp_path}", "name=other", "pipeline.tokenizer_run=smoke", "seed=1",
                      check=False)
    assert swapped.returncode != 0 and "trained a tokenizer of its own" in swapped.stderr
