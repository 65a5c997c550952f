"""stage=reproduce: the presets load, the claims are computed from the rows the preset names, outputs."""
import json
import shlex

import numpy as np
import pytest

from pipelines import claims as claims_lib
from pipelines import reproduce
from pipelines.configs import group_config
from shared.errors import ConfigError
from shared.metrics.fid import save_statistics
from shared.runtime import finished_result
from tests.helpers import load_config, run_cli, tiny_preset_command


def row(tmp_path, slug, psnr_offset, sample_shift, total, rfid_by_nfe, reference="reference.npz"):
    """A result row whose per-image reconstruction metrics and sample features are files, as a run writes them:
    PSNR = base + psnr_offset per image, sample features N(sample_shift, 1) against an N(0, 1) reference."""
    rng = np.random.default_rng(sum(map(ord, slug)))  # hash() of a str changes per process
    base = np.random.default_rng(0)  # the same validation images for every row
    real = base.normal(size=(60, 8))
    np.savez(tmp_path / f"{slug}_per_image.npz", index=np.arange(60), psnr=20 + base.normal(size=60) + psnr_offset,
             ssim=np.full(60, 0.5), lpips=0.2 + 0.01 * rng.normal(size=60), real_features=real,
             fake_features=real + 0.1 * rng.normal(size=(60, 8)))
    np.save(tmp_path / f"{slug}_features.npy", rng.normal(sample_shift, 1.0, size=(80, 8)))
    return {"label": slug.upper(), "slug": slug, "compression": "f8×4", "latent_shape": [4, 8, 8], "gfid": 1.0,
            "gfid_ci95": [0.5, 1.5], "rfid": 1.0, "rfid_ci95": [0.8, 1.2], "psnr": 20.0, "psnr_ci95": [19.5, 20.5],
            "lpips": 0.1, "lpips_ci95": None,
            "images_per_s": {"ldm": 2 * total, "decode": 2 * total, "total": total,
                             "range": {"total": [0.95 * total, 1.05 * total]}},
            "rfid_by_nfe": rfid_by_nfe, "generation_settings": {"num_samples": 80},
            "reconstruction_subset": {"images": 60, "of": 100, "split": "val", "selection": "all"},
            "wall_seconds": {"ldm": 1.0},
            "files": {"per_image": str(tmp_path / f"{slug}_per_image.npz"),
                      "sample_features": str(tmp_path / f"{slug}_features.npy"),
                      "reference": str(tmp_path / reference)}}


@pytest.fixture
def rows(tmp_path):
    save_statistics(tmp_path / "reference.npz", np.zeros(8), np.eye(8))
    return {"vae": row(tmp_path, "vae", 0.0, 0.6, 10.0, {"3": 5.0}),
            "eps8": row(tmp_path, "eps8", 2.0, 0.0, 9.0, {"1": 6.0, "3": 4.0}),
            "eps16": row(tmp_path, "eps16", -3.0, 0.6, 30.0, {"1": 8.0, "3": 7.0})}


SPEC = {"equal_compression": {"baseline": "vae", "ours": "eps8"}, "speedup": {"baseline": "vae", "ours": "eps16"}}


@pytest.mark.parametrize("name", ["mini", "mini_long", "paper", "small32"])
def test_presets_name_four_tokenizers_and_the_claim_rows(name):
    preset = group_config("reproduce", name)
    slugs = [entry["slug"] for entry in preset["tokenizers"]]
    assert len(slugs) == len(set(slugs)) >= 4
    for claim in preset["claims"].values():
        assert claim["baseline"] in slugs and claim["ours"] in slugs


def test_fair32_trains_the_headline_pair_with_three_seeds_and_names_rows_for_every_claim():
    preset = group_config("reproduce", "fair32")
    rows = {entry["slug"]: entry for entry in preset["tokenizers"]}
    assert rows["vae_f4"]["seeds"] == rows["epsvae_f4"]["seeds"] == [0, 1, 2]
    claims = preset["claims"]
    named = [claims["equal_compression"], claims["speedup"], claims["resolution"],
             *claims["compression_trend"].values()]
    assert all(roles["baseline"] in rows and roles["ours"] in rows for roles in named)
    assert claims["resolution"]["resolution"] in preset["resolution_sweep"]
    assert preset["common"]["tokenizer.loss.lpips"] == 0.5 and preset["common"]["tokenizer.loss.lpips_net"] == "vgg"


