"""stage=convergence: the dgae32 preset, and a tiny DiT convergence study end to end."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
from omegaconf import OmegaConf

from pipelines.configs import group_config
from pipelines.convergence import decoder_floor, reference_centroids, render
from pipelines.reproduce import run_config
from shared.data.subsets import evaluation_subset
from shared.errors import ConfigError
from shared.metrics.fid import feature_statistics
from shared.runtime import finished_result
from shared.train.checkpoint import CheckpointDir
from tests.helpers import run_cli, tiny_preset_command


def test_dgae32_compares_half_channels_at_fair32s_recipe_and_trains_fair32s_tokenizers_itself():
    dgae, fair = group_config("reproduce", "dgae32"), group_config("reproduce", "fair32")
    rows = {entry["slug"]: entry for entry in dgae["tokenizers"]}
    configs = {slug: run_config(dgae, "dgae32", entry, [], 0) for slug, entry in rows.items()}
    assert all(cfg.pipeline.tokenizer_run is None for cfg in configs.values())  # every row trains here
    fair_rows = {entry["slug"]: entry for entry in fair["tokenizers"]}
    for slug in ("vae_f4", "epsvae_f4"):  # with the tokenizer settings of fair32's rows
        assert run_config(fair, "fair32", fair_rows[slug], [], 0).tokenizer == configs[slug].tokenizer
    assert [configs[slug].tokenizer.latent_channels for slug in rows] == [4, 4, 2, 2]
    assert configs["dgae_f4x2"].tokenizer.kind == "dgae" and configs["dgae_f4x2"].tokenizer.loss.adversarial == 0
    for slug in ("epsvae_f4x2", "dgae_f4x2"):
        assert (configs[slug].tokenizer.flow.gamma, configs[slug].tokenizer.flow.grid) == (1.0, "uniform")
    assert {cfg.ldm.train.steps for cfg in configs.values()} == {2400}
    assert list(configs["dgae_f4x2"].ldm.train.keep_steps) == [300, 600, 1200, 2400]
    kept = {name for name, roles in dgae["claims"].items() if roles is not None}
    assert kept == {"dgae_design", "half_channels_vs_vae", "half_channels_vs_epsvae"}
    assert all(dgae["claims"][name]["margin"]["psnr"] == 0.5 for name in kept - {"dgae_design"})


def test_dit_long32_trains_fair32s_dit_longer_on_a_vae_f4_trained_as_fair32s_and_samples_with_guidance():
    long, fair = group_config("reproduce", "dit_long32"), group_config("reproduce", "fair32")
    dgae = group_config("reproduce", "dgae32")
    (entry,) = long["tokenizers"]
    cfg = run_config(long, "dit_long32", entry, [], 0)
    assert long["convergence"] == []
    # the tokenizer it takes is dgae32's seed-0 VAE f4×4, trained with fair32's VAE f4 settings on the same data
    dgae_vae = next(row for row in dgae["tokenizers"] if row["slug"] == "vae_f4")
    taken = run_config(dgae, "dgae32", dgae_vae, [], 0)
    assert cfg.pipeline.tokenizer_run == taken.name
    fair_vae = next(row for row in fair["tokenizers"] if row["slug"] == "vae_f4")
    assert run_config(fair, "fair32", fair_vae, [], 0).tokenizer == taken.tokenizer == cfg.tokenizer
    assert taken.data == cfg.data and taken.seed == cfg.seed
    assert cfg.ldm.train.steps == 32 * fair["common"]["ldm.train.steps"] == cfg.ldm.train.keep_steps[-1]
    assert cfg.sample.cfg_scale == 4.0 and cfg.ldm.depth == run_config(fair, "fair32", fair_vae, [], 0).ldm.depth


@pytest.mark.slow
def test_a_tiny_convergence_study_measures_every_kept_dit_checkpoint(tmp_path):
    command, out = tiny_preset_command(tmp_path, "convergence", "tiny_conv", """
