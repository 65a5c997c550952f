"""Foreign files are checked before use (hostile inputs, round 2, section 3): a diffusers config.json, a
facebookresearch/DiT state dict and a shard index are someone else's files. Each value a converter reads is checked
before anything is built or allocated, and a bad one is one DataError naming it; a property test throws generated
hostile config.json files and checkpoint .json files at the readers."""
from __future__ import annotations

import contextlib
import json
import math
import resource
import signal
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.errors import DataError
from shared.foreign_weights import check_source_weights, read_folder_weights
from shared.train.checkpoint import CheckpointDir, load_checkpoint, resolve_checkpoint
from stage1_tokenizer.convert import AUTOENCODER_DEFAULTS, autoencoder_from_vae, vae_config, vae_from_autoencoder
from stage1_tokenizer.tokenizer import build_tokenizer
from stage2_ldm.convert import diffusers_from_dit, dit_from_diffusers, dit_from_official, official_from_dit
from stage2_ldm.dit import DiT

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_autoencoder() -> tuple[dict, dict]:
    """(config.json, state dict) of a tiny AutoencoderKL, made by our own exact export of a VAE of its layout."""
    ours = vae_config({**AUTOENCODER_DEFAULTS, "block_out_channels": [32, 32]})
    torch.manual_seed(0)
    return autoencoder_from_vae(ours, build_tokenizer(ours).state_dict())


def tiny_dit() -> DiT:
    torch.manual_seed(0)
    return DiT(input_size=4, in_channels=4, num_classes=10, patch_size=2, hidden_size=32, depth=2, num_heads=2)


AUTOENCODER, AUTOENCODER_STATE = tiny_autoencoder()
DIFFUSERS_DIT, DIFFUSERS_DIT_STATE = diffusers_from_dit(tiny_dit(), approximate=True)
OFFICIAL_DIT_STATE = official_from_dit(tiny_dit().state_dict())


@contextlib.contextmanager
def bounded(seconds: int = 60, extra_bytes: int = 2 * 2**30):
    """The block may take at most `seconds` and allocate at most `extra_bytes` beyond what the process maps now
    (an allocation above it fails inside the block): a hang or a huge allocation fails the test instead of the
    machine."""
    mapped = int(next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines()
                      if line.startswith("VmSize:"))) * 1024

    def too_long(signum, frame):
        raise TimeoutError(f"took more than {seconds} s")

    limits = resource.getrlimit(resource.RLIMIT_AS)
    previous = signal.signal(signal.SIGALRM, too_long)
    resource.setrlimit(resource.RLIMIT_AS, (mapped + extra_bytes, limits[1]))
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        resource.setrlimit(resource.RLIMIT_AS, limits)
        signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------------------------ diffusers config.json values
AUTOENCODER_CASES = [  # (key, value, what the one line says)
    ("block_out_channels", [], "block_out_channels=[] must be a list of 1 to"),
    ("block_out_channels", [0, 0], "block_out_channels=[0, 0] must be a list"),                # ZeroDivisionError
    ("block_out_channels", "abc", "block_out_channels='abc' must be a list"),
    ("block_out_channels", [32.0, 32.0], "block_out_channels=[32.0, 32.0] must be a list"),   # TypeError
    ("block_out_channels", [10**9] * 3, "each a whole number in [1, "),                     # 4 GB
    ("layers_per_block", 10**7, "layers_per_block=10000000 must be a whole number in [0, "),  # hung
    ("scaling_factor", "abc", "scaling_factor='abc' must be a finite number > 0"),            # ValueError
    ("scaling_factor", None, "scaling_factor=None must be a finite number > 0"),              # TypeError
    ("scaling_factor", math.nan, "scaling_factor=nan must be a finite number > 0"),           # imported silently
    ("scaling_factor", 0, "scaling_factor=0 must be a finite number > 0"),                    # ZeroDivisionError later
    ("latent_channels", 10**12, "latent_channels=1000000000000 must be a whole number in [1, "),
    ("use_quant_conv", "no", "use_quant_conv='no' must be true or false"),
]


@pytest.mark.parametrize(("key", "value", "message"), AUTOENCODER_CASES,
                         ids=[f"{key}={value!r}"[:40] for key, value, _ in AUTOENCODER_CASES])
def test_a_bad_autoencoder_config_value_is_one_data_error_naming_it(key, value, message):
    with bounded(), pytest.raises(DataError) as error:
        vae_from_autoencoder({**AUTOENCODER, key: value}, dict(AUTOENCODER_STATE))
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)