def test_a_preset_that_extends_another_changes_only_the_settings_it_names():
    base, longer = group_config("reproduce", "mini"), group_config("reproduce", "mini_long")
    assert longer["tokenizers"] == base["tokenizers"] and longer["claims"] == base["claims"]
    assert longer["common"] == {**base["common"], "tokenizer.train.steps": 900, "tokenizer.loss.disc_start": 225,
                                "tokenizer.train.ckpt_every": 300, "tokenizer.train.sample_every": 450}
    cfg = reproduce.run_config(longer, "mini_long", longer["tokenizers"][0], ["seed=3"])
    assert cfg.tokenizer.train.steps == 900 and cfg.ldm.depth == group_config("ldm", "dit_mini")["depth"]
    assert cfg.seed == 3 and cfg.name == "reproduce_mini_long_vae_f8"


def test_common_settings_become_the_overrides_hydra_reads():
    assert reproduce.as_overrides({"ldm": "dit_mini", "a.b": [1, 2, 2, 4], "flag": True, "none": None, "lr": 1e-3}) \
        == ["ldm=dit_mini", "a.b=[1,2,2,4]", "flag=true", "none=null", "lr=0.001"]


def test_claims_are_computed_from_the_intervals_of_the_named_rows(rows):
    claims = {(c["claim"], c["metric"]): c for c in claims_lib.claims(rows, SPEC, resamples=50)}
    assert set(claims) == {("equal_compression", m) for m in ("rfid", "psnr", "lpips", "gfid")} | {
        ("speedup", "throughput"), ("speedup", "gfid")}
    psnr = claims[("equal_compression", "psnr")]
    assert psnr["estimate"] == pytest.approx(2.0) and psnr["ci95"][0] > 0 and psnr["verdict"] == "reproduced"
    # eps8's samples sit on the reference, the VAE's are shifted: lower gFID, an interval below zero
    assert claims[("equal_compression", "gfid")]["verdict"] == "reproduced"
    assert claims[("equal_compression", "lpips")]["verdict"] == "inconclusive"  # the same LPIPS up to noise
    speed = claims[("speedup", "throughput")]
    assert speed["estimate"] == pytest.approx(3.0) and speed["ci95"] == pytest.approx([28.5 / 10.5, 31.5 / 9.5])
    assert speed["verdict"] == "reproduced"
    assert claims[("speedup", "gfid")]["verdict"] == "inconclusive"  # both sample sets shifted alike
    slower = {**rows, "eps16": {**rows["eps16"], "images_per_s": {
        "total": 5.0, "range": {"total": [4.0, 6.0]}}}}
    assert [c["verdict"] for c in claims_lib.claims(slower, {"speedup": SPEC["speedup"]}, resamples=20)
            if c["metric"] == "throughput"] == ["contradicted"]
    assert claims_lib.claims(rows, {"speedup": {"baseline": "vae", "ours": "missing"}}) == []


def seeded_row(tmp_path, slug, seed_offsets, *, resolution_offset=0.0):
    """A row trained with one seed per entry of `seed_offsets` (its PSNR offset in that seed), each run with its own
    per-image files at 32 px and, shifted by `resolution_offset`, at 64 px."""
    runs = []
    for seed, offset in enumerate(seed_offsets):
        run = row(tmp_path, f"{slug}_s{seed}", offset, 0.3, 10.0, {"3": 5.0})
        file_64 = tmp_path / f"{slug}_s{seed}_64px.npz"
        with np.load(run["files"]["per_image"]) as at_32:
            np.savez(file_64, **{**dict(at_32), "psnr": at_32["psnr"] + resolution_offset})
        runs.append({**run, "seed": seed, "files": {**run["files"], "per_image_64px": str(file_64)}})
    return {**runs[0], "label": slug.upper(), "slug": slug, "runs": runs}


