"""Hostile inputs: every case ends in a correct result, or in one line `error (...): ...` with a non-zero exit, no
traceback and no lost or altered checkpoint or config. One test (or one table row) per failure a hostile-user review
reproduced, numbered as in that review:

 1 a checkpoint whose pickle runs code    5 decode.nfe=0                   9 a truncated cache shard (test_fault_injection)
 2 batch_size=-4 (hung)                   6 16-bit and other image modes  10 a rejected rerun overwrote config.yaml
 3 batch_size=0                           7 a symlink loop in a folder    11 SIGTERM/SIGINT in stage=cache (test_fault_injection)
 4 lr=nan                                 8 a full disk during a checkpoint write

and the doubtful behaviours, decided here: unreadable checkpoints, empty class folders, steps=0, negative CFG,
metrics rows after a resume, shard names in a manifest, a signal during start-up.
"""
from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from PIL import Image

from shared import runtime as runtime_lib
from shared.config_check import check_config, config_problems
from shared.data.decoding import decode_image
from shared.data.image_folder import FolderIndex
from shared.data.transforms import to_rgb
from shared.errors import ConfigError, DataError
from shared.train.checkpoint import CheckpointDir, atomic_save, load_checkpoint, refuse_code_in
from tests.helpers import REPO, load_config, run_cli

TINY_TOKENIZER = ["stage=tokenizer", "tokenizer=epsvae_tiny", "data.resolution=32", "data.train_size=16",
                  "data.val_size=4", "tokenizer.train.batch_size=4", "tokenizer.train.log_every=1",
                  "tokenizer.train.sample_every=0", "reconstruct.grid_images=4"]


pytestmark = pytest.mark.usefixtures("one_thread")


def assert_one_line_error(result: subprocess.CompletedProcess, kind: str, *fragments: str) -> str:
    """A failed run.py: non-zero exit, no traceback, and a last line `error (kind): ...` holding the fragments."""
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error ({kind}): "), last
    for fragment in fragments:
        assert fragment in last, last
    return last


