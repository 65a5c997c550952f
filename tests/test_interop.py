"""Weights in and out: diffusers' AutoencoderKL and DiTTransformer2DModel and facebookresearch/DiT state dicts,
converted into our VAE baseline and DiT and back, compute what the originals compute (fp32, 1e-5); the imported
checkpoints run through load_tokenizer and the stages; files that do not fit are one-line errors."""
import argparse
import json
import math

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from pipelines.interop import export_weights, import_weights
from shared.errors import ConfigError, DataError
from shared.foreign_weights import read_diffusers_model, read_state_dict
from shared.train.checkpoint import CheckpointDir, load_checkpoint
from stage1_tokenizer.convert import initial_encoder, vae_from_autoencoder
from stage1_tokenizer.objective import build_objective as build_tokenizer_objective
from stage1_tokenizer.tokenizer import build_tokenizer, load_tokenizer
from stage1_tokenizer.train import adopt_initial_encoder, train_tokenizer
from stage2_ldm.cache import main as cache_main
from stage2_ldm.convert import dit_from_diffusers, dit_from_official, official_from_dit
from stage2_ldm.dit import DiT, load_dit
from stage2_ldm.sample import sample_to_folder
from tests.helpers import load_config, run_cli

diffusers = pytest.importorskip("diffusers")  # the bench extra: the other side of every round trip
AutoencoderKL, DiTTransformer2DModel = diffusers.AutoencoderKL, diffusers.DiTTransformer2DModel

ATOL = 1e-5
SD_SCALE = 0.18215
# Tiny stand-ins: SD-VAE's layout (DownEncoderBlock2D levels, one mid-block attention head) at f4 and 32-64
# channels; DiT-XL/2's layout (learned sigma: 8 output channels) at width 32, depth 2, on 4×4 latents.
VAE_SHAPE = {"block_out_channels": (32, 32, 64), "layers_per_block": 1, "latent_channels": 4,
             "norm_num_groups": 32, "down_block_types": ("DownEncoderBlock2D",) * 3,
             "up_block_types": ("UpDecoderBlock2D",) * 3}
DIT_SHAPE = {"num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 4, "out_channels": 8,
             "num_layers": 2, "sample_size": 4, "patch_size": 2, "num_embeds_ada_norm": 10}


def randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (zero-initialised output layers included), so that a wrong name shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model.eval()


def share_block_embeddings(model: DiTTransformer2DModel) -> DiTTransformer2DModel:
    """Block 0's timestep + label embedding copied into every block, as conversions of DiT checkpoints do."""
    for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
    return model


@pytest.fixture(scope="module")
def autoencoder(tmp_path_factory):
    """A random AutoencoderKL and its save_pretrained folder."""
    model = randomise(AutoencoderKL(**VAE_SHAPE), seed=0)
    folder = tmp_path_factory.mktemp("autoencoder")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def diffusers_dit(tmp_path_factory):
    model = share_block_embeddings(randomise(DiTTransformer2DModel(**DIT_SHAPE), seed=1))
    folder = tmp_path_factory.mktemp("dit")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def imported(tmp_path_factory, autoencoder, diffusers_dit):
    """Both diffusers models through stage=import: {"root", "tokenizer", "dit"} (run folders)."""
    root = tmp_path_factory.mktemp("imported")
    import_weights(load_config(["stage=import", f"import.source={autoencoder[1]}", "name=vae"], root))
    import_weights(load_config(["stage=import", f"import.source={diffusers_dit[1]}", "name=dit",
                                f"tokenizer.checkpoint={root / 'import' / 'vae'}"], root))
    return {"root": root, "tokenizer": root / "import" / "vae", "dit": root / "import" / "dit"}


def images(batch: int = 2, size: int = 16) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(3)) * 2 - 1


def latents(batch: int = 2, size: int = 4) -> torch.Tensor:
    return torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(4))


