"""The evaluation at scale on a tiny run: gFID during training (ldm.train.fid_every), and stage=sample's shards,
which a killed run resumes from and any number of processes writes alike."""
import contextlib
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from shared import runtime as runtime_lib
from shared.errors import ConfigError
from shared.metrics.evaluate import evaluate_samples, resolve_reference
from shared.train.checkpoint import load_checkpoint
from shared.train.ema import EMA
from stage1_tokenizer.tokenizer import load_tokenizer
from stage2_ldm import sample as sample_lib
from stage2_ldm.dit import load_dit
from stage2_ldm.train import train_ldm, training_fid
from tests.helpers import load_config, tiny_tokenizer_and_cache

TINY = ["experiment=smoke", "data.train_size=64", "data.val_size=16", "tokenizer.train.steps=2",
        "tokenizer.train.batch_size=8", "tokenizer.train.sample_every=0", "tokenizer.train.ckpt_every=2",
        "ldm.train.steps=4", "ldm.train.batch_size=16", "ldm.train.log_every=2", "ldm.train.ckpt_every=2",
        "ldm.train.sample_every=0", "ldm.train.fid_every=2", "ldm.train.fid_samples=12", "cache.shard_size=64",
        "sample.steps=2", "sample.batch_size=4", "sample.shard_size=8", "sample.num_per_class=2", "decode.nfe=1",
        "evaluate.reference_images=20", "evaluate.bootstrap=20"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny tokenizer, its latent cache and a DiT trained with a gFID every 2 steps."""
    root = tmp_path_factory.mktemp("gfid")
    tokenizer, _ = tiny_tokenizer_and_cache(root, TINY)
    cfg = load_config(["stage=ldm", *TINY, f"tokenizer.checkpoint={tokenizer}"], root)
    ldm = Path(train_ldm(cfg, root / "cache", tokenizer, run_dir=root / "ldm")["checkpoint"])
    return {"root": root, "tokenizer": tokenizer, "ldm": ldm, "cfg": cfg}


@pytest.mark.slow
def test_the_gfid_during_training_goes_into_metrics_with_its_spread_and_is_reproducible(run):
    rows = [json.loads(line) for line in (run["root"] / "ldm" / "metrics.jsonl").read_text().splitlines()]
    fids = {row["step"]: row for row in rows if "gfid" in row}
    assert sorted(fids) == [2, 4]
    assert all(row["gfid"] > 0 and row["gfid_std"] > 0 and row["gfid_samples"] == 12 for row in fids.values())
    # The EMA DiT of step 4's checkpoint, evaluated again from scratch: the same samples, so the same gFID.
    with runtime_lib.setup(run["cfg"], run_dir=run["root"] / "again") as runtime:
        _, config = load_dit(run["ldm"], "cpu")
        evaluate = training_fid(run["cfg"], config, runtime)
        dit, _ = load_dit(run["ldm"], "cpu", use_ema=True)
        again = evaluate(4, EMA(dit, 0.9))
    assert load_checkpoint(run["ldm"])["step"] == 4
    assert again == {key: fids[4][key] for key in ("gfid", "gfid_std", "gfid_samples")}


def sample_config(run, *overrides):
    return load_config(["stage=sample", *TINY, *overrides], run["root"])


def sample(run, folder, *overrides):
    return sample_lib.sample_to_folder(sample_config(run, *overrides), run["ldm"], run["tokenizer"],
                                       out_dir=run["root"] / folder)


@pytest.mark.slow
def test_a_killed_sampling_resumes_from_its_shards_and_ends_with_the_uninterrupted_samples_and_gfid(run, monkeypatch):
    whole = sample(run, "whole")
    assert sorted(p.name for p in (run["root"] / "whole" / "shards").glob("*.npz")) == [
        "shard_000000.npz", "shard_000001.npz", "shard_000002.npz"]  # 20 samples, 8 per shard
    written = []
    real_write = sample_lib.write_npz

    def killed_in_the_second_shard(path, images, labels):
        if written:
            raise KeyboardInterrupt("killed")
        written.append(path)
        return real_write(path, images, labels=labels)

    monkeypatch.setattr(sample_lib, "write_npz", killed_in_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        sample(run, "killed")
    assert not (run["root"] / "killed" / "samples.npz").exists()
    monkeypatch.setattr(sample_lib, "write_npz", real_write)
    resumed = sample(run, "killed")
    drawn = [line for line in (run["root"] / "killed" / "log.txt").read_text().splitlines() if "shards to draw" in line]
    assert [line.split("INFO ")[1] for line in drawn] == ["3 of 3 sample shards to draw (8 images each)",
                                                          "2 of 3 sample shards to draw (8 images each)"]
    assert resumed["images_per_s"]["timed_batches"] == 3  # the two missing shards' batches: 2 + 1
    with np.load(whole["samples"]) as a, np.load(resumed["samples"]) as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
    reference = resolve_reference(run["cfg"], torch.device("cpu"), {})
    gfids = [evaluate_samples(result["samples"], reference["mu"], reference["sigma"], "cpu", bootstrap=20)[0]
             for result in (whole, resumed)]
    assert gfids[0] == gfids[1]
    with pytest.raises(ConfigError, match=r"drawn with other settings \(cfg_scale: 1.0 -> 2.0\)"):
        sample(run, "killed", "sample.cfg_scale=2.0")


@pytest.mark.slow
def test_two_processes_write_the_shards_one_process_writes(run):
    """Each process draws its own shards (0 and 2, then 1) into the one folder; the joined samples are those of a
    single process. (The processes run one after the other here; tests/test_multi_process.py runs them at once.)"""
    whole = run["root"] / "whole"
    if not (whole / "samples.npz").is_file():
        sample(run, "whole")
    cfg = sample_config(run)
    dit, config = load_dit(run["ldm"], "cpu")
    drawer = sample_lib.SampleDrawer(dit, config, load_tokenizer(run["tokenizer"], "cpu"),
                                     sampling=sample_lib.sampling_options(cfg.sample), nfe=cfg.decode.nfe,
                                     device=torch.device("cpu"), autocast=contextlib.nullcontext)
    labels = sample_lib.labels_to_sample(cfg.sample, config["num_classes"], None)
    folder = run["root"] / "two_processes"
    for rank in (1, 0):
        process = SimpleNamespace(rank=rank, world_size=2, is_main=rank == 0, log=logging.getLogger("test"))
        sample_lib.draw_shards(drawer, labels, seed=cfg.seed, batch_size=4, shard_batches=2, folder=folder,
                               save_png=False, runtime=process, progress=False)
    joined = sample_lib.join_shards(folder, labels, 3, folder / "samples.npz")
    with np.load(whole / "samples.npz") as a, np.load(joined) as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