# ------------------------------------------------------------------------------------ 1: checkpoints that run code
class RunsCode:
    """Unpickling this calls os.system: what a shared checkpoint could do to whoever loads it unsafely."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def malicious_checkpoint(path: Path, marker: Path, network: str = "tokenizer") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": 1, "config": {}, "models": {network: RunsCode(marker)}, "ema": {}}, path)
    return path


def loading_paths():
    """Every way the toolkit reads a checkpoint file it is given."""
    from stage1_tokenizer.tokenizer import load_tokenizer
    from stage2_ldm.cache import tokenizer_fingerprint
    from stage2_ldm.dit import load_dit

    return {
        "load_checkpoint": lambda path: load_checkpoint(path),
        "tokenizer.checkpoint": lambda path: load_tokenizer(path, "cpu"),
        "ldm.checkpoint": lambda path: load_dit(path, torch.device("cpu")),
        "cache fingerprint": lambda path: tokenizer_fingerprint(path),
        "a run's checkpoints/": lambda path: CheckpointDir(path.parent).load_latest(),
    }


@pytest.mark.parametrize("path_name", list(loading_paths()))
def test_a_checkpoint_whose_pickle_runs_code_is_refused_on_every_loading_path(tmp_path, path_name):
    marker = tmp_path / "code-ran"
    checkpoint = malicious_checkpoint(tmp_path / "checkpoints" / "step_000000001.pt", marker)
    with pytest.raises(DataError, match=r"holds a reference to posix.system") as error:
        loading_paths()[path_name](checkpoint)
    assert not marker.exists()
    assert "\n" not in str(error.value)


def test_a_deepspeed_shard_that_runs_code_is_refused_before_deepspeed_opens_it(tmp_path):
    from shared.train.backends import DEEPSPEED_GLOBALS

    marker = tmp_path / "code-ran"
    malicious_checkpoint(tmp_path / "deepspeed" / "step_000000001" / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                         marker)
    with pytest.raises(DataError, match=r"references posix.system, which a safe load refuses, so it was not opened"):
        refuse_code_in(tmp_path / "deepspeed" / "step_000000001", DEEPSPEED_GLOBALS)
    assert not marker.exists()


def test_a_training_state_that_runs_code_is_refused_and_inference_never_reads_it(tmp_path):
    from shared.train.checkpoint import load_model_state

    marker = tmp_path / "code-ran"
    weights = torch.nn.Linear(2, 2).state_dict()
    checkpoints = CheckpointDir(tmp_path / "checkpoints")
    path = checkpoints.save({"step": 1, "config": {}, "models": {"net": weights}}, 1)
    malicious_checkpoint(path, marker)  # the .pt replaced, its weights and header left beside it
    with pytest.raises(DataError, match=r"holds a reference to posix.system"):
        load_checkpoint(path)
    with pytest.raises(DataError, match=r"none of the 1 checkpoints .* holds a reference to posix.system"):
        checkpoints.load_latest()
    state_dict, _ = load_model_state(path, "net", use_ema=False)  # the safetensors and JSON only
    assert all(torch.equal(state_dict[name], tensor) for name, tensor in weights.items())
    assert not marker.exists()


@pytest.mark.slow
def test_a_checkpoint_that_runs_code_is_one_line_at_the_command_line(tmp_path):
    marker = tmp_path / "code-ran"
    checkpoint = malicious_checkpoint(tmp_path / "evil.pt", marker)
    result = run_cli("stage=reconstruct", "experiment=smoke", f"tokenizer.checkpoint={checkpoint}",
                     f"output_root={tmp_path}", "wandb.mode=disabled", check=False, timeout=120)
    assert_one_line_error(result, "DataError", "a safe load refuses, so nothing in it was run")
    assert not marker.exists()


def test_checkpoints_hold_only_tensors_and_plain_values(tmp_path):
    from stage1_tokenizer.train import train_tokenizer

    checkpoint = train_tokenizer(load_config([*TINY_TOKENIZER, "name=run", "tokenizer.train.steps=1"], tmp_path))
    checkpoint = Path(checkpoint["checkpoint"])
    assert torch.serialization.get_unsafe_globals_in_checkpoint(checkpoint) == []


def test_a_checkpoint_written_before_plain_rng_states_still_loads_and_resumes(tmp_path):
    """Older checkpoints held numpy's legacy RNG tuple (an ndarray): read without allowing code, and resumed."""
    from shared.train.loop import _set_rng_state

    state = {"python": __import__("random").getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    atomic_save({"step": 3, "rng": [state]}, tmp_path / "old.pt")
    loaded = load_checkpoint(tmp_path / "old.pt")
    _set_rng_state(loaded["rng"][0])
    expected = np.random.RandomState()
    expected.set_state(state["numpy"])
    assert np.random.random() == expected.random_sample()


# ------------------------------------------------------------------------------------ 2-4, steps=0, CFG: numbers
INVALID_SETTINGS = [  # (overrides separated by spaces, what the error says)
    ("tokenizer.train.batch_size=-4", "tokenizer.train.batch_size=-4 must be a whole number >= 1"),  # 2: hung
    ("tokenizer.train.batch_size=0", "tokenizer.train.batch_size=0 must be a whole number >= 1"),    # 3
    ("ldm.train.batch_size=2.5", "ldm.train.batch_size=2.5 must be a whole number >= 1"),
    ("tokenizer.train.lr=nan", "tokenizer.train.lr=nan must be a finite number > 0"),                # 4
    ("ldm.train.lr=-0.001", "ldm.train.lr=-0.001 must be a finite number > 0"),
    ("tokenizer.train.disc_lr=inf", "tokenizer.train.disc_lr=inf must be a finite number > 0"),
    ("decode.nfe=0", "decode.nfe=0 must be a whole number >= 1"),                                     # 5
    ("tokenizer.train.steps=0", "tokenizer.train.steps=0 must be a whole number >= 1"),             # wrote DONE
    ("sample.cfg_scale=-1.5", "sample.cfg_scale=-1.5 must be a finite number >= 0"),
    ("tokenizer.train.ema_decay=1.0", "tokenizer.train.ema_decay=1.0 must be a finite number in [0, 1)"),
    ("tokenizer.train.betas=[0.9,1.5]", "tokenizer.train.betas.1=1.5 must be a finite number in [0, 1)"),
    ("data.resolution=0", "data.resolution=0 must be a whole number in [1, 4096]"),
    ("cache.shard_size=-1", "cache.shard_size=-1 must be a whole number >= 1"),
    ("evaluate.bootstrap=-5", "evaluate.bootstrap=-5 must be a whole number >= 0"),
    ("tokenizer.loss.lpips=nan", "tokenizer.loss.lpips=nan must be a finite number >= 0"),
    ("tokenizer.flow.gamma=0", "tokenizer.flow.gamma=0 must be a finite number > 0"),
    ("ldm.train.grad_clip=0", "ldm.train.grad_clip=0 must be a finite number > 0, or null"),
    ("tokenizer.train.ckpt_every=0", "tokenizer.train.ckpt_every=0 must be a whole number >= 1"),
    ("ldm.train.batch_size=abc", "ldm.train.batch_size='abc' must be a whole number >= 1"),
    ("+tokenizer.extra=-inf", "tokenizer.extra=-inf must be finite"),
    # Round 2: values of the wrong shape or beyond what any run can hold (tracebacks, an empty run folder left).
    ("tokenizer.train.betas=0.9", "tokenizer.train.betas=0.9 must be a list of 2 items, e.g. [0.9, 0.999]"),
    ("sample.labels=3", "sample.labels=3 must be a list of at least 1 item, e.g. [0, tench, n01440764], or null"),
    ("tokenizer.encoder.channel_mult=2", "tokenizer.encoder.channel_mult=2 must be a list of at least 1 item"),
    ("pipeline.steps=tokenizer", "pipeline.steps='tokenizer' must be a list of at least 0 items"),
    ("cache.splits=train", "cache.splits='train' must be a list of at least 1 item, e.g. [train, val]"),
    ("reproduce.only=[]", "reproduce.only=[] must be a list of at least 1 item"),
    ("seed=4294967296", "seed=4294967296 must be a whole number in [0, 4294967295]"),
    (f"seed={2**70}", f"seed={2**70} must be a whole number in [0, 4294967295]"),
    (f"data.resolution={10**30}", f"data.resolution={10**30} must be a whole number in [1, 4096]"),
    ("data.resolution=65536", "data.resolution=65536 must be a whole number in [1, 4096]"),
    (f"data.train_size={10**30}", f"data.train_size={10**30} must be a whole number in [1, 2147483647]"),
    # Issue 24's settings: micro-steps, gFIDs during training (a covariance needs 2 samples), collectives' timeout.
    ("tokenizer.train.grad_accum=0", "tokenizer.train.grad_accum=0 must be a whole number >= 1"),
    ("ldm.train.grad_accum=-2", "ldm.train.grad_accum=-2 must be a whole number >= 1"),
    ("ldm.train.fid_every=-1", "ldm.train.fid_every=-1 must be a whole number >= 0"),
    ("ldm.train.fid_every=5 ldm.train.fid_samples=1",
     "ldm.train.fid_samples=1 must be a whole number >= 2 where ldm.train.fid_every > 0"),
    ("launcher=ddp launcher.timeout_minutes=0", "launcher.timeout_minutes=0 must be a finite number > 0"),
    ("launcher=deepspeed launcher.timeout_minutes=-5", "launcher.timeout_minutes=-5 must be a finite number > 0"),
]


@pytest.mark.parametrize(("override", "message"), INVALID_SETTINGS, ids=[case[0] for case in INVALID_SETTINGS])
def test_an_invalid_numeric_setting_is_refused_before_anything_is_written(tmp_path, override, message):
    cfg = load_config([*TINY_TOKENIZER, *override.split()], tmp_path)
    with pytest.raises(ConfigError, match="invalid setting") as error:
        runtime_lib.setup(cfg)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_a_negative_batch_size_exits_with_one_line_instead_of_hanging(tmp_path):
    result = run_cli(*TINY_TOKENIZER, "tokenizer.train.batch_size=-4", f"output_root={tmp_path}",
                     "wandb.mode=disabled", check=False, timeout=120)
    assert_one_line_error(result, "ConfigError", "tokenizer.train.batch_size=-4 must be a whole number >= 1")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("config", ["tokenizer=" + p.stem for p in sorted((REPO / "configs/tokenizer").glob("*.yaml"))]
                         + ["ldm=" + p.stem for p in sorted((REPO / "configs/ldm").glob("*.yaml"))]
                         + ["experiment=" + p.stem for p in sorted((REPO / "configs/experiment").glob("*.yaml"))]
                         + ["reproduce=" + p.stem for p in sorted((REPO / "configs/reproduce").glob("*.yaml"))])
def test_every_shipped_config_passes_the_validation(config):
    assert config_problems(load_config(["stage=pipeline", config])) == []


def test_a_preset_may_turn_the_resolution_claim_off_while_a_resolution_stays_checked():
    cfg = load_config(["stage=reproduce", "reproduce=fair32"])
    assert config_problems(cfg) == []
    cfg.reproduce.claims.resolution.resolution = 0
    assert config_problems(cfg) == ["reproduce.claims.resolution.resolution=0 must be a whole number in [1, 4096]"]
    cfg.reproduce.claims.resolution = None
    assert config_problems(cfg) == []


def test_fid_samples_need_two_only_where_gfids_are_computed():
    assert config_problems(load_config(["stage=ldm", "ldm.train.fid_every=0", "ldm.train.fid_samples=1"])) == []
    assert config_problems(load_config(["stage=ldm", "ldm.train.fid_every=5", "ldm.train.fid_samples=2"])) == []


BASE_CONFIG = load_config(["stage=pipeline", "experiment=smoke"])
NUMERIC_KEYS = ["tokenizer.train.batch_size", "tokenizer.train.lr", "tokenizer.train.ema_decay", "tokenizer.train.steps",
                "ldm.train.steps", "ldm.train.betas.0", "data.resolution", "sample.cfg_scale", "tokenizer.loss.kl",
                "ldm.depth", "decode.nfe", "cache.shard_size", "tokenizer.flow.gamma", "sample.steps",
                "reconstruct.num_images", "evaluate.reference_images"]
NULLABLE = {"sample.steps", "reconstruct.num_images", "evaluate.reference_images"}
HOSTILE_VALUES = st.one_of(st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
                           st.booleans(), st.none(), st.text(max_size=8))


def _set(container: dict, path: str, value) -> None:
    *parents, leaf = path.split(".")
    node = container
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    if isinstance(node, list):
        node[int(leaf)] = value
    else:
        node[leaf] = value


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.lists(st.tuples(st.sampled_from(NUMERIC_KEYS), HOSTILE_VALUES), min_size=1, max_size=4))
def test_any_value_of_any_numeric_setting_is_accepted_or_named_in_one_line(changes):
    """Property: the validation never crashes on a value's type, and a refused config names every bad key."""
    container = OmegaConf.to_container(BASE_CONFIG, resolve=True)
    for path, value in changes:
        _set(container, path, value)
    problems = config_problems(container)
    named = {problem.split("=", 1)[0] for problem in problems}
    for path, value in dict(changes).items():
        valid = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not valid and not (value is None and path in NULLABLE):
            assert path in named, (path, value, problems)
    if problems:
        with pytest.raises(ConfigError) as error:
            check_config(container)
        assert "\n" not in str(error.value)



