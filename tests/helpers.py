"""Small pieces several test files use."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from omegaconf import DictConfig, open_dict

from pipelines.configs import compose_config
from shared.train.loop import TrainModule

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to `count` inside the block, restored after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def tiny_tokenizer_and_cache(root: Path, overrides: list[str]) -> tuple[Path, Path]:
    """(checkpoint, cache folder): a tokenizer trained with `overrides` in root/tokenizer on one thread, and the
    latent cache of its training split in root/cache."""
    from stage1_tokenizer.train import train_tokenizer
    from stage2_ldm.cache import main as cache_main

    torch.set_num_threads(1)
    checkpoint = Path(train_tokenizer(load_config(["stage=tokenizer", *overrides], root),
                                      run_dir=root / "tokenizer")["checkpoint"])
    cache_main(load_config(["stage=cache", *overrides, f"tokenizer.checkpoint={checkpoint}",
                            f"cache.dir={root / 'cache'}"], root))
    return checkpoint, root / "cache"


def tiny_preset_command(tmp_path: Path, stage: str, name: str, text: str) -> tuple[list[str], Path]:
    """(command line, results folder) of `stage` on the preset `name`, written from the YAML `text` where Hydra
    finds it; its runs and results go under tmp_path, on the CPU, quietly."""
    folder = tmp_path / "presets" / "reproduce"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(text)
    out = tmp_path / "results"
    return [f"stage={stage}", f"reproduce={name}", f"hydra.searchpath=[file://{tmp_path / 'presets'}]",
            f"reproduce.out={out}", f"output_root={tmp_path}", "wandb.mode=disabled", "progress=false",
            "device=cpu"], out


def load_config(overrides: list[str], output_root: Path | None = None) -> DictConfig:
    """The config `pipelines/run.py` would see for these overrides."""
    cfg = compose_config(overrides)
    with open_dict(cfg):
        cfg.wandb.mode = "disabled"
        cfg.progress = False
        if output_root is not None:
            cfg.output_root = str(output_root)
    return cfg


# Threads per test process: README's `pytest -n 2` gives each of its two workers one of the two cores, and the
# subprocesses a test starts inherit that share.
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600, check: bool = True, script: str = "run.py"):
    """Run `python pipelines/SCRIPT ARGS` in a subprocess and return the CompletedProcess."""
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": str(THREADS), "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, str(REPO / "pipelines" / script), *args], cwd=cwd or REPO, env=env,
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


class ToyRegression(TrainModule):
    """The training loop's test module: one small MLP under one optimiser ("model"); subclasses give its loss."""

    def __init__(self, seed: int | None = None):
        super().__init__()
        if seed is not None:  # the same initial weights in every test that builds one
            torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

    def phases(self):
        return ["model"]

    def phase_parameters(self, phase):
        return list(self.net.parameters())

    def networks(self):
        return {"net": self.net}
