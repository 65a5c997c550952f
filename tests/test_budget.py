"""stage=budget: the budget32 preset is fair32's headline pair, and a tiny budget study end to end."""
import json
import math

import numpy as np
import pytest

from pipelines.budget import crossing_label, steps_label, training_time
from pipelines.configs import group_config
from shared.train.checkpoint import CheckpointDir
from tests.helpers import run_cli, tiny_preset_command


def test_budget32_trains_fair32s_headline_pair_with_fair32s_recipe():
    budget, fair = group_config("reproduce", "budget32"), group_config("reproduce", "fair32")
    assert budget["common"] == fair["common"] and budget.get("claims") is None
    headline = {entry["slug"]: {**entry, "seeds": entry["seeds"][:1]} for entry in fair["tokenizers"]}
    assert [entry for entry in budget["tokenizers"]] == [headline["vae_f4"], headline["epsvae_f4"]]
    assert budget["budget_steps"] == sorted(budget["budget_steps"]) and budget["budget_steps"][-1] == 9600


def test_a_crossing_far_beyond_the_last_budget_is_shown_as_beyond_it():
    # a slope near zero puts the line's zero absurdly far ahead: the table says "beyond", not 3e39 steps
    assert steps_label(3.04e39, 1200) == "> 1,228,800"
    assert steps_label(21286.4, 1200) == "21,286" and steps_label(math.inf, 1200) == "∞"


def test_a_line_that_never_reaches_zero_says_on_which_side_of_it_it_lies():
    ahead = {"crossing_steps": None, "at_last": 0.89}  # a PSNR difference: ours ahead and moving further
    assert crossing_label(ahead, "higher", 9600).startswith("already past 0")
    assert crossing_label(ahead, "lower", 9600) == "never (moving away)"  # the same line for an rFID: ours behind
    ahead_rfid = {"crossing_steps": None, "at_last": -1.5}
    assert crossing_label(ahead_rfid, "lower", 9600).startswith("already past 0")
    closing = {"crossing_steps": 21286.4, "crossing_ci95": [12000.0, float("inf")], "at_last": 2.0}
    assert crossing_label(closing, "lower", 9600) == "21,286 [12,000, ∞]"


def test_the_training_time_says_which_rows_it_leaves_out():
    meta = {"training_minutes": 12.0}
    assert training_time({**meta, "training_uncounted": []}, 2).startswith("12.0 min of training")
    assert "not counted: eps, whose checkpoints predate it" in training_time({**meta, "training_uncounted": ["eps"]},
                                                                             2)
    assert training_time({**meta, "training_uncounted": ["VAE", "eps"]}, 2).startswith("training time not recorded")


@pytest.mark.slow
def test_a_tiny_budget_study_keeps_each_budget_and_measures_the_trend(tmp_path):
    command, out = tiny_preset_command(tmp_path, "budget", "tiny_budget", """
experiment: smoke
common: {data.train_size: 64, data.val_size: 10, tokenizer.train.batch_size: 8, tokenizer.train.sample_every: 100,
         tokenizer.train.ckpt_every: 100, tokenizer.train.log_every: 1, reconstruct.num_images: 10,
         decode.batch_size: 10, decode.nfe: 1, evaluate.bootstrap: 10}
tokenizers:
  - {label: "VAE", slug: vae, tokenizer: vae_tiny, seeds: [0], overrides: []}
  - {label: "eps", slug: eps, tokenizer: epsvae_tiny, seeds: [0], overrides: []}
budget_steps: [2, 3, 5]
compare: {baseline: vae, ours: eps}
psnr_target: 40.0
""")
    # one row alone (another process may train the other): trained and measured, no table without its pair
    alone = run_cli(*command, "reproduce.only=[eps]", timeout=1800)
    assert "run the command without reproduce.only to write it" in alone.stdout
    assert not (out / "table.md").exists()
    assert not (tmp_path / "pipeline" / "reproduce_tiny_budget_vae_s0").exists()
    run_cli(*command, timeout=1800)
    results = json.loads((out / "results.json").read_text())
    folder = tmp_path / "pipeline" / "reproduce_tiny_budget_eps_s0"
    # trained once to the largest budget; every budget's checkpoint kept although ckpt_every divides none of them
    assert CheckpointDir(folder / "tokenizer" / "checkpoints").steps() == [2, 3, 5]
    for row in results["rows"]:
        assert [m["steps"] for m in row["measurements"]] == [2, 3, 5]
        # each budget carries the training time its checkpoint counted, which grows with the steps
        seconds = [m["train_seconds"] for m in row["measurements"]]
        assert 0 < seconds[0] <= seconds[1] <= seconds[2]
    assert results["meta"]["training_minutes"] == pytest.approx(
        sum(row["measurements"][-1]["train_seconds"] for row in results["rows"]) / 60)
    assert results["meta"]["training_uncounted"] == []
    # each budget measured its own checkpoint: the difference moves between budgets
    psnr = results["comparison"]["psnr"]
    estimates = [budget["estimate"] for budget in psnr["by_budget"]]
    assert len(set(estimates)) == 3
    eps = {m["steps"]: m for m in results["rows"][1]["measurements"]}
    per_image = [np.load(eps[steps]["per_image"])["psnr"] for steps in (2, 5)]
    assert not np.array_equal(*per_image)
    trend = psnr["trend"]
    assert trend["slope_ci95"][0] <= trend["slope"] <= trend["slope_ci95"][1]
    assert trend["verdict"] in ("reproduced", "contradicted", "inconclusive")
    assert results["psnr_target"]["steps"] == 5 and results["psnr_target"]["reached"] is False
    table = (out / "table.md").read_text()
    assert "Target: VAE PSNR ≥ 40.0 dB at 5 steps" in table and (out / "budget_difference.png").is_file()
    assert not results["meta"]["partial"] and "Partial" not in table
    # reproduce.train=false tabulates what exists, training nothing, with the same numbers
    again = run_cli(*command, "reproduce.train=false", timeout=600)
    assert "== " not in again.stdout
    assert json.loads((out / "results.json").read_text())["comparison"]["psnr"]["by_budget"] == psnr["by_budget"]
    # a row still short of its largest budget: the budgets measured so far, marked partial, the target pending
    last = CheckpointDir(folder / "tokenizer" / "checkpoints").path(5)
    last.rename(last.with_suffix(".moved"))
    run_cli(*command, "reproduce.train=false", timeout=600)
    partial = json.loads((out / "results.json").read_text())
    assert partial["meta"]["partial"] and partial["meta"]["measured_budgets"] == [2, 3]
    assert partial["psnr_target"]["steps"] == 5 and partial["psnr_target"]["latest_steps"] == 3
    assert partial["psnr_target"]["reached"] is None
    table = (out / "table.md").read_text()
    assert "**Partial**: measured at 2, 3 of the preset's budgets 2, 3, 5 steps" in table
    assert "dB at 3 steps: not measured yet at the target's budget." in table