# ------------------------------------------------------------------------------------ 5: NFE is used as given
def test_a_decoder_asked_for_zero_steps_refuses_instead_of_taking_its_default():
    from stage1_tokenizer.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(load_config(["tokenizer=epsvae_tiny"]).tokenizer).eval()
    latents = torch.zeros(1, tokenizer.latent_channels, 2, 2)
    with pytest.raises(ValueError, match="at least one sampling step"):
        tokenizer.decode(latents, nfe=0)


# ------------------------------------------------------------------------------------ 6: every image mode
def _saved(image: Image.Image, fmt: str) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return decode_image(io.BytesIO(buffer.getvalue()), f"test.{fmt.lower()}")


GREY_16 = Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))  # mid-grey at 16 bits
IMAGE_MODES = [  # (id, image as decoded from a file, the RGB of pixel (0, 0))
    ("16-bit PNG", lambda: _saved(GREY_16, "PNG"), (128, 128, 128)),
    ("16-bit TIFF", lambda: _saved(GREY_16, "TIFF"), (128, 128, 128)),
    ("32-bit int", lambda: to_rgb(Image.fromarray(np.full((8, 8), 65535, dtype=np.int32), mode="I")), (255,) * 3),
    ("float", lambda: to_rgb(Image.fromarray(np.full((8, 8), 0.25, dtype=np.float32), mode="F")), (64, 64, 64)),
    ("float TIFF", lambda: _saved(Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32), mode="F"), "TIFF"),
     (128, 128, 128)),
    ("1-bit", lambda: _saved(Image.new("1", (8, 8), 1), "PNG"), (255, 255, 255)),
    ("greyscale", lambda: _saved(Image.new("L", (8, 8), 77), "PNG"), (77, 77, 77)),
    ("RGBA half transparent", lambda: _saved(Image.new("RGBA", (8, 8), (0, 0, 200, 128)), "PNG"), (127, 127, 227)),
    ("LA transparent", lambda: _saved(Image.new("LA", (8, 8), (0, 0)), "PNG"), (255, 255, 255)),
    ("palette with transparency", lambda: _saved(_transparent_palette(), "PNG"), (255, 255, 255)),
    ("CMYK TIFF", lambda: _saved(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "TIFF"), (255, 0, 0)),
    ("BMP", lambda: _saved(Image.new("RGB", (8, 8), (10, 20, 30)), "BMP"), (10, 20, 30)),
    ("WebP lossless", lambda: _saved_webp(), (10, 200, 30)),
]


