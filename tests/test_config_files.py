"""Config files say what they change. A file that extends another (Hydra `defaults: [parent, _self_]`) holds only
its differences: a key set to the value it inherits anyway is a pasted-back block that hides what the file changes,
and a second place to edit. Each model family has one base file written out whole."""
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GROUPS = ("tokenizer", "ldm", "experiment")
# The files written out whole: one base per family, and epsvae_small_dit, whose DiT decoder cannot be written as
# differences from a UNet's (a Hydra merge adds and changes keys, it cannot drop the UNet's).
STANDALONE = {"tokenizer": {"epsvae_sd_b", "vae_sd_b", "dgae", "epsvae_small_dit"}, "ldm": {"dit_s2"}}
ABSENT = object()


def parents(path: Path) -> list[str]:
    """The configs of its own group that a config file extends."""
    return [entry for entry in OmegaConf.load(path).get("defaults", []) if isinstance(entry, str) and entry != "_self_"]


def leaves(node: dict, prefix: tuple[str, ...] = ()):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from leaves(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def lookup(node, key: tuple[str, ...]):
    for part in key:
        if not isinstance(node, dict) or part not in node:
            return ABSENT
        node = node[part]
    return node


def inherited(configs: Path, group: str, name: str) -> dict:
    """What `group=name` composes to with the file's own keys taken out (in the copy of the configs at `configs`):
    the values it inherits, at the file's package."""
    path = configs / group / f"{name}.yaml"
    package_header = [line for line in path.read_text().splitlines() if line.startswith("# @package")]
    defaults = OmegaConf.load(path).defaults
    path.write_text("\n".join([*package_header, OmegaConf.to_yaml({"defaults": defaults})]))
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"{group}={name}"])
    return OmegaConf.to_container(cfg if package_header else cfg[group], resolve=False)


def repeated_keys(configs: Path, group: str, name: str) -> list[str]:
    """The keys that `group/name.yaml` (in the copy of the configs at `configs`) sets to the values it inherits."""
    own = OmegaConf.to_container(OmegaConf.load(configs / group / f"{name}.yaml"), resolve=False)
    own.pop("defaults")
    base = inherited(configs, group, name)
    return [".".join(key) for key, value in leaves(own) if lookup(base, key) == value]


EXTENDING = [path for group in GROUPS for path in sorted((CONFIGS / group).glob("*.yaml")) if parents(path)]


@pytest.mark.parametrize("path", EXTENDING, ids=[f"{path.parent.name}={path.stem}" for path in EXTENDING])
def test_a_config_that_extends_another_holds_only_differences(path, tmp_path):
    shutil.copytree(CONFIGS, tmp_path / "configs")
    assert repeated_keys(tmp_path / "configs", path.parent.name, path.stem) == []


def test_the_check_finds_a_pasted_back_key(tmp_path):
    shutil.copytree(CONFIGS, tmp_path / "configs")
    child = tmp_path / "configs" / "ldm" / "dit_b2.yaml"
    child.write_text(child.read_text() + "train:\n  steps: 5\n  max_nonfinite: 10\n")
    assert repeated_keys(tmp_path / "configs", "ldm", "dit_b2") == ["train.max_nonfinite"]


@pytest.mark.parametrize("group", sorted(STANDALONE))
def test_only_the_family_bases_are_written_out_whole(group):
    assert {path.stem for path in (CONFIGS / group).glob("*.yaml") if not parents(path)} == STANDALONE[group]