experiment: smoke
common: {data.train_size: 64, data.val_size: 10, tokenizer.train.steps: 3, tokenizer.train.batch_size: 8,
         tokenizer.train.sample_every: 100, tokenizer.train.ckpt_every: 100, ldm.train.steps: 4,
         ldm.train.keep_steps: [2, 4], ldm.train.batch_size: 8, ldm.train.log_every: 1, ldm.train.sample_every: 100,
         ldm.train.ckpt_every: 100, ldm.train.ema_decay: 0.0, ldm.train.lr: 0.01, sample.num_per_class: 1,
         sample.steps: 2, decode.nfe: 1, decode.batch_size: 10,
         evaluate.reference_images: 20, evaluate.bootstrap: 20, reconstruct.num_images: 10}
tokenizers:
  - {label: "VAE", slug: vae, tokenizer: vae_tiny, seeds: [0], overrides: []}
  - {label: "DGAE", slug: dgae, tokenizer: dgae_tiny, seeds: [0], overrides: []}
  - {label: "VAE again", slug: again, tokenizer: vae_tiny, seeds: [0], overrides: [],
     tokenizer_run: "reproduce_tiny_conv_vae_s{seed}"}
convergence:
  - {baseline: vae, ours: dgae}
  - {baseline: vae, ours: again}
