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
def test_reproduction_scripts_report_a_user_error_in_one_line(script):
    result = run_cli("preset=no_such_preset", script=script, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == result.stderr.strip().splitlines()[0]
    assert result.stderr.startswith("error (ConfigError): no reproduction preset 'no_such_preset'")
