"""stage=ablation: cumulative rungs, decode-only rungs reuse a tokenizer, paired changes and the table."""
import json

import pytest

from pipelines import ablation
from pipelines.configs import group_config
from shared.errors import ConfigError
from shared.runtime import finished_result
from tests.helpers import run_cli, tiny_preset_command


def test_the_ladder_presets_rungs_accumulate_their_changes():
    preset = group_config("reproduce", "ladder32")
    configs = dict((rung["slug"], cfg) for rung, [cfg] in ablation.rung_configs(preset, "ladder32", []))
    ddpm, flow, unet, last = configs["ddpm"], configs["flow"], configs["adm_unet"], configs["reversed_log"]
    assert ddpm.tokenizer.flow.process == "ddpm" and ddpm.tokenizer.decoder.arch == "dit" and ddpm.decode.nfe == 100
    assert flow.tokenizer.flow.process == "rectified_flow" and flow.tokenizer.flow.t_sampling == "uniform"
    # the fourth rung switches the denoiser and keeps every earlier change
    assert unet.tokenizer.decoder.arch == "adm_unet" and unet.tokenizer.flow.t_sampling == "logit_normal"
    assert unet.tokenizer.loss.lpips == 0 and unet.tokenizer.flow.gamma == 1.0
    assert last.tokenizer.flow.grid == "reversed_log" and last.tokenizer.flow.gamma == 0.6
    assert last.tokenizer.loss.lpips == 0.5 and last.tokenizer.loss.adversarial == 0.5 and last.decode.nfe == 3
    # equal budget on every rung
    assert len({(cfg.tokenizer.train.steps, cfg.tokenizer.train.batch_size) for cfg in configs.values()}) == 1


def test_the_fair_ladder_starts_from_ho_et_als_unet_and_seeds_the_contradicted_rungs():
    preset = group_config("reproduce", "ladder32_fair")
    configs = dict((rung["slug"], cfgs) for rung, cfgs in ablation.rung_configs(preset, "ladder32_fair", []))
    decoders = {slug: cfgs[0].tokenizer.decoder for slug, cfgs in configs.items()}
    for slug in ("ddpm", "flow", "logit_normal"):  # the DDPM UNet (Ho et al.), with every earlier change
        assert not decoders[slug].scale_shift_norm and not decoders[slug].resblock_updown
    assert decoders["adm_unet"].scale_shift_norm and decoders["adm_unet"].resblock_updown
    assert configs["ddpm"][0].decode.nfe == 1000  # the paper's DDPM sampling, not respaced
    # fair32's recipe, and the paper's two changes made from the values fair32's pilot chose
    assert {(cfg.tokenizer.loss.lpips_net, cfg.decode.use_ema) for cfgs in configs.values() for cfg in cfgs} == {
        ("vgg", False)}
    assert configs["adversarial"][0].tokenizer.flow.gamma == 1.0 and configs["gamma"][0].tokenizer.flow.gamma == 0.6
    assert configs["gamma"][0].tokenizer.flow.grid == "uniform"
    assert {slug: len(cfgs) for slug, cfgs in configs.items() if len(cfgs) > 1} == {
        "adversarial": 3, "gamma": 3, "reversed_log": 3}


def test_selected_rungs_keep_every_earlier_change_and_the_tokenizer_a_decode_only_rung_decodes():
    preset = group_config("reproduce", "ladder32")
    configs = ablation.rung_configs(preset, "ladder32", [])
    full = dict((rung["slug"], cfgs) for rung, cfgs in configs)
    chosen = ablation.selected_rungs(configs, ["reversed_log"], "ladder32")
    # the decode-only rung comes with the trained rung above it (γ), whose tokenizer it decodes
    assert [rung["slug"] for rung, _ in chosen] == ["gamma", "reversed_log"]
    assert all(cfgs == full[rung["slug"]] for rung, cfgs in chosen)  # with every earlier rung's changes
    assert [rung["slug"] for rung, _ in ablation.selected_rungs(configs, ["flow", "gamma"], "ladder32")] == [
        "flow", "gamma"]
    for only in ([], ["no_such_rung"]):
        with pytest.raises(ConfigError, match="name one or more of the rows of the preset ladder32"):
            ablation.selected_rungs(configs, only, "ladder32")
    # `only` may name a baseline too, so that two processes can split a preset's runs between them
    baselines = preset["baselines"]
    assert [rung["slug"] for rung, _ in ablation.selected_rungs(configs, ["ddpm", "vae"], "ladder32", baselines)] \
        == ["ddpm"]
    with pytest.raises(ConfigError, match="name one or more of the rows"):
        ablation.selected_rungs(configs, ["ddpm", "vae"], "ladder32")  # a baseline the preset does not have
    with pytest.raises(ConfigError, match="name at least one rung of the preset ladder32 beside its baselines"):
        ablation.selected_rungs(configs, ["vae"], "ladder32", baselines)