def test_seeded_rows_are_compared_seed_by_seed_with_the_seed_spread_in_the_interval(rows, tmp_path):
    vae = seeded_row(tmp_path, "vae", [0.0, 0.0, 0.0])
    steady = seeded_row(tmp_path, "steady", [1.0, 1.1, 0.9])  # the same gain in every seed
    erratic = seeded_row(tmp_path, "erratic", [3.0, -1.0, 1.0])  # the same mean gain, seeds that disagree
    seeded = {"vae": vae, "steady": steady, "erratic": erratic}
    found = {(c["ours"], c["metric"]): c for name in ("steady", "erratic") for c in claims_lib.claims(
        seeded, {"equal_compression": {"baseline": "vae", "ours": name}}, resamples=20)}
    steady_psnr, erratic_psnr = found[("STEADY", "psnr")], found[("ERRATIC", "psnr")]
    assert steady_psnr["seeds"] == 3 and steady_psnr["per_seed"] == pytest.approx([1.0, 1.1, 0.9])
    assert steady_psnr["estimate"] == pytest.approx(1.0) and steady_psnr["verdict"] == "reproduced"
    assert erratic_psnr["estimate"] == pytest.approx(1.0) and erratic_psnr["verdict"] == "inconclusive"
    assert np.diff(erratic_psnr["ci95"])[0] > 5 * np.diff(steady_psnr["ci95"])[0]
    assert found[("STEADY", "rfid")]["seeds"] == 3 and found[("STEADY", "gfid")]["seeds"] == 3
    # a row of one seed against one of three: only the shared seed is compared, and the claim says so
    single = claims_lib.claims({"vae": vae, "one": {**seeded_row(tmp_path, "one", [1.0]), "label": "ONE"}},
                               {"equal_compression": {"baseline": "vae", "ours": "one"}}, resamples=20)
    assert {claim["seeds"] for claim in single} == {1}
    table = reproduce.render_table([vae, erratic], found and [found[("ERRATIC", "psnr")]],
                                   {"preset": "t", "command": "c", "machine": "m", "date": "d", "wall_minutes": 1.0,
                                    "compute_minutes": 1.0})
    assert "| ERRATIC | f8×4 (4×8×8) | 3 |" in table and "| 3.00 / -1.00 / 1.00 |" in table


def test_the_compression_trend_and_resolution_claims(tmp_path):
    rows = {"vae_f4": seeded_row(tmp_path, "vae_f4", [0.0, 0.0, 0.0]),
            "eps_f4": seeded_row(tmp_path, "eps_f4", [-1.0, -0.9, -1.1], resolution_offset=2.0),
            "vae_f8": seeded_row(tmp_path, "vae_f8", [0.0]),
            "eps_f8": seeded_row(tmp_path, "eps_f8", [1.0])}
    spec = {"compression_trend": {"lower": {"baseline": "vae_f4", "ours": "eps_f4"},
                                  "higher": {"baseline": "vae_f8", "ours": "eps_f8"}},
            "resolution": {"baseline": "vae_f4", "ours": "eps_f4", "resolution": 64}}
    found = {(c["claim"], c["metric"]): c for c in claims_lib.claims(rows, spec, resamples=20)}
    trend = found[("compression_trend", "psnr")]
    # the gap is −1 dB at f4 and +1 dB at f8: it grows with compression by 2 dB, the f8 seed variance borrowed
    assert trend["estimate"] == pytest.approx(2.0) and trend["borrowed_seed_variance"]
    assert trend["verdict"] == "reproduced" and found[("compression_trend", "rfid")]["seeds"] == 1
    resolution = found[("resolution", "psnr")]
    assert resolution["estimate"] == pytest.approx(1.0) and resolution["verdict"] == "reproduced"
    assert found[("resolution", "psnr")]["paper"].startswith("not reported")


