"""diffusers' AutoencoderKL (SD-VAE) in and out of the VAE baseline, and its encoder as any tokenizer's initial one.

    config, state = vae_from_autoencoder(diffusers_config, diffusers_state)   # -> build_tokenizer(config)
    diffusers_config, diffusers_state = autoencoder_from_vae(config, state)   # -> save_diffusers_folder(...)
    encoder_config, encoder_state = initial_encoder("sd-vae-ft-ema/")         # stage=tokenizer tokenizer.init_encoder

Module for module the two are one network: conv_in, per level `layers_per_block` ResBlocks (our
encoder.levels.i.j = their down_blocks.i.resnets.j, 1×1 `skip` = `conv_shortcut`) and a strided conv, the middle
block (ResBlock, attention, ResBlock), GroupNorm, conv_out; the decoder mirrors it with one more ResBlock per level
(decoder.levels.i = up_blocks.i, coarsest first). What our config has to say to be SD-VAE exactly:
- SD pads one zero row and column at the bottom/right before each strided conv: encoder.downsample_padding.
- Their middle-block attention has one head: head_channels = the channels of the last level.
- Their q, k, v are three linears; ours are one fused `qkv` linear (the three weights stacked, in that order).
- `quant_conv` / `post_quant_conv` sit in our encoder / decoder; a model without them (use_quant_conv=false) gets
  identity 1×1 convolutions.
- Our GroupNorms have 32 groups (fewer for layers narrower than 32 channels); another norm_num_groups is refused.
The latent scale factor (diffusers' scaling_factor, 0.18215 for SD; shift_factor, SD3's) goes into the config as
`latent_scale` / `latent_shift`: the latents a DiT trained elsewhere sees are (z − latent_shift) · latent_scale.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from shared.config_check import POSITIVE, Rule
from shared.errors import ConfigError, DataError
from shared.foreign_weights import (ListOf, WeightsExtent, check_fits_in_memory, check_values, is_diffusers_model,
                                    read_diffusers_model, renamed)
from shared.train.checkpoint import load_model_state
from stage1_tokenizer.blocks import AttentionBlock, Downsample, group_norm
from stage1_tokenizer.tokenizer import build_tokenizer

AUTOENCODER_CLASS = "AutoencoderKL"
# AutoencoderKL.__init__'s defaults (diffusers 0.42), for the keys a config.json may leave out.
AUTOENCODER_DEFAULTS = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"], "block_out_channels": [64], "layers_per_block": 1, "act_fn": "silu",
    "latent_channels": 4, "norm_num_groups": 32, "scaling_factor": 0.18215, "shift_factor": None,
    "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
}
ATTENTION = r"(encoder|decoder)\.mid_block\.attentions\.0\."
# Names of diffusers releases before 0.14, still in the files of stabilityai/sd-vae-ft-{ema,mse}.
DEPRECATED_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
# Our parameter name (pattern) -> diffusers' names; several names are stacked along dim 0 (q, k, v -> qkv).
RENAMES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"encoder\.quant_conv\.(\w+)", (r"quant_conv.\1",)),
    (r"decoder\.post_quant_conv\.(\w+)", (r"post_quant_conv.\1",)),
    (r"(encoder|decoder)\.(conv_in|conv_out)\.(\w+)", (r"\1.\2.\3",)),
    (r"(encoder|decoder)\.norm_out\.(\w+)", (r"\1.conv_norm_out.\2",)),
    (r"encoder\.levels\.(\d+)\.\d+\.conv\.(\w+)", (r"encoder.down_blocks.\1.downsamplers.0.conv.\2",)),
    (r"decoder\.levels\.(\d+)\.\d+\.conv\.(\w+)", (r"decoder.up_blocks.\1.upsamplers.0.conv.\2",)),
    (r"encoder\.levels\.(\d+)\.(\d+)\.skip\.(\w+)", (r"encoder.down_blocks.\1.resnets.\2.conv_shortcut.\3",)),
    (r"decoder\.levels\.(\d+)\.(\d+)\.skip\.(\w+)", (r"decoder.up_blocks.\1.resnets.\2.conv_shortcut.\3",)),
    (r"encoder\.levels\.(\d+)\.(\d+)\.(\w+\.\w+)", (r"encoder.down_blocks.\1.resnets.\2.\3",)),
    (r"decoder\.levels\.(\d+)\.(\d+)\.(\w+\.\w+)", (r"decoder.up_blocks.\1.resnets.\2.\3",)),
    (r"(encoder|decoder)\.middle\.res1\.(\w+\.\w+)", (r"\1.mid_block.resnets.0.\2",)),
    (r"(encoder|decoder)\.middle\.res2\.(\w+\.\w+)", (r"\1.mid_block.resnets.1.\2",)),
    (r"(encoder|decoder)\.middle\.attention\.norm\.(\w+)", (r"\1.mid_block.attentions.0.group_norm.\2",)),
    (r"(encoder|decoder)\.middle\.attention\.attention\.qkv\.(\w+)",
     tuple(rf"\1.mid_block.attentions.0.{name}.\2" for name in ("to_q", "to_k", "to_v"))),
    (r"(encoder|decoder)\.middle\.attention\.attention\.proj\.(\w+)", (r"\1.mid_block.attentions.0.to_out.0.\2",)),
)


def diffusers_names(name: str) -> tuple[str, ...]:
    """The AutoencoderKL parameter name(s) of our VAE parameter `name`."""
    return renamed(name, RENAMES)


def modern_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Attention weights under today's names (to_q, ...) and as linear weights (old files stored 1×1 convs)."""
    renamed = {}
    for name, tensor in state.items():
        match = re.match(ATTENTION + r"(query|key|value|proj_attn)\.(\w+)$", name)
        if match:
            name = f"{match.group(1)}.mid_block.attentions.0.{DEPRECATED_ATTENTION_NAMES[match.group(2)]}." \
                   f"{match.group(3)}"
        if re.match(ATTENTION + r"(to_q|to_k|to_v|to_out\.0)\.weight$", name) and tensor.ndim == 4:
            tensor = tensor.flatten(1)  # (C, C, 1, 1) -> (C, C)
        renamed[name] = tensor
    return renamed