def _transparent_palette() -> Image.Image:
    image = Image.new("P", (8, 8), 0)
    image.putpalette([255, 0, 0] * 256)
    image.info["transparency"] = 0
    return image


def _saved_webp() -> Image.Image:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buffer, "WEBP", lossless=True)
    return decode_image(io.BytesIO(buffer.getvalue()), "test.webp")


@pytest.mark.parametrize(("make", "expected"), [case[1:] for case in IMAGE_MODES], ids=[c[0] for c in IMAGE_MODES])
def test_every_image_mode_is_read_as_its_rgb_values(make, expected):
    image = make()
    assert image.mode == "RGB"
    assert all(abs(a - b) <= 2 for a, b in zip(image.getpixel((0, 0)), expected)), image.getpixel((0, 0))


def test_a_16_bit_image_folder_trains_on_its_values_not_on_white(tmp_path):
    """The reviewer's case: a 16-bit greyscale PNG was 98% white after preprocessing."""
    from shared.data.image_folder import ImageFolder

    for split in ("train", "val"):
        (tmp_path / split / "n1").mkdir(parents=True)
        ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
        Image.fromarray(ramp).save(tmp_path / split / "n1" / "ramp.png")
    item = ImageFolder(FolderIndex(tmp_path, "train"), resolution=32)[0]
    assert item["image"].mean().item() == pytest.approx(0.0, abs=0.02)  # a 0..1 ramp has mean 0 in [-1, 1]