def test_an_equal_quality_claim_is_judged_against_its_margin(tmp_path):
    """DGAE's "the same quality with half the channels": PSNR lower by 0.3 dB in every seed is the same quality
    within a 0.5 dB margin, not within 0.1 dB; better by 1 dB is the same quality too; worse by 2 dB is not."""
    save_statistics(tmp_path / "reference.npz", np.zeros(8), np.eye(8))
    rows = {"full": seeded_row(tmp_path, "full", [0.0, 0.0, 0.0]),
            "close": seeded_row(tmp_path, "close", [-0.3, -0.28, -0.32]),
            "better": seeded_row(tmp_path, "better", [1.0, 1.02, 0.98]),
            "worse": seeded_row(tmp_path, "worse", [-2.0, -2.02, -1.98])}

    def psnr_verdict(ours, margin):
        spec = {"same": {"claim": "half_channels", "baseline": "full", "ours": ours, "margin": {"psnr": margin}}}
        found = {c["metric"]: c for c in claims_lib.claims(rows, spec, resamples=20)}
        assert found["psnr"]["margin"] == margin and found["psnr"]["claim"] == "same"
        assert found["rfid"]["margin"] is None  # no margin given: the plain rule
        return found["psnr"]["verdict"]

    assert psnr_verdict("close", 0.5) == "reproduced"
    assert psnr_verdict("close", 0.1) == "contradicted"
    assert psnr_verdict("better", 0.5) == "reproduced"
    assert psnr_verdict("worse", 0.5) == "contradicted"
    with pytest.raises(ConfigError, match="no claim of the kind 'same'"):
        claims_lib.claims(rows, {"same": {"baseline": "full", "ours": "close"}})
    # a misspelt or negative margin is refused before any run, not read as "no margin"
    for margin in ({"fid": 10.0}, {"psnr": -0.5}):
        with pytest.raises(ConfigError, match="margin of the preset p"):
            claims_lib.check_claims({"same": {"claim": "half_channels", "baseline": "full", "ours": "close",
                                              "margin": margin}}, "p")


def test_a_row_takes_each_seeds_tokenizer_from_a_named_run():
    fair = group_config("reproduce", "fair32")
    entry = {**fair["tokenizers"][0], "tokenizer_run": "reproduce_fair32_vae_f4_s{seed}"}
    assert reproduce.run_config(fair, "t", entry, [], 2).pipeline.tokenizer_run == "reproduce_fair32_vae_f4_s2"
    for seed, source in ((None, "run_s{seed}"), (1, "run_s0")):  # a template that cannot give each seed its own
        with pytest.raises(ConfigError, match="needs '{seed}' exactly when the row has seeds"):
            reproduce.run_config(fair, "t", {**entry, "tokenizer_run": source}, [], seed)


def test_claims_refuse_rows_measured_on_different_images_or_references(rows, tmp_path):
    moved = dict(np.load(rows["eps8"]["files"]["per_image"]))
    moved["index"] = moved["index"] + 1
    np.savez(tmp_path / "moved.npz", **moved)
    other_images = {**rows, "eps8": {**rows["eps8"], "files": {**rows["eps8"]["files"],
                                                                 "per_image": str(tmp_path / "moved.npz")}}}
    with pytest.raises(ConfigError, match="different images"):
        claims_lib.claims(other_images, SPEC, resamples=5)
    other_reference = {**rows, "eps8": {**rows["eps8"], "files": {**rows["eps8"]["files"],
                                                                    "reference": str(tmp_path / "other.npz")}}}
    with pytest.raises(ConfigError, match="different references"):
        claims_lib.claims(other_reference, {"speedup": {"baseline": "vae", "ours": "eps8"}}, resamples=5)


