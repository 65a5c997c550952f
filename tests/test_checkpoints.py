"""The checkpoint layout: the weights as safetensors beside a JSON header, the training state in a .pt of tensors and
plain values; a checkpoint exists once its .pt landed; a single-file checkpoint written before still reads."""
import json
import random

import pytest
import safetensors.torch
import torch
from torch import nn

from pipelines.configs import group_config
from shared.train.checkpoint import (CheckpointDir, config_digest, load_checkpoint, load_model_state,
                                     resolve_checkpoint)
from stage1_tokenizer.tokenizer import build_tokenizer, load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
SUFFIXES = (".json", ".pt", ".safetensors")


def training_state(step: int) -> dict:
    """What the training loop saves, with tied weights and a network whose EMA is its own tensors."""
    torch.manual_seed(step)
    net = nn.Linear(3, 4)
    tied = nn.ModuleDict({"embed": nn.Embedding(4, 3), "head": nn.Linear(3, 4, bias=False)})
    tied.head.weight = tied.embed.weight
    optimizer = torch.optim.AdamW(net.parameters())
    net(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    return {"step": step, "config": {"width": 4, "kinds": ["a", "b"], "scale": 0.5},
            "models": {"net": net.state_dict(), "tied": tied.state_dict()}, "ema": {"net": net.state_dict()},
            "backend": {"optimizers": {"model": optimizer.state_dict()}},
            "rng": [{"torch": torch.get_rng_state(), "python": random.getstate()}], "counters": {"nonfinite_steps": 1}}


def assert_same(a, b, where: str = "checkpoint") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{index}]")
    elif torch.is_tensor(a):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


def names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_checkpoint_is_weights_header_and_training_state_and_reads_back_as_saved(tmp_path):
    state = training_state(7)
    path = CheckpointDir(tmp_path).save(state, 7)
    assert names(tmp_path) == [f"step_000000007{suffix}" for suffix in SUFFIXES]
    weights = safetensors.torch.load_file(path.with_suffix(".safetensors"))
    assert set(weights) == {f"{group}.{network}.{name}" for group in ("models", "ema")
                            for network, state_dict in state[group].items() for name in state_dict}
    assert json.loads(path.with_suffix(".json").read_text()) == {"step": 7, "config": state["config"]}
    # No weights; the step and the config's digest tie the training state and the weights to the header.
    assert set(torch.load(path, weights_only=True)) == {"step", "backend", "rng", "counters", "config_digest"}
    with safetensors.safe_open(path.with_suffix(".safetensors"), framework="pt") as stored:
        assert stored.metadata() == {"step": "7", "config_digest": config_digest(state["config"])}
    assert_same(load_checkpoint(tmp_path), state)


def test_inference_reads_the_weights_and_header_alone(tmp_path):
    config = group_config("tokenizer", "epsvae_tiny")
    config.pop("train")
    torch.manual_seed(0)
    weights = build_tokenizer(config).state_dict()
    ema = {name: tensor + 1 if tensor.is_floating_point() else tensor for name, tensor in weights.items()}
    path = CheckpointDir(tmp_path).save({"step": 3, "config": config, "models": {"tokenizer": weights},
                                         "ema": {"tokenizer": ema}, "rng": []}, 3)
    path.unlink()  # the training state gone
    tokenizer = load_tokenizer(path.with_suffix(".safetensors"), "cpu")
    assert_same(dict(tokenizer.state_dict()), ema)
    state_dict, stored_config = load_model_state(path.with_suffix(".safetensors"), "tokenizer", use_ema=False)
    assert_same(state_dict, weights)
    assert stored_config == config


def test_a_single_file_checkpoint_written_before_the_weights_moved_out_still_reads(tmp_path):
    state = training_state(7)
    torch.save(state, tmp_path / "step_000000007.pt")  # the old layout: everything in the .pt
    assert_same(load_checkpoint(tmp_path), state)
    state_dict, config = load_model_state(tmp_path, "net")
    assert_same(state_dict, state["ema"]["net"])
    assert config == state["config"]


def test_retention_deletes_every_file_of_an_old_checkpoint(tmp_path):
    checkpoints = CheckpointDir(tmp_path, keep=2)
    for step in (1, 2, 3):
        checkpoints.save(training_state(step), step)
    assert names(tmp_path) == [f"step_00000000{step}{suffix}" for step in (2, 3) for suffix in SUFFIXES]


def test_weights_whose_training_state_never_landed_are_no_checkpoint(tmp_path):
    """A kill between the weights and the .pt: that step does not exist, and the next save removes its files."""
    checkpoints = CheckpointDir(tmp_path)
    checkpoints.save(training_state(1), 1)
    checkpoints.save(training_state(2), 2)
    checkpoints.path(2).unlink()
    assert checkpoints.steps() == [1] and resolve_checkpoint(tmp_path) == checkpoints.path(1)
    assert checkpoints.load_latest()["step"] == 1
    checkpoints.save(training_state(3), 3)
    assert names(tmp_path) == [f"step_00000000{step}{suffix}" for step in (1, 3) for suffix in SUFFIXES]