# ------------------------------------------------------------------------------------ 7: directory walking
def test_unreadable_folder_entries_are_skipped_and_counted(tmp_path, data_log):
    classes = tmp_path / "train"
    (classes / "n1").mkdir(parents=True)
    (classes / "n2").mkdir()
    Image.new("RGB", (8, 8)).save(classes / "n1" / "good.png")
    Image.new("RGB", (8, 8)).save(classes / "n2" / "good.png")
    os.symlink(classes / "n1" / "loop.png", classes / "n1" / "loop.png")   # a symlink loop named like an image
    os.symlink(classes / "n2" / "gone.jpg", classes / "n2" / "dangling.jpg")  # a link to nothing
    os.symlink(classes / "n3", classes / "n3")                               # a looping class folder
    index = FolderIndex(tmp_path, "train")
    assert [index.relative_path(i) for i in range(len(index))] == ["n1/good.png", "n2/good.png"]
    assert index.unreadable_entries == 3
    assert any("3 unreadable entries skipped" in record.getMessage() for record in data_log)


def test_an_empty_class_folder_keeps_its_index_and_is_reported(tmp_path, data_log):
    """Decided: labels are positions in the sorted folder list, which must agree across splits, so an empty folder
    keeps its index (the class has no images in this split) and a warning names it."""
    for wnid in ("a", "b", "c"):
        (tmp_path / "train" / wnid).mkdir(parents=True)
    for wnid in ("a", "c"):
        Image.new("RGB", (8, 8)).save(tmp_path / "train" / wnid / "x.png")
    index = FolderIndex(tmp_path, "train")
    assert index.labels.tolist() == [0, 2] and index.num_classes == 3
    assert any("class folders without images (their class indices stay reserved): b" in record.getMessage()
               for record in data_log)