def test_table_and_plots_are_written(rows, tmp_path):
    chosen = [rows["vae"], rows["eps8"]]
    claims = claims_lib.claims(rows, {"equal_compression": SPEC["equal_compression"]}, resamples=20)
    meta = {"preset": "test", "command": "python pipelines/reproduce.py", "machine": "m", "date": "d",
            "wall_minutes": 1.0, "compute_minutes": 2.0}
    table = reproduce.render_table(chosen, claims, meta)
    assert "| EPS8 | f8×4 (4×8×8) | 1 | 6.0 / 4.0 | 1.0 [0.8, 1.2] | 20.00 [19.50, 20.50] |" in table
    psnr = next(c for c in claims if c["metric"] == "psnr")
    assert f"{psnr['estimate']:.2f} [{psnr['ci95'][0]:.2f}, {psnr['ci95'][1]:.2f}]" in table
    assert "**reproduced**" in table and "## Claims" in table
    reproduce.plot(chosen, tmp_path)
    assert (tmp_path / "gfid_vs_throughput.png").stat().st_size > 0 and (tmp_path / "rfid_vs_nfe.png").is_file()
    # measured at one decoder NFE (a preset without an NFE sweep): no sweep column, and no "one pass" for a
    # diffusion decoder
    unswept = reproduce.render_table([rows["vae"], {**rows["eps8"], "rfid_by_nfe": {"3": 1.0}}], claims, meta)
    assert "rFID (NFE" not in unswept and "one pass" not in unswept
    assert "| EPS8 | f8×4 (4×8×8) | 1 | 1.0 [0.8, 1.2] | 20.00 [19.50, 20.50] |" in unswept
    lines = unswept.splitlines()
    at = lines.index(next(line for line in lines if line.startswith("| tokenizer | latent |")))
    assert len({line.count("|") for line in lines[at:at + 4]}) == 1  # header, separator and both rows
    # nor an rFID-by-NFE plot, whose flat lines would call every decoder one pass
    (tmp_path / "unswept").mkdir()
    reproduce.plot([rows["vae"], {**rows["eps8"], "rfid_by_nfe": {"3": 1.0}}], tmp_path / "unswept")
    assert (tmp_path / "unswept" / "gfid_vs_throughput.png").is_file()
    assert not (tmp_path / "unswept" / "rfid_vs_nfe.png").exists()


def test_real_data_floor_takes_as_many_real_images_as_samples_from_every_class(tmp_path):
    cfg = load_config(["experiment=smoke", "device=cpu", "data.val_size=50", "sample.num_per_class=2",
                       "evaluate.reference_images=20", "evaluate.batch_size=16", "evaluate.bootstrap=10"], tmp_path)
    floor = reproduce.real_data_floor(cfg)
    assert floor["num_images"] == 2 * cfg.data.num_classes
    assert floor["subset"]["selection"] == "class-stratified random subset" and floor["reference"]["images"] == 20
    assert floor["fid"] > 0 and floor["fid_ci95"][0] < floor["fid"] < floor["fid_ci95"][1]
    assert (tmp_path / "reference_stats").is_dir()  # the reference is the evaluate stage's cached one
    meta = {"preset": "t", "command": "c", "machine": "m", "date": "d", "wall_minutes": 1.0, "compute_minutes": 1.0}
    assert f"score FID {floor['fid']:.1f} [" in reproduce.render_table([], [], meta, floor)


def test_only_selects_rows_of_a_preset():
    preset = {**group_config("reproduce", "small32"), "only": ["vae_f4", "epsvae_f8"], "out": None}
    chosen = reproduce.selected_rows(preset, "tokenizers", "small32")
    assert [entry["slug"] for entry in chosen["tokenizers"]] == ["vae_f4", "epsvae_f8"] and "only" not in chosen
    for only in (["nope"], []):
        with pytest.raises(ConfigError, match="name one or more of the rows of the preset small32"):
            reproduce.selected_rows({**preset, "only": only}, "tokenizers", "small32")


def test_the_older_command_line_becomes_the_stage_s(tmp_path):
    (tmp_path / "reproduce").mkdir()
    assert reproduce.legacy_arguments(["preset=small32", "out=/r", "only=vae_f4,epsvae_f8", "seed=1"], "reproduce") \
        == ["stage=reproduce", "reproduce=small32", "reproduce.out=/r", "reproduce.only=[vae_f4,epsvae_f8]", "seed=1"]
    assert reproduce.legacy_arguments([f"preset={tmp_path / 'reproduce' / 'tiny.yaml'}"], "ablation") \
        == ["stage=ablation", f"hydra.searchpath=[file://{tmp_path}]", "reproduce=tiny"]
    with pytest.raises(ConfigError, match="reproduce/"):
        reproduce.legacy_arguments([f"preset={tmp_path / 'tiny.yaml'}"], "reproduce")


