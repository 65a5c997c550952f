"""The project's Hydra configs: where they are, the resolvers they use, and composing one from overrides, inside
`@hydra.main` or outside it (reproduce, ablation, bench and the tests see exactly what `pipelines/run.py` sees)."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"


def register_resolvers() -> None:
    """`${repo_root:}`: paths that work from any working directory (e.g. ../shared beside the checkout)."""
    if not OmegaConf.has_resolver("repo_root"):
        OmegaConf.register_new_resolver("repo_root", lambda: str(ROOT))


def compose_config(overrides: list[str]) -> DictConfig:
    """The config of `pipelines/run.py OVERRIDES`."""
    register_resolvers()
    if GlobalHydra.instance().is_initialized():  # inside pipelines/run.py (stage=reproduce): its configs are ours
        return compose(config_name="config", overrides=overrides)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def command_line() -> str:
    """The command this process runs, as a results file records it (the arguments are pipelines/run.py's also when
    an older script handed them on)."""
    return " ".join(shlex.quote(arg) for arg in [".venv/bin/python", "pipelines/run.py", *sys.argv[1:]])


def group_config(group: str, name: str) -> dict:
    """configs/GROUP/NAME.yaml with its `defaults` (files of the same group) merged underneath, resolved: one option
    of a config group on its own, e.g. group_config("tokenizer", "epsvae_sd_m"), without composing the whole config
    (which a stage already running under Hydra cannot do again)."""
    own = OmegaConf.load(CONFIG_DIR / group / f"{name}.yaml")
    parents = [group_config(group, parent) for parent in own.pop("defaults", []) if parent != "_self_"]
    return OmegaConf.to_container(OmegaConf.merge(*parents, own), resolve=True)