# ------------------------------------------------------------------------------------ 8: a full disk
def test_a_full_disk_inside_torch_save_is_one_error_and_leaves_no_temporary(tmp_path, monkeypatch):
    """torch.save's writer raises RuntimeError, not OSError, when the disk fills up."""
    checkpoints = CheckpointDir(tmp_path, keep=1)
    checkpoints.save({"step": 1, "weights": torch.ones(10)}, 1)

    def full_disk(obj, f):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(DataError, match=r"could not write checkpoint .*PytorchStreamWriter failed writing file.*"
                                        r"the previous checkpoint .* is kept"):
        checkpoints.save({"step": 2, "weights": torch.zeros(10)}, 2)
    monkeypatch.undo()
    # Step 2's weights, written before its training state failed, went with it.
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"step_000000001{suffix}" for suffix in
                                                         (".json", ".pt", ".safetensors")]
    assert checkpoints.load_latest()["step"] == 1


# ------------------------------------------------------------------------------------ 10, resumes: run folders
def test_a_rejected_rerun_leaves_the_run_folder_config_as_it_was(tmp_path):
    from stage1_tokenizer.train import train_tokenizer

    train_tokenizer(load_config([*TINY_TOKENIZER, "name=run", "tokenizer.train.steps=1"], tmp_path))
    config = tmp_path / "tokenizer" / "run" / "config.yaml"
    before = config.read_bytes()
    with pytest.raises(ConfigError, match="another model config"):  # even when asked to continue with changes
        train_tokenizer(load_config([*TINY_TOKENIZER, "name=run", "tokenizer.train.steps=2",
                                     "tokenizer.encoder.base_channels=8", "resume_changed=true"], tmp_path))
    assert config.read_bytes() == before