def test_a_decode_only_rung_has_the_seeds_of_the_rung_whose_tokenizers_it_decodes():
    preset = {**group_config("reproduce", "ladder32")}
    preset["rungs"] = [{**rung, "seeds": [0, 1, 2]} if rung["slug"] == "gamma" else rung for rung in preset["rungs"]]
    with pytest.raises(ConfigError, match="decode-only rung reversed_log decodes the tokenizers of gamma"):
        ablation.rung_configs(preset, "ladder32", [])
    preset["rungs"] = [{**rung, "seeds": [0, 1, 2]} if rung["slug"] == "reversed_log" else rung
                       for rung in preset["rungs"]]
    configs = dict((rung["slug"], cfgs) for rung, cfgs in ablation.rung_configs(preset, "ladder32", []))
    assert [(cfg.name, cfg.seed) for cfg in configs["reversed_log"]] == [
        (f"reproduce_ladder32_reversed_log_s{seed}", seed) for seed in (0, 1, 2)]
    assert [cfg.name for cfg in configs["adversarial"]] == ["reproduce_ladder32_adversarial"]


@pytest.mark.slow
def test_a_tiny_ladder_runs_end_to_end_and_reuses_the_tokenizer_of_a_decode_only_rung(tmp_path):
    command, out = tiny_preset_command(tmp_path, "ablation", "tiny", """
experiment: smoke
tokenizer: epsvae_tiny
common: {data.train_size: 64, data.val_size: 12, tokenizer.train.steps: 4, tokenizer.train.batch_size: 8,
         tokenizer.train.sample_every: 100, tokenizer.train.ckpt_every: 100, reconstruct.num_images: 10,
         evaluate.bootstrap: 10, decode.batch_size: 10}
rungs:
  - {label: "DDPM", slug: ddpm, nfe: 4, paper: {rfid: 28.22, nfe: 1000},
     changes: [tokenizer.flow.process=ddpm, tokenizer.flow.gamma=1.0, tokenizer.flow.grid=uniform,
               tokenizer.loss.lpips=0.0, tokenizer.loss.adversarial=0.0]}
  - {label: "flow", slug: flow, nfe: 2, seeds: [0, 1], changes: [tokenizer.flow.process=rectified_flow]}
  - {label: "grid", slug: grid, nfe: 1, decode_only: true, seeds: [0, 1], changes: [tokenizer.flow.grid=reversed_log]}
baselines:
  - {label: "VAE", slug: vae, tokenizer: vae_tiny, seeds: [0, 1], paper: {rfid: 11.15}, overrides: []}
""")
    # a trial of some rows trains just those; a baseline it leaves out (another process may train it) waits
    run_cli(*command, "reproduce.only=[ddpm]", timeout=1800)
    assert (tmp_path / "pipeline" / "reproduce_tiny_ddpm" / "tokenizer").is_dir()
    assert not list((tmp_path / "pipeline").glob("reproduce_tiny_vae_*"))
    run_cli(*command, timeout=1800)
    results = json.loads((out / "results.json").read_text())
    assert [row["slug"] for row in results["rows"]] == ["ddpm", "flow", "grid"]
    assert [row["nfe"] for row in results["rows"]] == [4, 2, 1]
    assert [change["to"] for change in results["changes"]] == ["flow", "grid"]
    assert all(change["verdict"] in ("reproduced", "contradicted", "inconclusive") for change in results["changes"])
    # DDPM's one run (the config's seed 0) pairs with the flow rung's seed 0 only; flow and grid pair both seeds
    assert [change["rfid"]["seeds"] for change in results["changes"]] == [1, 2]
    flow, grid = results["rows"][1:]
    assert [run["seed"] for run in grid["runs"]] == [0, 1]
    assert grid["rfid"] == pytest.approx(sum(run["rfid"] for run in grid["runs"]) / 2)
    assert results["changes"][1]["rfid"]["per_seed"] == pytest.approx(
        [after["rfid"] - before["rfid"] for after, before in zip(grid["runs"], flow["runs"])])
    for seed in (0, 1):
        grid_metrics = finished_result(tmp_path / "pipeline" / f"reproduce_tiny_grid_s{seed}" / "reconstruct")
        assert grid_metrics["grid"] == "reversed_log"
        # decoded with the previous rung's tokenizer of the same seed, and nothing was retrained
        assert f"reproduce_tiny_flow_s{seed}" in grid_metrics["checkpoint"]
        assert not (tmp_path / "pipeline" / f"reproduce_tiny_grid_s{seed}" / "tokenizer").exists()
    assert results["baselines"][0]["slug"] == "vae"
    versus = results["against_baselines"][0]  # the top rung against the matched VAE, on the same images
    assert (versus["from"], versus["to"]) == ("vae", "grid") and versus["rfid"]["seeds"] == 2
    assert versus["rfid"]["estimate"] == pytest.approx(results["rows"][-1]["rfid"] - results["baselines"][0]["rfid"])
    assert versus["verdict"] in ("reproduced", "contradicted", "inconclusive")
    table = (out / "table.md").read_text()
    assert "| DDPM | 4 / 1000 |" in table and "(baseline)" in table and "Budget per rung: 4 steps × 8 images" in table
    assert f"| VAE | {versus['rfid']['estimate']:.1f} [" in table and "(2 seeds)" in table
    assert (out / "rfid_ladder.png").stat().st_size > 0
