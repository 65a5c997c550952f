"""stage=pilot: the decode settings it measures, the rule that picks a recipe, and a tiny pilot end to end."""
import json

import pytest

from pipelines import pilot
from pipelines.configs import group_config
from shared.runtime import finished_result
from tests.helpers import run_cli, tiny_preset_command

DECODE_GRID = {"grid": ["uniform", "reversed_log"], "nfe": [1, 2, 3], "use_ema": [True, False]}


def test_nfe_1_is_measured_once_and_a_one_pass_decoder_once():
    assert pilot.settings(DECODE_GRID, one_pass=False) == [
        ("uniform", 1), ("uniform", 2), ("reversed_log", 2), ("uniform", 3), ("reversed_log", 3)]
    assert pilot.settings(DECODE_GRID, one_pass=True) == [(None, None)]
    assert pilot.step_name("uniform", 2, True) == "pilot_uniform_nfe2_ema" and pilot.step_name(None, None, False) \
        == "pilot_raw"


def test_the_rule_picks_the_lowest_rfid_of_each_decoder_kind():
    def measured(rfid, grid="uniform", nfe=3, weights="EMA"):
        return {"rfid": rfid, "grid": grid, "nfe": nfe, "weights": weights}

    rows = [{"kind": "vae", "slug": "v1", "label": "V1", "gamma": None, "lr": 1e-3,
             "measurements": [measured(50.0, None, None), measured(48.0, None, None, "raw")]},
            {"kind": "epsvae", "slug": "e1", "label": "E1", "gamma": 1.0, "lr": 1e-3,
             "measurements": [measured(70.0), measured(60.0, "reversed_log", 2)]},
            {"kind": "epsvae", "slug": "e2", "label": "E2", "gamma": 0.6, "lr": 1e-3,
             "measurements": [measured(65.0)]}]
    chosen = pilot.winners(rows)
    assert chosen["vae"]["slug"] == "v1" and chosen["vae"]["weights"] == "raw"
    assert (chosen["epsvae"]["slug"], chosen["epsvae"]["grid"], chosen["epsvae"]["nfe"]) == ("e1", "reversed_log", 2)
    assert "- epsvae: E1 — γ 1.0, lr 0.001, EMA weights, grid reversed_log, NFE 2" in pilot.render_table(
        rows, chosen, {"preset": "p", "command": "c", "machine": "m", "date": "d", "compute_minutes": 1.0,
                       "wall_minutes": 1.0, "budget": "b", "subset": {"images": 1, "of": 2, "split": "val",
                                                                       "selection": "s"}})


def test_the_fair32_pilot_varies_gamma_and_learning_rate_for_both_decoder_kinds():
    preset = group_config("reproduce", "fair32_pilot")
    rows = {entry["slug"]: entry for entry in preset["tokenizers"]}
    assert {entry["tokenizer"] for entry in rows.values()} == {"vae_small", "epsvae_small"}
    assert preset["common"]["tokenizer.loss.lpips"] == 0.5 and preset["common"]["tokenizer.loss.lpips_net"] == "vgg"
    gammas = {override for entry in rows.values() for override in entry["overrides"] if "gamma" in override}
    assert gammas == {"tokenizer.flow.gamma=1.0", "tokenizer.flow.gamma=0.8", "tokenizer.flow.gamma=0.6"}
    for kind in ("vae_small", "epsvae_small"):
        rates = {override for entry in rows.values() if entry["tokenizer"] == kind for override in entry["overrides"]
                 if override.startswith("tokenizer.train.lr=")}
        assert len(rates) == 2, kind


@pytest.mark.slow
def test_a_tiny_pilot_trains_measures_and_chooses(tmp_path):
    command, out = tiny_preset_command(tmp_path, "pilot", "tiny_pilot", """
experiment: smoke
common: {data.train_size: 64, data.val_size: 10, tokenizer.train.steps: 4, tokenizer.train.batch_size: 8,
         tokenizer.train.sample_every: 100, tokenizer.train.ckpt_every: 100, reconstruct.num_images: 10,
         decode.batch_size: 10, evaluate.bootstrap: 10}
tokenizers:
  - {label: "VAE", slug: vae, tokenizer: vae_tiny, overrides: []}
  - {label: "eps", slug: eps, tokenizer: epsvae_tiny, overrides: [tokenizer.flow.gamma=1.0]}
decode_grid: {grid: [uniform, reversed_log], nfe: [1], use_ema: [true, false]}
""")
    run_cli(*command, timeout=1800)
    results = json.loads((out / "results.json").read_text())
    vae, eps = results["rows"]
    assert [m["weights"] for m in vae["measurements"]] == ["EMA", "raw"]
    # NFE 1 once (both grids are the one jump t = 1 → 0), then the raw weights at that setting
    assert [(m["grid"], m["nfe"], m["weights"]) for m in eps["measurements"]] == [
        ("uniform", 1, "EMA"), ("uniform", 1, "raw")]
    assert eps["gamma"] == 1.0 and all(m["noise_std"] > 0 for m in eps["measurements"])
    assert set(results["chosen"]) == {"vae", "epsvae"}
    folder = tmp_path / "pipeline" / "reproduce_tiny_pilot_eps"
    assert finished_result(folder / "pilot_uniform_nfe1_raw")["use_ema"] is False
    assert "## Chosen by the rule" in (out / "table.md").read_text() and (out / "rfid_by_setting.png").is_file()
    assert (out / "reconstructions_vae.png").is_file() and (out / "reconstructions_epsvae.png").is_file()