def test_a_run_whose_checkpoints_are_all_unreadable_is_refused_not_restarted(tmp_path):
    """Decided: starting over from step 0 would silently throw the run away; the user moves the files instead."""
    from stage1_tokenizer.train import train_tokenizer

    checkpoint = Path(train_tokenizer(load_config([*TINY_TOKENIZER, "name=run", "tokenizer.train.steps=1"],
                                                  tmp_path))["checkpoint"])
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    with pytest.raises(DataError, match=r"none of the 1 checkpoints in .* can be read .* move them out"):
        train_tokenizer(load_config([*TINY_TOKENIZER, "name=run", "tokenizer.train.steps=1"], tmp_path))
    assert checkpoint.stat().st_size == 100  # left for the user to inspect


def test_metrics_of_a_resumed_run_have_one_row_per_step(tmp_path):
    """Decided: steps computed again after a resume replace their earlier rows."""
    from stage1_tokenizer.train import train_tokenizer

    steps = ["name=run", "tokenizer.train.ckpt_every=2", "tokenizer.train.steps=3"]
    result = train_tokenizer(load_config([*TINY_TOKENIZER, *steps], tmp_path))
    last = Path(result["checkpoint"])
    last.unlink()  # as if killed after logging step 3 and before its checkpoint landed: resume at 2
    train_tokenizer(load_config([*TINY_TOKENIZER, *steps], tmp_path))
    rows = (tmp_path / "tokenizer" / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(row)["step"] for row in rows] == [1, 2, 3]


def test_a_manifest_cannot_point_a_shard_outside_its_cache(tmp_path):
    from shared.data.latents import FORMAT_VERSION, MANIFEST, LatentCache

    split = tmp_path / "train"
    split.mkdir()
    manifest = {"format": FORMAT_VERSION, "fingerprint": {"tokenizer": "x"}, "latent_shape": [4, 2, 2],
                "shards": [{"name": "../../etc", "count": 1, "files": {}}]}
    (split / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"names a shard '../../etc', which is not a shard folder name"):
        LatentCache(tmp_path, "train")


# ------------------------------------------------------------------------------------ a signal during start-up
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_start_up_exits_with_one_line(tmp_path, sig):
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, str(REPO / "pipelines" / "run.py"), *TINY_TOKENIZER,
                                f"output_root={tmp_path}", "wandb.mode=disabled"], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # inside the imports of Hydra and torch, well before the first step
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith(f"received {sig.name} outside a step that saves")


def test_a_signal_during_the_imports_is_acted_on_once_they_are_done(monkeypatch):
    """The test above once failed under load: the handler raised while torch was being imported, inside its C++
    (pybind11), and the process aborted; another time the exit surfaced as another exception, which Hydra printed
    with a traceback. During start-up's imports a signal is now remembered and exits with its one line after
    them."""
    from shared import preemption

    monkeypatch.setattr(preemption, "_deferred", None)
    previous = {sig: signal.getsignal(sig) for sig in preemption.SIGNALS}
    try:
        preemption.defer_signals()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)  # the handler has run, and raised nothing
        with pytest.raises(preemption.Preempted, match="^received SIGTERM outside a step that saves"):
            preemption.exit_cleanly_on_signals()
        monkeypatch.setattr(preemption, "_deferred", None)
        preemption.exit_cleanly_on_signals()  # nothing remembered: from here on a signal exits at once
        with pytest.raises(preemption.Preempted, match="^received SIGINT outside a step that saves"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_metrics_read_every_still_image_format(tmp_path):
    """stage=metrics refused a folder of BMP files; it reads what the image folders read, by the same rules."""
    from shared.data.image_files import FolderImages

    colour = (10, 200, 30)
    for fmt, suffix in (("BMP", "bmp"), ("TIFF", "tiff"), ("WEBP", "webp"), ("PNG", "png")):
        Image.new("RGBA", (8, 8), (*colour, 255)).save(tmp_path / f"image_{suffix}.{suffix}", fmt, lossless=True)
    images = FolderImages(tmp_path)
    assert images.names == ["image_bmp", "image_png", "image_tiff", "image_webp"]
    assert images.read(0, 4)[:, :, 0, 0].tolist() == [list(colour)] * 4