def autoencoder_schema(extent: WeightsExtent) -> dict:
    """What each AutoencoderKL setting must be (shared.foreign_weights.check_values), sizes bounded by `extent`."""
    size, levels = extent.size(), extent.count()
    return {
        "in_channels": size, "out_channels": size, "latent_channels": size, "norm_num_groups": size,
        "block_out_channels": ListOf(size, levels.high), "layers_per_block": extent.count(low=0),
        "down_block_types": ListOf(str, levels.high), "up_block_types": ListOf(str, levels.high), "act_fn": str,
        "scaling_factor": POSITIVE, "shift_factor": Rule(integer=False, nullable=True),
        "use_quant_conv": bool, "use_post_quant_conv": bool, "mid_block_add_attention": bool,
    }


def autoencoder_settings(config: dict, extent: WeightsExtent) -> dict:
    """The config.json of an AutoencoderKL with diffusers' defaults filled in, every value checked against the
    weights' `extent`; DataError where ours cannot be it."""
    class_name = config.get("_class_name", AUTOENCODER_CLASS)
    if class_name != AUTOENCODER_CLASS:
        raise DataError(f"the diffusers model is a {class_name!r}, not an {AUTOENCODER_CLASS}")
    settings = {**AUTOENCODER_DEFAULTS, **{k: v for k, v in config.items() if k in AUTOENCODER_DEFAULTS}}
    check_values(settings, autoencoder_schema(extent), f"the {AUTOENCODER_CLASS}")
    channels = list(settings["block_out_channels"])
    if len(channels) * max(1, settings["layers_per_block"]) > extent.tensors:  # each ResBlock has several tensors
        raise DataError(f"the {AUTOENCODER_CLASS}'s config.json describes {len(channels)} levels of "
                        f"{settings['layers_per_block']} blocks, more than its {extent.tensors} tensors can hold: is "
                        f"the config the one of these weights?")
    problems = []
    if set(settings["down_block_types"]) != {"DownEncoderBlock2D"} or \
            set(settings["up_block_types"]) != {"UpDecoderBlock2D"}:
        problems.append(f"block types {settings['down_block_types']} / {settings['up_block_types']} (only "
                        f"DownEncoderBlock2D / UpDecoderBlock2D)")
    if settings["act_fn"] != "silu":
        problems.append(f"act_fn={settings['act_fn']} (only silu)")
    if not settings["mid_block_add_attention"]:
        problems.append("mid_block_add_attention=false (our middle blocks attend)")
    if any(c % channels[0] for c in channels):
        problems.append(f"block_out_channels={channels} (each must be a multiple of the first)")
    if any(group_norm(c).num_groups != settings["norm_num_groups"] for c in channels):
        problems.append(f"norm_num_groups={settings['norm_num_groups']} with block_out_channels={channels} (ours "
                        f"use 32 groups)")
    if problems:
        raise DataError(f"this AutoencoderKL has no counterpart here: {'; '.join(problems)}")
    return settings


