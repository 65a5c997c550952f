"""The stages end to end at tiny scale: tokenizer → reconstruct → cache → ldm (also under DeepSpeed) → sample."""
import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from shared.data.image_files import open_images
from shared.data.latents import LatentCache
from shared.runtime import finished_result
from shared.train.backends import DEEPSPEED_GLOBALS
from shared.train.checkpoint import CheckpointDir, load_checkpoint, refuse_code_in
from stage1_tokenizer.reconstruct import reconstruct
from stage1_tokenizer.tokenizer import load_tokenizer
from stage1_tokenizer.train import train_tokenizer
from stage2_ldm.cache import main as cache_main
from stage2_ldm.dit import load_dit
from stage2_ldm.train import train_ldm
from tests.helpers import load_config, run_cli

TINY = ["experiment=smoke", "data.train_size=96", "data.val_size=16", "tokenizer.train.steps=12",
        "tokenizer.train.batch_size=8", "tokenizer.train.sample_every=6", "tokenizer.train.ckpt_every=6",
        "tokenizer.train.log_every=3", "tokenizer.loss.disc_start=4", "ldm.train.steps=6", "ldm.train.batch_size=16",
        "ldm.train.log_every=2", "ldm.train.ckpt_every=3", "ldm.train.sample_every=0", "cache.shard_size=64",
        "sample.steps=4", "decode.nfe=1", "reconstruct.num_images=16", "reconstruct.grid_images=8"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny tokenizer trained for a few steps and the latent cache of its training split."""
    root = tmp_path_factory.mktemp("stages")
    cfg = load_config(["stage=tokenizer", *TINY], output_root=root)
    checkpoint = Path(train_tokenizer(cfg, run_dir=root / "tokenizer")["checkpoint"])
    cache_cfg = load_config(["stage=cache", *TINY, f"tokenizer.checkpoint={checkpoint}",
                             f"cache.dir={root / 'cache'}"], output_root=root)
    cache_main(cache_cfg)
    return {"root": root, "tokenizer": checkpoint, "cache": root / "cache"}


@pytest.mark.slow
def test_tokenizer_run_leaves_checkpoints_grids_and_metrics(trained):
    run = trained["root"] / "tokenizer"
    assert CheckpointDir(run / "checkpoints").steps() == [6, 12]
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == ["recon_0000006.png", "recon_0000012.png"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [3, 6, 9, 12]
    assert "disc/loss" in json.dumps(rows[-1]) or any(key.startswith("disc") for key in rows[-1])
    assert finished_result(run)["checkpoint"] == str(trained["tokenizer"])  # the stage's result, then its marker
    checkpoint = load_checkpoint(run)
    assert checkpoint["step"] == 12 and set(checkpoint["models"]) == {"tokenizer", "discriminator"}


@pytest.mark.slow
def test_trained_tokenizer_loads_and_decodes_a_resolution_it_was_not_trained_on(trained):
    tokenizer = load_tokenizer(trained["tokenizer"], "cpu")
    images = torch.rand(2, 3, 48, 48) * 2 - 1  # trained at 32 px
    decoded = tokenizer.decode(tokenizer.encode(images).mode(), nfe=2)
    assert decoded.shape == images.shape and decoded.abs().max() <= 1


@pytest.mark.slow
def test_reconstruct_reports_metrics_and_grid(trained):
    cfg = load_config(["stage=reconstruct", *TINY], output_root=trained["root"])
    metrics = reconstruct(cfg, trained["tokenizer"], run_dir=trained["root"] / "reconstruct")
    assert metrics["num_images"] == 16 and metrics["decoder_nfe"] == 1
    assert np.isfinite(metrics["rfid"]) and metrics["rfid"] > 0
    assert 0 < metrics["psnr"] < 100 and -1 <= metrics["ssim"] <= 1 and metrics["lpips"] > 0
    assert (trained["root"] / "reconstruct" / "reconstructions_nfe1.png").is_file()
    assert finished_result(trained["root"] / "reconstruct") == metrics


@pytest.mark.slow
def test_cache_holds_every_training_image_and_its_flip(trained):
    cache = LatentCache(trained["cache"], "train")
    assert len(cache) == 96 and cache.latent_shape == (4, 8, 8)
    assert cache.num_classes == 10


@pytest.fixture
def single_process_group_cleanup():
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.slow
def test_ldm_trains_under_deepspeed_in_one_cpu_process_and_loads_without_it(trained, monkeypatch,
                                                                              single_process_group_cleanup):
    pytest.importorskip("deepspeed")  # the distributed extra
    # DeepSpeed compiles a shared-memory all-reduce for multi-process CPU runs on first use (minutes);
    # one process never uses it.
    monkeypatch.setattr(importlib.import_module("deepspeed.comm.torch"), "build_shm_op", lambda: None)
    cfg = load_config(["stage=ldm", *TINY, "launcher=deepspeed", f"tokenizer.checkpoint={trained['tokenizer']}"],
                      output_root=trained["root"])
    result = train_ldm(cfg, trained["cache"], trained["tokenizer"], run_dir=trained["root"] / "ldm_deepspeed")
    checkpoint = Path(result["checkpoint"])
    assert (checkpoint.parent / "deepspeed" / "step_000000006").is_dir()
    refuse_code_in(checkpoint.parent / "deepspeed", DEEPSPEED_GLOBALS)  # DeepSpeed's own files pass the scan
    dist.destroy_process_group()
    dit, config = load_dit(checkpoint, "cpu")
    assert config["in_channels"] == 4 and config["num_classes"] == 10
    raw = load_checkpoint(checkpoint)
    for name, tensor in dit.state_dict().items():
        torch.testing.assert_close(tensor, raw["ema"]["dit"][name])


@pytest.mark.slow
def test_sample_stage_writes_pngs_grid_npz_and_throughput(trained):
    cfg = load_config(["stage=ldm", *TINY, f"tokenizer.checkpoint={trained['tokenizer']}"], output_root=trained["root"])
    result = train_ldm(cfg, trained["cache"], trained["tokenizer"], run_dir=trained["root"] / "ldm")
    checkpoint = Path(result["checkpoint"])
    # The smoke preset's by-name tokenizer (tokenizer/sampled) does not exist: the error names the DiT's own.
    wrong = run_cli("stage=sample", *TINY, f"ldm.checkpoint={checkpoint.parent.parent}", f"output_root={trained['root']}",
                    "name=sampled", "progress=false", check=False)
    assert wrong.returncode != 0 and f"pass tokenizer.checkpoint={trained['tokenizer']}" in wrong.stderr
    result = run_cli("stage=sample", *TINY, f"ldm.checkpoint={checkpoint.parent.parent}",
                     f"tokenizer.checkpoint={trained['tokenizer']}", "sample.num_per_class=2",
                     f"output_root={trained['root']}", "name=sampled", "wandb.mode=disabled", "progress=false")
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert metrics["num_samples"] == 20 and metrics["steps"] == 4 and metrics["decoder_nfe"] == 1
    assert all(metrics["images_per_s"][part] > 0 for part in ("ldm", "decode", "total"))
    run = trained["root"] / "sample" / "sampled"
    with np.load(run / "samples.npz") as npz:
        assert npz["arr_0"].shape == (20, 32, 32, 3) and npz["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(npz["arr_1"], np.repeat(np.arange(10), 2))
        pngs = open_images(run / "images")
        np.testing.assert_array_equal(pngs.read(0, 20).permute(0, 2, 3, 1).numpy(), npz["arr_0"])
    assert (run / "grid.png").is_file()


def test_throughput_is_the_median_over_full_batches_with_its_range():
    from stage2_ldm.sample import throughput

    timings = [{"images": 10, "ldm": ldm, "decode": 1.0} for ldm in (1.0, 4.0, 2.0)]
    timings.append({"images": 3, "ldm": 0.01, "decode": 0.01})  # a short last batch would look fastest
    speed = throughput(timings)
    assert speed["timed_batches"] == 3
    assert speed["ldm"] == pytest.approx(5.0) and speed["range"]["ldm"] == pytest.approx([2.5, 10.0])
    assert speed["decode"] == pytest.approx(10.0)
    assert speed["total"] == pytest.approx(10 / 3) and speed["range"]["total"] == pytest.approx([2.0, 5.0])
    assert throughput([{"images": 3, "ldm": 1.0, "decode": 2.0}])["total"] == pytest.approx(1.0)