""")
    run_cli(*command, timeout=1800)
    results = json.loads((out / "convergence.json").read_text())
    for slug in ("vae", "dgae", "again"):
        folder = tmp_path / "pipeline" / f"reproduce_tiny_conv_{slug}_s0"
        assert CheckpointDir(folder / "ldm" / "checkpoints").steps() == [2, 4]  # both kept; ckpt_every divides none
        for steps in (2, 4):
            assert finished_result(folder / f"dit_{steps}_sample")["num_samples"] == 10
            assert finished_result(folder / f"dit_{steps}_evaluate")["fid"] > 0
    again = tmp_path / "pipeline" / "reproduce_tiny_conv_again_s0"
    assert not (again / "tokenizer").exists()  # the VAE run's tokenizer, not trained again
    rows = {row["slug"]: row for row in results["rows"]}
    assert [m["steps"] for m in rows["dgae"]["measurements"]] == [2, 4]
    # each checkpoint sampled its own DiT (an EMA of decay 0 and lr 0.01: four steps move the samples)
    assert len({m["gfid"] for m in rows["dgae"]["measurements"]}) == 2
    assert all(m["loss"] > 0 and m["gfid_ci95"][0] <= m["gfid"] <= m["gfid_ci95"][1]
               for row in rows.values() for m in row["measurements"])
    first, same = results["comparisons"]
    assert (first["ours"], first["baseline"]) == ("dgae", "vae")
    assert first["level"] == pytest.approx(rows["vae"]["measurements"][-1]["gfid"])
    # the same tokenizer, DiT settings and seed: the same DiT, which needs the baseline's steps exactly
    assert [m["gfid"] for m in rows["again"]["measurements"]] == pytest.approx(
        [m["gfid"] for m in rows["vae"]["measurements"]])
    assert same["ratio"] == pytest.approx(1.0) and same["verdict"] == "inconclusive" and same["reached"] == 1.0
    # each row's decoder floor: the floor's validation images through its own tokenizer, reconstructed in its folder
    for slug in ("vae", "dgae", "again"):
        folder = tmp_path / "pipeline" / f"reproduce_tiny_conv_{slug}_s0"
        assert finished_result(folder / "reconstruct")["subset"] == results["real_data_floor"]["subset"]
    assert rows["again"]["decoder_floor"] == rows["vae"]["decoder_floor"]  # the same decoder of the same images
    assert rows["dgae"]["decoder_floor"]["fid"] != rows["vae"]["decoder_floor"]["fid"]
    # the class probe: every checkpoint's samples and every row's decodes, against the real images' share
    assert all(0 <= m["recognised"]["share"] <= 1 and m["recognised"]["n"] == 10
               for row in rows.values() for m in row["measurements"])
    assert rows["again"]["decoder_floor"]["recognised"] == rows["vae"]["decoder_floor"]["recognised"]
    table = (out / "convergence.md").read_text()
    assert "| DGAE vs VAE |" in table and "Floor:" in table and (out / "convergence.png").is_file()
    assert "Do the samples show their class?" in table
    assert all((out / f"samples_{slug}_{steps}.png").is_file() for slug in rows for steps in (2, 4))
    # reproduce.train=false measures what exists, training nothing, with the same numbers
    rerun = run_cli(*command, "reproduce.train=false", timeout=600)
    assert "== " not in rerun.stdout
    assert json.loads((out / "convergence.json").read_text())["comparisons"] == results["comparisons"]


def test_the_table_names_its_sampler_and_leaves_out_the_comparison_section_when_the_preset_has_none():
    measurements = [{"steps": steps, "gfid": gfid, "gfid_ci95": [gfid - 3, gfid + 3], "loss": 0.8}
                    for steps, gfid in ((1200, 150.0), (2400, 120.0))]
    rows = [{"label": "VAE f4", "slug": "vae_f4", "compression": "4×8×8", "measurements": measurements,
             "decoder_floor": {"fid": 109.3, "fid_ci95": [105.8, 112.8]}}]
    meta = {"preset": "long", "command": "run.py", "machine": "cpu", "date": "2026-12-05", "wall_minutes": 1.0,
            "budgets": [1200, 2400, 4800], "measured_steps": [1200, 2400], "partial": True, "samples": 500,
            "sampling": "euler sampler, 25 steps, guidance 4, decoder NFE 3", "dit": "depth 6"}
    floor = {"num_images": 500, "fid": 61.4, "fid_ci95": [58.0, 64.9]}
    alone = render(rows, [], floor, meta)
    assert "guidance 4" in alone and "**Partial**: the DiTs have not reached 4,800 steps yet." in alone
    assert "How much of the baseline" not in alone and "samples_vae_f4_2400.png" in alone
    assert "| VAE f4 | 4×8×8 | 109.3 [105.8, 112.8] | 150.0 [147.0, 153.0] / 0.8000 |" in alone
    assert "Do the samples show their class?" not in alone  # no probe measured
    probe = lambda share: {"share": share, "ci95": [share - 0.04, share + 0.04], "n": 500,  # noqa: E731
                           "per_class": [share] * 10}
    rows[0]["decoder_floor"].update(recognised=probe(0.62), originals_recognised=probe(0.81))
    for measurement, share in zip(measurements, (0.3, 0.5)):
        measurement["recognised"] = probe(share)
    probed = render(rows, [], floor, meta)
    assert "Chance is 10%; the floor's 500 real validation images score 81% [77%, 85%]" in probed
    assert "| VAE f4 | 62% [58%, 66%] | 30% [26%, 34%] | 50% [46%, 54%] |" in probed
    versus = {"ours": "vae_f4", "baseline": "vae_f4", "level": 120.0, "steps": 2400.0, "at_first_budget": False,
              "baseline_steps": 2400.0, "ratio": 1.0, "ratio_ci95": [0.8, 1.3], "reached": 0.6,
              "verdict": "inconclusive"}
    compared = render(rows, [versus], floor, meta)
    assert "How much of the baseline" in compared and "| VAE f4 vs VAE f4 | 120.0 |" in compared
    assert "the verdicts will change" in compared


def test_the_decoder_floor_scores_the_decoded_floor_images_against_the_reference_and_refuses_other_images(tmp_path):
    features = np.random.default_rng(0).normal(size=(300, 2048))  # the reference's images' Inception features
    mu, sigma = feature_statistics(features)
    np.savez(tmp_path / "reference.npz", mu=mu, sigma=sigma)
    subset = {"split": "val", "images": 300, "seed": 0, "indices_sha256": "ab"}
    folder = tmp_path / "reconstruct"
    folder.mkdir()
    # a decoder that returns every image shifted by 0.5 in each feature: FID |Δμ|² = 2048 × 0.25, Σ unchanged
    np.savez(folder / "per_image_nfe3.npz", index=np.arange(300), fake_features=features + 0.5, real_features=features)
    reconstruction = {"subset": subset, "decoder_nfe": 3}
    ran = []
    data = {"kind": "synthetic", "resolution": 8, "num_classes": 3, "train_size": 30, "val_size": 300}
    pipeline = SimpleNamespace(cfg=OmegaConf.create({"evaluate": {"bootstrap": 4, "subset_seed": 0}, "data": data,
                                                     "reconstruct": {"split": "val"}}),
                               folder=lambda step: tmp_path / step, run_reconstruct=None,
                               run_step=lambda step, run: ran.append(step) or reconstruction)
    floor = decoder_floor(pipeline, {"subset": subset}, str(tmp_path / "reference.npz"), None)
    assert ran == ["reconstruct"] and floor["decoder_nfe"] == 3 and "recognised" not in floor
    assert floor["fid"] == pytest.approx(512.0, rel=1e-3) and floor["fid_ci95"][0] < floor["fid_ci95"][1]
    with pytest.raises(ConfigError, match="reconstruct.num_images"):
        decoder_floor(pipeline, {"subset": {**subset, "images": 500}}, str(tmp_path / "reference.npz"), None)
    # with class centroids: a decoder that moves image i (synthetic label i mod 3) far toward its class's centroid
    centroids = np.eye(3, 2048) * 20.0
    labels = np.arange(300) % 3
    np.savez(folder / "per_image_nfe3.npz", index=np.arange(300), fake_features=features + centroids[labels],
             real_features=features)
    probed = decoder_floor(pipeline, {"subset": subset}, str(tmp_path / "reference.npz"), centroids)
    assert probed["recognised"]["share"] == 1.0 and probed["recognised"]["n"] == 300
    low, high = probed["originals_recognised"]["ci95"]  # the originals' features ignore their class: chance
    assert low < 1 / 3 < high


def test_class_centroids_come_from_the_reference_features_of_the_evaluate_settings_labelled_images(tmp_path):
    data = {"kind": "synthetic", "resolution": 8, "num_classes": 3, "train_size": 30, "val_size": 9}
    cfg = OmegaConf.create({"data": data, "evaluate": {"reference_split": "train", "reference_images": None,
                                                       "subset_seed": 0}})
    features = np.eye(3, 16)[np.arange(30) % 3] * 5.0  # synthetic image i has label i mod 3
    record = {"split": "train", "images": 30, "of": 30, "selection": "all"}
    np.savez(tmp_path / "reference.npz", features=features, subset=np.array(json.dumps(record)))
    assert reference_centroids(cfg, str(tmp_path / "reference.npz")) == pytest.approx(np.eye(3, 16) * 5.0)
    other = {**record, "selection": "class-stratified random subset"}  # features of other images: no labels known
    np.savez(tmp_path / "other.npz", features=features, subset=np.array(json.dumps(other)))
    np.savez(tmp_path / "bare.npz", mu=features.mean(0))  # a reference with statistics only
    assert reference_centroids(cfg, str(tmp_path / "other.npz")) is None
    assert reference_centroids(cfg, str(tmp_path / "bare.npz")) is None
    two = OmegaConf.merge(cfg, {"evaluate": {"reference_images": 2}})  # 2 images of 3 classes: one has no centroid
    record = {**evaluation_subset(data, "train", 2, 0).record(), "images": 2}
    np.savez(tmp_path / "two.npz", features=features[:2], subset=np.array(json.dumps(record)))
    assert reference_centroids(two, str(tmp_path / "two.npz")) is None