def vae_config(settings: dict) -> dict:
    """Our tokenizer config (kind=vae) of an AutoencoderKL's settings."""
    channels = list(settings["block_out_channels"])
    layout = {"base_channels": channels[0], "channel_mult": [c // channels[0] for c in channels],
              "num_res_blocks": settings["layers_per_block"], "attention_levels": [],
              "head_channels": channels[-1], "dropout": 0.0}  # one attention head, as in diffusers
    return {
        "kind": "vae", "downsample": 2 ** (len(channels) - 1), "latent_channels": settings["latent_channels"],
        "encoder": {**layout, "image_channels": settings["in_channels"], "downsample_padding": "bottom_right"},
        "decoder": {"arch": "conv", **layout, "out_channels": settings["out_channels"]},
        "flow": None,
        "latent_scale": float(settings["scaling_factor"]),
        "latent_shift": float(settings["shift_factor"] or 0.0),
    }


def identity_conv(channels: int) -> dict[str, torch.Tensor]:
    """The weight and bias of a 1×1 convolution that changes nothing."""
    check_fits_in_memory(4 * channels**2, f"an identity 1×1 convolution of {channels} channels",
                         f"the {AUTOENCODER_CLASS}")
    return {"weight": torch.eye(channels).view(channels, channels, 1, 1), "bias": torch.zeros(channels)}


def vae_from_autoencoder(config: dict, state: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """(our tokenizer config, our VAE state dict) of an AutoencoderKL's config.json and state dict, exact."""
    settings = autoencoder_settings(config, WeightsExtent.of(state))
    ours = vae_config(settings)
    state = modern_names(state)
    if not settings["use_quant_conv"]:
        state.update({f"quant_conv.{k}": v for k, v in identity_conv(2 * settings["latent_channels"]).items()})
    if not settings["use_post_quant_conv"]:
        state.update({f"post_quant_conv.{k}": v for k, v in identity_conv(settings["latent_channels"]).items()})
    with torch.device("meta"):  # names and shapes only
        expected = build_tokenizer(ours).state_dict()
    converted = {}
    for name, like in expected.items():
        sources = diffusers_names(name)
        missing = [source for source in sources if source not in state]
        if missing:
            raise DataError(f"the AutoencoderKL weights lack {missing[0]}, which its config "
                            f"(block_out_channels={settings['block_out_channels']}, layers_per_block="
                            f"{settings['layers_per_block']}) implies: is the config the one of these weights?")
        tensor = torch.cat([state.pop(source) for source in sources])
        if tensor.shape != like.shape:
            raise DataError(f"the AutoencoderKL tensor {sources[0]} has shape {tuple(tensor.shape)}, but its config "
                            f"implies {tuple(like.shape)}: is the config the one of these weights?")
        converted[name] = tensor.float()
    if state:
        raise DataError(f"the AutoencoderKL weights hold {len(state)} tensors its config does not describe (e.g. "
                        f"{sorted(state)[0]}): is the config the one of these weights?")
    return ours, converted


def autoencoder_from_vae(config: dict, state: dict[str, torch.Tensor],
                         latent_scale: float | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(AutoencoderKL config, its state dict) of our VAE. latent_scale: its scaling_factor, by default the one the
    tokenizer records (an imported one does). ConfigError where diffusers' class cannot hold our network."""
    if config["kind"] != "vae":
        raise ConfigError(f"export.format=diffusers: a kind={config['kind']} tokenizer has no diffusers class; use "
                          f"export.format=safetensors")
    with torch.device("meta"):  # the network as built, read module by module
        vae = build_tokenizer(config)
    layout = ("base_channels", "channel_mult", "num_res_blocks")
    encoder, decoder = config["encoder"], config["decoder"]
    channels = [encoder["base_channels"] * mult for mult in encoder["channel_mult"]]
    groups = {m.num_groups for m in vae.modules() if isinstance(m, torch.nn.GroupNorm)}
    problems = []
    if any(encoder[key] != decoder[key] for key in layout):
        problems.append(f"its decoder's {', '.join(layout)} differ from its encoder's (AutoencoderKL mirrors them)")
    if sum(isinstance(m, AttentionBlock) for m in vae.modules()) > 2:
        problems.append("it attends outside the middle blocks")
    if vae.encoder.middle.attention.attention.num_heads != 1 or vae.decoder.middle.attention.attention.num_heads != 1:
        problems.append("its middle-block attention has several heads (AutoencoderKL's has one)")
    if not all(m.bottom_right for m in vae.modules() if isinstance(m, Downsample)):
        problems.append("its encoder pads symmetrically before downsampling (AutoencoderKL pads bottom/right)")
    if len(groups) > 1:
        problems.append(f"its GroupNorms have {sorted(groups)} groups (AutoencoderKL has one norm_num_groups)")
    if problems:
        raise ConfigError(f"export.format=diffusers: AutoencoderKL cannot hold this VAE exactly: "
                          f"{'; '.join(problems)}; use export.format=safetensors")
    scale = config.get("latent_scale") if latent_scale is None else latent_scale
    if scale is None:
        raise ConfigError("export.format=diffusers: the tokenizer records no latent scale (the factor that brings "
                          "its latents to unit variance): pass export.latent_scale=1/std, e.g. from the channel_std "
                          "of stats.json of its stage=cache output")
    levels = len(channels)
    diffusers_config = {
        "_class_name": AUTOENCODER_CLASS, "in_channels": vae.encoder.conv_in.in_channels,
        "out_channels": vae.decoder.conv_out.out_channels, "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels, "block_out_channels": channels,
        "layers_per_block": encoder["num_res_blocks"], "act_fn": "silu",
        "latent_channels": config["latent_channels"], "norm_num_groups": groups.pop(), "scaling_factor": float(scale),
        "shift_factor": config.get("latent_shift") or None, "use_quant_conv": True, "use_post_quant_conv": True,
        "mid_block_add_attention": True,
    }
    converted = {}
    for name, tensor in state.items():
        targets = diffusers_names(name)
        converted.update(zip(targets, tensor.chunk(len(targets))))
    return diffusers_config, converted


def initial_encoder(path: str | Path, config_path: str | Path | None = None) -> tuple[dict, dict]:
    """(encoder config with latent_channels, encoder state dict) of an AutoencoderKL (folder, or file with its
    config.json) or of a tokenizer checkpoint of this project (run folder, file or weights folder)."""
    path = Path(path)
    if is_diffusers_model(path) or path.suffix in (".safetensors", ".bin"):
        config, state = vae_from_autoencoder(*read_diffusers_model(path, config_path))
    else:
        state, config = load_model_state(path, "tokenizer", use_ema=True)
    encoder_state = {name.removeprefix("encoder."): tensor for name, tensor in state.items()
                     if name.startswith("encoder.")}
    return {**config["encoder"], "latent_channels": config["latent_channels"]}, encoder_state