def dit_inputs(batch: int = 3):
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(batch, 4, 4, 4, generator=generator)
    t = torch.tensor([0, 417, 999])[:batch]
    y = torch.tensor([0, 7, 10])[:batch]  # 10: the null class of guidance
    return x, t, y


def assert_one_line(error: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


# ------------------------------------------------------------------------------------------------ SD-VAE
@torch.no_grad()
def assert_same_vae(ours, theirs) -> None:
    x, z = images(), latents()
    assert torch.allclose(ours.encode(x).mean, theirs.encode(x).latent_dist.mean, atol=ATOL)
    assert torch.allclose(ours.encode(x).std, theirs.encode(x).latent_dist.std, atol=ATOL)
    decoded = theirs.decode(z).sample
    assert decoded.abs().max() > 0.1  # a real comparison, not two zeros
    assert torch.allclose(ours.decoder(z), decoded, atol=ATOL)
    assert torch.allclose(ours.decode(z), decoded.clamp(-1, 1), atol=ATOL)


def test_autoencoder_converts_exactly(autoencoder):
    theirs, folder = autoencoder
    config, state = vae_from_autoencoder(*read_diffusers_model(folder))
    ours = build_tokenizer(config).eval()
    ours.load_state_dict(state)
    assert_same_vae(ours, theirs)
    assert config["latent_scale"] == SD_SCALE and config["encoder"]["downsample_padding"] == "bottom_right"


def test_symmetric_padding_would_not_be_sd_vae(autoencoder):
    """The padding is what makes the encoder SD-VAE's: the same weights padded symmetrically compute another map."""
    theirs, folder = autoencoder
    config, state = vae_from_autoencoder(*read_diffusers_model(folder))
    config["encoder"]["downsample_padding"] = "symmetric"
    ours = build_tokenizer(config).eval()
    ours.load_state_dict(state)
    with torch.no_grad():
        assert not torch.allclose(ours.encode(images()).mean, theirs.encode(images()).latent_dist.mean, atol=ATOL)


def test_old_attention_names_and_missing_quant_convs_convert_exactly(tmp_path):
    """stabilityai/sd-vae-ft-* files name the attention query/key/value/proj_attn; newer VAEs may drop the 1×1
    quant convolutions (use_quant_conv=false)."""
    theirs = randomise(AutoencoderKL(**VAE_SHAPE, use_quant_conv=False, use_post_quant_conv=False), seed=6)
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for name, tensor in theirs.state_dict().items():
        for new, old in old_names.items():
            name = name.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        state[name] = tensor.contiguous()
    assert "encoder.mid_block.attentions.0.query.weight" in state
    safetensors.torch.save_file(state, tmp_path / "vae.safetensors")
    (tmp_path / "vae.json").write_text(json.dumps(dict(theirs.config)))
    config, converted = vae_from_autoencoder(*read_diffusers_model(tmp_path / "vae.safetensors", tmp_path / "vae.json"))
    ours = build_tokenizer(config).eval()
    ours.load_state_dict(converted)
    assert_same_vae(ours, theirs)


def test_imported_tokenizer_loads_with_load_tokenizer(autoencoder, imported):
    checkpoint = load_checkpoint(imported["tokenizer"])
    assert checkpoint["config"]["latent_scale"] == SD_SCALE
    assert checkpoint["source"]["format"] == "diffusers AutoencoderKL"
    assert_same_vae(load_tokenizer(imported["tokenizer"], "cpu"), autoencoder[0])


def test_vae_exports_to_a_folder_from_pretrained_loads(autoencoder, imported):
    root = imported["root"]
    export_weights(load_config(["stage=export", f"export.source={imported['tokenizer']}", "export.format=diffusers",
                                "name=vae_diffusers"], root))
    folder = root / "export" / "vae_diffusers"
    reloaded = AutoencoderKL.from_pretrained(folder).eval()
    assert reloaded.config.scaling_factor == SD_SCALE
    assert_same_vae(load_tokenizer(imported["tokenizer"], "cpu"), reloaded)
    with torch.no_grad():
        assert torch.equal(reloaded.decode(latents()).sample, autoencoder[0].decode(latents()).sample)


def test_trained_vae_that_autoencoderkl_cannot_hold_is_refused(tmp_path):
    """vae_tiny pads symmetrically and its GroupNorms differ by width: no AutoencoderKL computes it."""
    from pipelines.configs import group_config
    from stage1_tokenizer.convert import autoencoder_from_vae

    config = group_config("tokenizer", "vae_tiny")
    with pytest.raises(ConfigError) as error:
        autoencoder_from_vae(config, build_tokenizer(config).state_dict(), latent_scale=1.0)
    assert_one_line(error, "pads symmetrically", "export.format=safetensors")


def test_autoencoder_weights_with_another_config_are_refused(autoencoder, tmp_path):
    _, folder = autoencoder
    config = json.loads((folder / "config.json").read_text())
    config["block_out_channels"] = [32, 64, 64]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(DataError) as error:
        vae_from_autoencoder(*read_diffusers_model(folder, tmp_path / "config.json"))
    assert_one_line(error, "is the config the one of these weights?")


@pytest.mark.slow
def test_import_of_a_mismatched_file_is_one_line_from_the_command_line(autoencoder, tmp_path):
    _, folder = autoencoder
    config = json.loads((folder / "config.json").read_text())
    config["layers_per_block"] = 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = run_cli("stage=import", f"import.source={folder / 'diffusion_pytorch_model.safetensors'}",
                     f"import.config={tmp_path / 'config.json'}", f"output_root={tmp_path}", "wandb.mode=disabled",
                     check=False, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error (DataError): the AutoencoderKL weights lack"), last
    assert not (tmp_path / "import").exists()  # nothing written for a refused import


def test_code_in_a_pickle_is_refused_before_it_runs(tmp_path):
    torch.save({"args": argparse.Namespace(model="DiT-XL/2"), "ema": {"x": torch.zeros(1)}}, tmp_path / "ckpt.pt")
    with pytest.raises(DataError) as error:
        read_state_dict(tmp_path / "ckpt.pt")
    assert_one_line(error, "a safe load refuses, so nothing in it was run")


# ------------------------------------------------------------------------------------------------ encoder init
@pytest.fixture(scope="module")
def narrow_autoencoder(tmp_path_factory):
    """An AutoencoderKL whose encoder has epsvae_tiny's shape once that has channel_mult [1, 1, 1]."""
    model = randomise(AutoencoderKL(**{**VAE_SHAPE, "block_out_channels": (16, 16, 16), "norm_num_groups": 16}), 7)
    folder = tmp_path_factory.mktemp("narrow_autoencoder")
    model.save_pretrained(folder)
    return model, folder


def test_init_encoder_starts_an_epsvae_from_sd_vae_weights(narrow_autoencoder, tmp_path):
    theirs, folder = narrow_autoencoder
    cfg = load_config(["stage=tokenizer", "tokenizer=epsvae_tiny", "tokenizer.encoder.channel_mult=[1,1,1]",
                       f"tokenizer.init_encoder={folder}"], tmp_path)
    state = adopt_initial_encoder(cfg)
    # The settings the weights' shapes do not show are SD-VAE's: one attention head, bottom/right padding.
    assert cfg.tokenizer.encoder.head_channels == 16 and cfg.tokenizer.encoder.downsample_padding == "bottom_right"
    tokenizer = build_tokenizer_objective(cfg.tokenizer).tokenizer.eval()
    tokenizer.encoder.load_state_dict(state)
    with torch.no_grad():
        assert torch.allclose(tokenizer.encode(images()).mean, theirs.encode(images()).latent_dist.mean, atol=ATOL)


def test_tokenizer_training_starts_from_the_initial_encoder(narrow_autoencoder, tmp_path):
    theirs, folder = narrow_autoencoder
    cfg = load_config(["stage=tokenizer", "tokenizer=epsvae_tiny", "tokenizer.encoder.channel_mult=[1,1,1]",
                       f"tokenizer.init_encoder={folder}", "data.resolution=16", "data.train_size=4",
                       "data.val_size=2", "tokenizer.train.steps=1", "tokenizer.train.batch_size=2",
                       "tokenizer.train.lr=1e-30", "tokenizer.train.sample_every=0", "tokenizer.loss.lpips=0",
                       "reconstruct.grid_images=2"], tmp_path)
    # one step of a vanishing lr
    checkpoint = load_checkpoint(train_tokenizer(cfg, run_dir=tmp_path / "run")["checkpoint"])
    assert checkpoint["config"]["encoder"]["downsample_padding"] == "bottom_right"
    assert "init_encoder" not in checkpoint["config"]  # training only: the network is the same
    tokenizer = load_tokenizer(tmp_path / "run", "cpu")
    with torch.no_grad():
        assert torch.allclose(tokenizer.encode(images()).mean, theirs.encode(images()).latent_dist.mean, atol=ATOL)


def test_init_encoder_of_another_shape_is_refused(narrow_autoencoder, tmp_path):
    cfg = load_config(["stage=tokenizer", "tokenizer=epsvae_tiny", f"tokenizer.init_encoder={narrow_autoencoder[1]}"],
                      tmp_path)
    with pytest.raises(ConfigError) as error:
        adopt_initial_encoder(cfg)
    assert_one_line(error, "does not fit tokenizer.encoder", "channel_mult=[1, 1, 1]")


def test_init_encoder_takes_a_tokenizer_checkpoint(imported):
    config, state = initial_encoder(imported["tokenizer"])
    tokenizer = load_tokenizer(imported["tokenizer"], "cpu")
    assert config["downsample_padding"] == "bottom_right" and config["latent_channels"] == 4
    assert all(torch.equal(state[name], value) for name, value in tokenizer.encoder.state_dict().items())


# ------------------------------------------------------------------------------------------------ diffusers DiT
def our_dit(architecture: dict) -> DiT:
    keys = ("input_size", "in_channels", "num_classes", "patch_size", "hidden_size", "depth", "num_heads",
            "mlp_ratio", "learn_sigma", "mlp_norm_eps", "time_frequency_shift")
    return DiT(**{key: architecture[key] for key in keys if key in architecture}).eval()


@torch.no_grad()
def assert_same_dit(ours: DiT, theirs: DiTTransformer2DModel) -> None:
    x, t, y = dit_inputs()
    expected = theirs(x, timestep=t, class_labels=y).sample
    assert expected.shape == (3, 8, 4, 4) and expected.abs().max() > 0.1
    assert torch.allclose(ours(x, t.float(), y), expected, atol=ATOL)


def test_diffusers_dit_converts_exactly(diffusers_dit):
    theirs, folder = diffusers_dit
    architecture, state = dit_from_diffusers(*read_diffusers_model(folder))
    assert architecture["learn_sigma"] and architecture["time_frequency_shift"] == 1
    ours = our_dit(architecture)
    ours.load_state_dict(state)
    assert_same_dit(ours, theirs)


def test_diffusers_time_features_are_not_dits(diffusers_dit):
    """Why the converter keeps diffusers' frequencies: with DiT's the same weights compute another function."""
    theirs, folder = diffusers_dit
    architecture, state = dit_from_diffusers(*read_diffusers_model(folder))
    ours = our_dit({**architecture, "time_frequency_shift": 0})
    ours.load_state_dict(state)
    x, t, y = dit_inputs()
    with torch.no_grad():
        assert not torch.allclose(ours(x, t.float(), y), theirs(x, timestep=t, class_labels=y).sample, atol=ATOL)


def test_diffusers_dit_with_block_embeddings_of_its_own_is_refused(tmp_path):
    randomise(DiTTransformer2DModel(**DIT_SHAPE), seed=8).save_pretrained(tmp_path)
    with pytest.raises(DataError) as error:
        dit_from_diffusers(*read_diffusers_model(tmp_path))
    assert_one_line(error, "block 1's timestep/label embedding differs from block 0's", "no exact conversion")


def test_imported_dit_records_the_tokenizer_scale_and_loads(diffusers_dit, imported):
    dit, config = load_dit(imported["dit"], "cpu")
    assert config["latent_stats"]["channel_std"] == [pytest.approx(1 / SD_SCALE)] * 4
    assert config["latent_stats"]["channel_mean"] == [0.0] * 4
    assert config["objective"] == "ddpm" and config["learn_sigma"]
    assert config["tokenizer_checkpoint"].startswith(str(imported["tokenizer"]))
    assert_same_dit(dit, diffusers_dit[0])


def test_dit_exports_to_a_folder_from_pretrained_loads(diffusers_dit, imported):
    root = imported["root"]
    export_weights(load_config(["stage=export", f"export.source={imported['dit']}", "export.format=diffusers",
                                "name=dit_diffusers"], root))
    reloaded = DiTTransformer2DModel.from_pretrained(root / "export" / "dit_diffusers").eval()
    assert_same_dit(load_dit(imported["dit"], "cpu")[0], reloaded)


def test_our_dit_exports_to_diffusers_with_its_positions_carried_over(tmp_path):
    """A DiT trained here (position embedding row first) exports as the same function: the halves of the hidden
    channels are swapped to diffusers' column-first embedding."""
    from stage2_ldm.convert import diffusers_from_dit

    ours = randomise(DiT(input_size=4, in_channels=4, num_classes=10, hidden_size=32, depth=2, num_heads=2,
                         mlp_norm_eps=1e-5, time_frequency_shift=1), seed=9)
    config, state = diffusers_from_dit(ours)
    theirs = DiTTransformer2DModel(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    theirs.load_state_dict(state, strict=True)
    assert_same_dit(ours, theirs)


def test_dit_with_dits_time_features_is_exported_to_diffusers_only_when_asked(tmp_path):
    from stage2_ldm.convert import diffusers_from_dit

    ours = randomise(DiT(input_size=4, in_channels=4, num_classes=10, hidden_size=32, depth=2, num_heads=2), seed=9)
    with pytest.raises(ConfigError) as error:
        diffusers_from_dit(ours)
    assert_one_line(error, "10000^(-k/127)", "export.approximate=true")
    config, state = diffusers_from_dit(ours, approximate=True)
    assert config["num_layers"] == 2


# ------------------------------------------------------------------------------------------------ facebookresearch/DiT
def official_shapes(width: int, channels: int, patch: int, tokens: int, classes: int, depth: int) -> dict:
    """facebookresearch/DiT's state dict layout (models.py), written out: the names and shapes of DiT(...)."""
    shapes = {"x_embedder.proj.weight": (width, channels, patch, patch), "x_embedder.proj.bias": (width,),
              "pos_embed": (1, tokens, width),
              "t_embedder.mlp.0.weight": (width, 256), "t_embedder.mlp.0.bias": (width,),
              "t_embedder.mlp.2.weight": (width, width), "t_embedder.mlp.2.bias": (width,),
              "y_embedder.embedding_table.weight": (classes + 1, width),
              "final_layer.linear.weight": (patch * patch * 2 * channels, width),
              "final_layer.linear.bias": (patch * patch * 2 * channels,),
              "final_layer.adaLN_modulation.1.weight": (2 * width, width),
              "final_layer.adaLN_modulation.1.bias": (2 * width,)}
    for i in range(depth):
        shapes.update({f"blocks.{i}.attn.qkv.weight": (3 * width, width), f"blocks.{i}.attn.qkv.bias": (3 * width,),
                       f"blocks.{i}.attn.proj.weight": (width, width), f"blocks.{i}.attn.proj.bias": (width,),
                       f"blocks.{i}.mlp.fc1.weight": (4 * width, width), f"blocks.{i}.mlp.fc1.bias": (4 * width,),
                       f"blocks.{i}.mlp.fc2.weight": (width, 4 * width), f"blocks.{i}.mlp.fc2.bias": (width,),
                       f"blocks.{i}.adaLN_modulation.1.weight": (6 * width, width),
                       f"blocks.{i}.adaLN_modulation.1.bias": (6 * width,)})
    return shapes


def official_forward(sd: dict, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, heads: int) -> torch.Tensor:
    """DiT.forward of facebookresearch/DiT models.py, written from its code with plain tensor operations (timm's
    PatchEmbed, Attention and Mlp included), independently of stage2_ldm/dit.py."""
    patch = sd["x_embedder.proj.weight"].shape[-1]
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=patch)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    args = t[:, None].float() * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    t_emb = F.linear(F.silu(F.linear(t_freq, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
                     sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])
    c = t_emb + sd["y_embedder.embedding_table.weight"][y]
    batch, tokens, width = h.shape
    depth = len({name.split(".")[1] for name in sd if name.startswith("blocks.")})
    for i in range(depth):
        p = f"blocks.{i}."
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = F.linear(
            F.silu(c), sd[p + "adaLN_modulation.1.weight"], sd[p + "adaLN_modulation.1.bias"]).chunk(6, dim=1)
        normed = F.layer_norm(h, (width,), eps=1e-6) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        qkv = F.linear(normed, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        attention = ((q @ k.transpose(-2, -1)) * (width // heads) ** -0.5).softmax(dim=-1)
        attended = (attention @ v).transpose(1, 2).reshape(batch, tokens, width)
        h = h + gate_msa[:, None] * F.linear(attended, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        normed = F.layer_norm(h, (width,), eps=1e-6) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        hidden = F.gelu(F.linear(normed, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]), approximate="tanh")
        h = h + gate_mlp[:, None] * F.linear(hidden, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    shift, scale = F.linear(F.silu(c), sd["final_layer.adaLN_modulation.1.weight"],
                            sd["final_layer.adaLN_modulation.1.bias"]).chunk(2, dim=1)
    h = F.layer_norm(h, (width,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    h = F.linear(h, sd["final_layer.linear.weight"], sd["final_layer.linear.bias"])
    grid, out_channels = int(tokens**0.5), h.shape[-1] // patch**2
    h = torch.einsum("nhwpqc->nchpwq", h.reshape(batch, grid, grid, patch, patch, out_channels))
    return h.reshape(batch, out_channels, grid * patch, grid * patch)


@pytest.fixture(scope="module")
def official_state():
    generator = torch.Generator().manual_seed(10)
    return {name: torch.randn(shape, generator=generator) * 0.1
            for name, shape in official_shapes(width=32, channels=4, patch=2, tokens=4, classes=10, depth=2).items()}


def test_official_dit_converts_exactly(official_state):
    architecture, state = dit_from_official(official_state, num_heads=2)
    assert architecture == {"depth": 2, "hidden_size": 32, "num_heads": 2, "patch_size": 2, "mlp_ratio": 4.0,
                            "learn_sigma": True, "in_channels": 4, "input_size": 4, "num_classes": 10}
    ours = our_dit(architecture)
    ours.load_state_dict(state)
    x, t, y = dit_inputs()
    with torch.no_grad():
        expected = official_forward(official_state, x, t, y, heads=2)
        assert expected.abs().max() > 0.1
        assert torch.allclose(ours(x, t.float(), y), expected, atol=ATOL)
    round_trip = official_from_dit(state)
    assert round_trip.keys() == official_state.keys()
    assert all(torch.equal(round_trip[name], tensor) for name, tensor in official_state.items())


def test_official_dit_imports_exports_and_samples(official_state, imported, tmp_path):
    """DiT-XL-2-256x256.pt's way through the stages: import (heads from ldm=...), sample decoded by the imported
    SD-VAE, export back to DiT's layout unchanged."""
    torch.save(official_state, tmp_path / "DiT-tiny.pt")
    root = imported["root"]
    overrides = ["ldm=dit_tiny", "ldm.hidden_size=32", "ldm.num_heads=2", "ldm.depth=2",
                 f"tokenizer.checkpoint={imported['tokenizer']}"]
    import_weights(load_config(["stage=import", f"import.source={tmp_path / 'DiT-tiny.pt'}", "name=official",
                                *overrides], root))
    dit, config = load_dit(root / "import" / "official", "cpu")
    x, t, y = dit_inputs()
    with torch.no_grad():
        assert torch.allclose(dit(x, t.float(), y), official_forward(official_state, x, t, y, heads=2), atol=ATOL)

    metrics = sample_to_folder(load_config(["stage=sample", "sample.num_per_class=1", "sample.steps=3",
                                            "sample.cfg_scale=1.5", "name=official", *overrides], root),
                               root / "import" / "official")
    assert metrics["num_samples"] == 10 and metrics["sampler"] == "ddpm"
    assert len(list((root / "sample" / "official" / "images").glob("*.png"))) == 10

    export_weights(load_config(["stage=export", f"export.source={root / 'import' / 'official'}",
                                "export.format=dit", "name=official_pt"], root))
    exported = read_state_dict(root / "export" / "official_pt" / "dit.pt")
    assert exported.keys() == official_state.keys()
    assert all(torch.equal(exported[name], tensor) for name, tensor in official_state.items())


def test_official_dit_with_another_ldm_size_is_refused(official_state, imported, tmp_path):
    torch.save(official_state, tmp_path / "DiT-tiny.pt")
    cfg = load_config(["stage=import", f"import.source={tmp_path / 'DiT-tiny.pt'}", "ldm=dit_tiny",
                       f"tokenizer.checkpoint={imported['tokenizer']}"], tmp_path)
    with pytest.raises(ConfigError) as error:
        import_weights(cfg)
    assert_one_line(error, "hidden_size 32", "hidden_size 64", "ldm=dit_xl2")


# ------------------------------------------------------------------------------------------------ stages, exports
def test_imported_tokenizer_caches_latents(imported):
    root = imported["root"]
    cache_main(load_config(["stage=cache", f"tokenizer.checkpoint={imported['tokenizer']}", "data.resolution=16",
                            "data.train_size=6", "cache.shard_size=4", f"cache.dir={root / 'cache'}"], root))
    manifest = json.loads((root / "cache" / "train" / "manifest.json").read_text())
    assert manifest["total"] == 6 and manifest["latent_shape"] == [4, 4, 4]


def test_epsvae_exports_to_a_weights_folder_that_load_tokenizer_reads(tmp_path):
    from pipelines.configs import group_config

    config = group_config("tokenizer", "epsvae_tiny")
    config.pop("train")
    tokenizer = randomise(build_tokenizer(config), seed=11)
    CheckpointDir(tmp_path / "run" / "checkpoints").save(
        {"step": 5, "config": config, "models": {"tokenizer": tokenizer.state_dict()}}, step=5)
    export_weights(load_config(["stage=export", f"export.source={tmp_path / 'run'}", "name=eps"], tmp_path))
    folder = tmp_path / "export" / "eps"
    assert {p.name for p in folder.iterdir()} >= {"model.safetensors", "model.json"}
    reloaded = load_tokenizer(folder, "cpu")
    z, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reloaded.decode(z, nfe=2, noise=noise), tokenizer.decode(z, nfe=2, noise=noise))
    assert load_checkpoint(folder)["step"] == 5