@pytest.mark.slow
def test_a_tiny_reproduction_runs_as_a_stage_and_tabulates_its_claims(tmp_path):
    arguments, out = tiny_preset_command(tmp_path, "reproduce", "tiny", """
experiment: smoke
common: {data.train_size: 64, data.val_size: 10, tokenizer.train.steps: 4, tokenizer.train.batch_size: 8,
         tokenizer.train.sample_every: 100, tokenizer.train.ckpt_every: 100, ldm.train.steps: 4,
         ldm.train.batch_size: 16, ldm.train.sample_every: 100, ldm.train.ckpt_every: 100, reconstruct.num_images: 10,
         sample.num_per_class: 1, sample.steps: 3, decode.nfe: 1, decode.batch_size: 10, evaluate.bootstrap: 10,
         evaluate.reference_images: 20}
tokenizers:
  - {label: "VAE", slug: vae, tokenizer: vae_tiny, overrides: []}
  - {label: "eps", slug: eps, tokenizer: epsvae_tiny, overrides: []}
nfe_sweep: [1, 2]
claims:
  equal_compression: {baseline: vae, ours: eps}
""")
    run_cli(*arguments, timeout=1800)
    results = json.loads((out / "results.json").read_text())
    assert [row["slug"] for row in results["rows"]] == ["vae", "eps"]
    assert list(results["rows"][0]["rfid_by_nfe"]) == ["1"] and list(results["rows"][1]["rfid_by_nfe"]) == ["1", "2"]
    # the sweep's other NFE is one more reconstruct stage, in its own folder, by the contract
    assert finished_result(tmp_path / "pipeline" / "reproduce_tiny_eps" / "reconstruct_nfe2")["decoder_nfe"] == 2
    assert {claim["metric"] for claim in results["claims"]} == {"rfid", "psnr", "lpips", "gfid"}
    assert results["real_data_floor"]["fid"] > 0
    assert shlex.split(results["meta"]["command"]) == [".venv/bin/python", "pipelines/run.py", *arguments]
    assert "## Claims" in (out / "table.md").read_text() and (out / "gfid_vs_throughput.png").is_file()


def test_a_results_folder_that_is_a_file_is_one_line_before_any_run(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    result = run_cli("stage=reproduce", "reproduce=small32", f"reproduce.out={taken}", f"output_root={tmp_path}",
                     check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{taken} is a file, not a folder: set reproduce.out=" in result.stderr
    assert not (tmp_path / "pipeline").exists()


def test_a_trial_of_a_preset_never_replaces_its_committed_results(tmp_path):
    def folder(extra, only=None):
        cfg = load_config(["stage=reproduce", "reproduce=small32", f"output_root={tmp_path}",
                           *([] if only is None else [f"reproduce.only=[{','.join(only)}]"])])
        return reproduce.results_folder(cfg, "small32", extra)

    committed = reproduce.ROOT / "results" / "small32"
    # overrides that change nothing the runs compute: the preset's own results
    assert folder([f"output_root={tmp_path}", "pipeline.steps=[tokenizer,reconstruct]", "progress=false"]) == committed
    trial = tmp_path / "results" / "small32"
    assert folder(["tokenizer.train.steps=4"]) == trial  # another budget
    assert folder(["+tokenizer.loss.extra=1"]) == trial
    assert folder([], only=["vae_f4"]) == trial  # some rows only
    cfg = load_config(["stage=reproduce", "reproduce=small32", f"reproduce.out={tmp_path / 'chosen'}"])
    assert reproduce.results_folder(cfg, "small32", ["tokenizer.train.steps=4"]) == tmp_path / "chosen"


def test_the_throughput_plot_shows_every_seeds_gfid_with_its_own_interval(tmp_path):
    runs = [{"seed": 0, "gfid": 1.0, "gfid_ci95": [0.9, 1.1]}, {"seed": 1, "gfid": 3.0, "gfid_ci95": [2.9, 3.1]}]
    row = reproduce.row_of({"label": "A", "slug": "a", "tokenizer": "vae_tiny"}, load_config(["tokenizer=vae_tiny"]),
                           [{**run, "images_per_s": {"total": 5.0}, "wall_seconds": {}} for run in runs])
    assert row["gfid"] == 2.0 and "gfid_ci95" not in row  # the mean lies outside either seed's interval
    reproduce.plot_gfid_against_throughput([row], tmp_path)
    assert (tmp_path / "gfid_vs_throughput.png").stat().st_size > 0
