"""`python pipelines/run.py`: stage dispatch and the errors a user sees for a missing stage or a config typo."""
import pytest

from pipelines.run import STAGES
from tests.helpers import run_cli

pytestmark = pytest.mark.slow


def test_missing_stage_lists_every_stage_without_a_traceback():
    result = run_cli(check=False)
    assert result.returncode != 0
    assert "No stage given." in result.stderr and "Traceback" not in result.stderr
    for name in STAGES:
        assert f"  {name} " in result.stderr


def test_unknown_stage_is_named():
    result = run_cli("stage=tokeniser", check=False)
    assert result.returncode != 0 and "Unknown stage 'tokeniser'" in result.stderr


def test_config_typo_is_hydras_error_not_a_stage_traceback():
    result = run_cli("stage=describe", "tokenizer.lattent_channels=4", check=False)
    assert result.returncode != 0
    assert "lattent_channels" in result.stderr and "Traceback" not in result.stderr


def test_unknown_config_group_option_lists_the_available_ones():
    result = run_cli("stage=describe", "tokenizer=epsvae_huge", check=False)
    assert result.returncode != 0
    assert "epsvae_sd_h" in result.stderr and "Traceback" not in result.stderr


def test_describe_prints_one_json_line_for_the_ldm():
    result = run_cli("stage=describe", "ldm=dit_s2")
    assert result.stdout.strip().count("\n") == 0 and '"ldm": "dit_s2"' in result.stdout


@pytest.mark.parametrize("script", ["reproduce.py", "ablation.py"])
def test_the_older_reproduction_scripts_run_the_stages_and_name_the_presets(script):
    result = run_cli("preset=no_such_preset", script=script, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "reproduce/no_such_preset" in result.stderr and "small32" in result.stderr  # Hydra lists the presets


@pytest.mark.parametrize("stage, key, presets", [
    ("reproduce", "claims", "['dgae32', 'fair32', 'mini', 'mini_long', 'paper', 'small32']"),
    ("ablation", "rungs", "['ladder32', 'ladder32_fair']"), ("pilot", "decode_grid", "['fair32_pilot']"),
    ("budget", "budget_steps", "['budget32']"), ("convergence", "convergence", "['dgae32', 'dit_long32']")])
def test_a_reproduction_stage_without_a_preset_names_the_presets_in_one_line(stage, key, presets):
    result = run_cli(f"stage={stage}", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error (ConfigError): stage={stage} runs a preset with " \
        f"{key}: add reproduce=NAME, one of {presets}"