DIT_CASES = [
    ("num_attention_heads", 0, "num_attention_heads=0 must be a whole number in [1, "),       # ZeroDivisionError
    ("patch_size", 0, "patch_size=0 must be a whole number in [1, "),                          # ZeroDivisionError
    ("sample_size", 2**20, "computing its position embedding (274877906944 tokens × 32 channels, in float64) "
                           "would need"),                                                       # tried 8.6 GB
    ("attention_head_dim", "16", "attention_head_dim='16' must be a whole number"),
    ("num_embeds_ada_norm", True, "num_embeds_ada_norm=True must be a whole number"),
    ("norm_eps", -1, "norm_eps=-1 must be a finite number > 0"),
    ("sample_size", 5, "sample_size=5 is not a multiple of its patch_size=2"),
]


@pytest.mark.parametrize(("key", "value", "message"), DIT_CASES,
                         ids=[f"{key}={value!r}" for key, value, _ in DIT_CASES])
def test_a_bad_dit_config_value_is_one_data_error_naming_it(key, value, message):
    with bounded(), pytest.raises(DataError) as error:
        dit_from_diffusers({**DIFFUSERS_DIT, key: value}, dict(DIFFUSERS_DIT_STATE))
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)


@pytest.mark.parametrize(("name", "shape", "message"), [
    ("x_embedder.proj.weight", (32, 4), "x_embedder.proj.weight has shape (32, 4), not 4 non-zero dimensions"),
    ("x_embedder.proj.weight", (32, 4, 0, 0), "has shape (32, 4, 0, 0), not 4 non-zero dimensions"),  # patch 0
    ("pos_embed", (4, 32), "pos_embed has shape (4, 32), not 3 non-zero dimensions"),
    ("blocks.1.attn.qkv.weight", (96, 31), "blocks.1.attn.qkv.weight has shape (96, 31) where the DiT its other "
                                           "tensors describe has (96, 32)"),
])
def test_an_official_dit_state_dict_is_checked_tensor_by_tensor_before_use(name, shape, message):
    state = {**OFFICIAL_DIT_STATE, name: torch.zeros(shape)}
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        dit_from_official(state, num_heads=2)


def test_a_diffusers_qkv_part_of_another_shape_is_one_data_error():
    state = {**DIFFUSERS_DIT_STATE, "transformer_blocks.0.attn1.to_k.weight": torch.zeros(32, 16)}
    with pytest.raises(DataError, match=r"to_k.weight has shape \(32, 16\) where the DiT its other tensors describe "
                                        r"has \(32, 32\)"):  # torch.cat raised RuntimeError
        dit_from_diffusers(DIFFUSERS_DIT, state)


@pytest.mark.parametrize(("weight_map", "message"), [
    ({"a": 5}, "weight_map names 5, which is not a file name in its folder"),                    # TypeError
    (["a.safetensors"], "weight_map must be a non-empty object"),                                 # AttributeError
    ({"a": "../vae/diffusion_pytorch_model.safetensors"}, "names '../vae/diffusion_pytorch_model.safetensors'"),
])
def test_a_shard_index_names_files_of_its_own_folder_only(tmp_path, weight_map, message):
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(DataError, match=message.replace("[", r"\[")):
        read_folder_weights(tmp_path)


@pytest.mark.parametrize(("tensor", "message"), [
    (torch.ones(2, dtype=torch.int64), "holds torch.int64 values, not floating-point weights"),   # cast silently
    (torch.ones(2, dtype=torch.bool), "holds torch.bool values"),
    (torch.tensor([1.0, math.nan]), "holds NaN or infinite values; pass import.allow_nonfinite=true"),
])
def test_weights_that_are_not_finite_floats_are_refused(tensor, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_source_weights({"w": tensor}, allow_nonfinite=False, source="x")
    if tensor.is_floating_point():
        check_source_weights({"w": tensor}, allow_nonfinite=True, source="x")  # asked for


# ------------------------------------------------------------------------------------ properties
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=6),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=8)
SIZES = st.integers(-3, 2**40) | st.sampled_from([0, 1, 2, 4, 32, 64, 10**7, 2**31])


def hostile_config(base: dict, keys, small: tuple[str, ...] = ()) -> st.SearchStrategy[dict]:
    """`base` with some of `keys` set to hostile values: sizes around the edges, wrong types, lists of them. The
    `small` keys get no large sizes: what they size fits in memory up to the machine's (and is then computed), which
    the bound of the test does not allow; a larger one is refused (the cases above hold that)."""
    value = JSON_VALUES | SIZES | st.lists(SIZES, max_size=5)
    small_value = JSON_VALUES.filter(lambda v: not isinstance(v, int) or v <= 64) | st.integers(-2, 64)
    changes = st.dictionaries(st.sampled_from(sorted(keys)), value, min_size=1, max_size=4)
    small_changes = st.dictionaries(st.sampled_from(small), small_value, max_size=len(small)) if small else st.just({})
    return st.tuples(changes, small_changes).map(lambda both: {**base, **both[0], **both[1]})


PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@PROPERTY
@given(config=hostile_config(AUTOENCODER, [*AUTOENCODER_DEFAULTS, "_class_name"]))
def test_any_autoencoder_config_json_converts_or_is_one_data_error(config):
    with bounded():
        try:
            vae_from_autoencoder(config, dict(AUTOENCODER_STATE))
        except DataError as error:
            assert "\n" not in str(error)


@PROPERTY
@given(config=hostile_config(DIFFUSERS_DIT, [key for key in [*DIFFUSERS_DIT, "_class_name"] if key != "sample_size"],
                            small=("sample_size",)))
def test_any_dit_config_json_converts_or_is_one_data_error(config):
    with bounded():
        try:
            dit_from_diffusers(config, dict(DIFFUSERS_DIT_STATE))
        except DataError as error:
            assert "\n" not in str(error)


@pytest.fixture(scope="module")
def saved_tokenizer(tmp_path_factory) -> Path:
    """A run's checkpoints folder with one tokenizer checkpoint, as training saves it."""
    from pipelines.configs import group_config

    config = group_config("tokenizer", "vae_tiny")
    config.pop("train")
    folder = tmp_path_factory.mktemp("run") / "checkpoints"
    CheckpointDir(folder).save({"step": 1, "config": config, "models": {"tokenizer": build_tokenizer(config)
                                                                          .state_dict()}}, 1)
    return folder


@PROPERTY
@given(header=st.one_of(JSON_VALUES, st.fixed_dictionaries({"step": JSON_VALUES, "config": JSON_VALUES}),
                        st.text(max_size=20)))
def test_any_checkpoint_json_reads_as_saved_or_is_one_data_error(saved_tokenizer, header):
    from stage1_tokenizer.tokenizer import load_tokenizer

    header_file = saved_tokenizer / "step_000000001.json"
    original = header_file.read_bytes()
    header_file.write_text(header if isinstance(header, str) else json.dumps(header))
    try:
        with bounded():
            for read in (lambda: load_checkpoint(header_file.with_suffix(".pt")),
                         lambda: load_tokenizer(header_file.with_suffix(".safetensors"), "cpu"),
                         lambda: resolve_checkpoint(saved_tokenizer)):
                try:
                    read()
                except DataError as error:
                    assert "\n" not in str(error)
    finally:
        header_file.write_bytes(original)


# ------------------------------------------------------------------------------------ stage=metrics' image sets
def test_a_decompression_bomb_in_a_metrics_folder_is_one_data_error(tmp_path):
    """A 14000 × 14000 PNG (600 KB on disk) raised Pillow's DecompressionBombError traceback."""
    from PIL import Image

    from shared.data.image_files import FolderImages

    Image.new("1", (14000, 14000)).save(tmp_path / "bomb.png")  # 1-bit: 24 MB to draw, a few KB on disk
    with pytest.raises(DataError, match=r"cannot read the image .*bomb\.png: Image size \(196000000 pixels\) "
                                        r"exceeds limit"):
        FolderImages(tmp_path)


def test_huge_images_are_read_a_few_at_a_time(tmp_path, monkeypatch):
    """Three 8000 × 8000 pairs were stacked into one batch (4.6 GB); a batch now holds a bounded number of pixels."""
    import shared.data.image_files as image_files

    monkeypatch.setattr(image_files, "PIXELS_PER_BATCH", 2 * 16 * 16)  # two 16 × 16 images, as 8000² at 2**26
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    npz = image_files.write_npz(tmp_path / "set.npz", images)
    image_files.save_images(images, tmp_path / "folder", [f"{i}" for i in range(5)])
    for image_set in (image_files.open_images(npz), image_files.open_images(tmp_path / "folder")):
        batches = list(image_set.batches(batch_size=64))
        assert [len(names) for names, _ in batches] == [2, 2, 1]
        assert torch.equal(torch.cat([batch for _, batch in batches]), images)


def test_an_npz_is_checked_against_its_own_size_before_anything_is_allocated(tmp_path):
    import zipfile

    import numpy as np

    from shared.data.image_files import open_images

    path = tmp_path / "lies.npz"
    with zipfile.ZipFile(path, "w") as archive, archive.open("arr_0.npy", "w") as member:
        np.lib.format.write_array_header_2_0(member, {"descr": "|u1", "fortran_order": False,
                                                      "shape": (10**6, 4096, 4096, 3)})
        member.write(bytes(48))  # 50 TB declared, 48 bytes held
    with pytest.raises(DataError, match=r"arr_0's header declares \(1000000, 4096, 4096, 3\) \(50331648000000 "
                                        r"bytes\) but it holds 48 bytes"):
        open_images(path)
