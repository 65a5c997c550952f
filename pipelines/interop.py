"""stage=import and stage=export: weights trained elsewhere in and out of this project's checkpoints.

    python pipelines/run.py stage=import import.source=sd-vae-ft-ema name=sd-vae-ft-ema
    python pipelines/run.py stage=import import.source=DiT-XL-2-256x256.pt ldm=dit_xl2 \
        tokenizer.checkpoint=outputs/import/sd-vae-ft-ema name=dit-xl-2-256
    python pipelines/run.py stage=export export.source=outputs/import/sd-vae-ft-ema export.format=diffusers

Import reads a diffusers AutoencoderKL (-> a VAE-baseline tokenizer), a diffusers DiTTransformer2DModel or a
facebookresearch/DiT state dict (-> a DiT), converts it exactly (stage1_tokenizer/convert.py,
stage2_ldm/convert.py) and writes `${output_root}/import/${name}/checkpoints/step_000000000.pt`, which every stage
takes (tokenizer.checkpoint=..., ldm.checkpoint=...). An imported DiT records the tokenizer whose latents it models
and, as its latent statistics, that tokenizer's scale: it saw (z − latent_shift) · latent_scale.

Export writes `${output_root}/export/${name}/` as a weights folder (export.format=safetensors: any network, read
wherever a checkpoint is), a diffusers folder (diffusers: the VAE baseline as AutoencoderKL, the DiT as
DiTTransformer2DModel; from_pretrained loads it) or a facebookresearch/DiT state dict (dit: `dit.pt`). A diffusers
export is run once beside ours on random inputs and the largest difference is reported.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from shared.config_check import POSITIVE
from shared.dit_blocks import NORM_EPS
from shared.errors import ConfigError, DataError
from shared.foreign_weights import (DIFFUSERS_CONFIG, check_source_weights, read_diffusers_model, read_state_dict,
                                    save_diffusers_folder)
from shared.runtime import setup
from shared.train.checkpoint import (CheckpointDir, atomic_save, load_weights, network_state, resolve_checkpoint,
                                     save_weights_folder)
from stage1_tokenizer.convert import AUTOENCODER_CLASS, autoencoder_from_vae, vae_from_autoencoder
from stage1_tokenizer.tokenizer import build_tokenizer
from stage2_ldm.convert import diffusers_from_dit, dit_from_diffusers, dit_from_official, official_from_dit
from stage2_ldm.dit import dit_from_model_config
from stage2_ldm.objective import build_objective
from stage2_ldm.train import TRAINING_ONLY_KEYS

EXPORT_FORMATS = ("safetensors", "diffusers", "dit")
OFFICIAL_DIT_FILE = "dit.pt"
DIT_DIMENSIONS = ("depth", "hidden_size", "patch_size")
PROBE_BATCH = 2


# ------------------------------------------------------------------------------------------------ import
def imported_network(source: Path, config_path: str | None, cfg: DictConfig) -> tuple[str, dict, dict, str]:
    """(network name, model config, state dict, what the source was) of the weights at `source`: a diffusers
    model (a folder, or a file with its config.json) or, a file without one, a facebookresearch/DiT state dict."""
    if not source.exists():
        raise DataError(f"import.source={source} does not exist")
    allow_nonfinite = bool(cfg["import"].allow_nonfinite)
    if source.is_dir() or config_path or source.with_name(DIFFUSERS_CONFIG).is_file():
        diffusers_config, state = read_diffusers_model(source, config_path)
        check_source_weights(state, allow_nonfinite, f"import.source={source}")
        class_name = diffusers_config.get("_class_name")
        if class_name == AUTOENCODER_CLASS:
            config, converted = vae_from_autoencoder(diffusers_config, state)
            return "tokenizer", config, converted, f"diffusers {class_name}"
        architecture, converted = dit_from_diffusers(diffusers_config, state, source=str(source))
        return "dit", dit_model_config(cfg, architecture), converted, f"diffusers {class_name}"
    state = read_state_dict(source)
    check_source_weights(state, allow_nonfinite, f"import.source={source}")
    if "x_embedder.proj.weight" not in state:
        raise DataError(f"import.source={source} is neither a diffusers model (no config.json beside it: pass "
                        f"import.config=...) nor a facebookresearch/DiT state dict")
    architecture, converted = dit_from_official(state, cfg.ldm.num_heads, source=str(source))
    check_ldm_group(architecture, cfg.ldm)
    return "dit", dit_model_config(cfg, architecture), converted, "facebookresearch/DiT"


def check_ldm_group(architecture: dict, ldm_cfg: DictConfig) -> None:
    """A DiT checkpoint does not record its heads, which come from ldm=...: it must be the checkpoint's size."""
    if any(architecture[key] != ldm_cfg[key] for key in DIT_DIMENSIONS):
        found = ", ".join(f"{key} {architecture[key]}" for key in DIT_DIMENSIONS)
        chosen = ", ".join(f"{key} {ldm_cfg[key]}" for key in DIT_DIMENSIONS)
        raise ConfigError(f"the DiT checkpoint has {found}, the chosen ldm config {chosen}: choose the ldm= of its "
                          f"size (ldm=dit_xl2 for DiT-XL/2), whose num_heads the checkpoint does not record")


def dit_model_config(cfg: DictConfig, architecture: dict) -> dict:
    """What sampling needs (stage2_ldm/train.py:model_config): the ldm group's objective, the weights'
    architecture, and the latent statistics and identity of the tokenizer at tokenizer.checkpoint."""
    from stage2_ldm.cache import tokenizer_fingerprint

    if not cfg.tokenizer.get("checkpoint"):
        raise ConfigError("a DiT models the latents of one tokenizer: set tokenizer.checkpoint=<that tokenizer, "
                          "e.g. the stage=import output of its SD-VAE>")
    tokenizer_path = resolve_checkpoint(cfg.tokenizer.checkpoint)
    tokenizer_config = load_weights(tokenizer_path, mmap=True).get("config", {})
    if not POSITIVE.accepts(tokenizer_config.get("latent_scale")):
        raise DataError(f"tokenizer {tokenizer_path} records no positive latent_scale (the scale a DiT trained "
                        f"elsewhere saw its latents at): give the stage=import output of the VAE the DiT was trained "
                        f"with")
    channels = tokenizer_config["latent_channels"]
    if channels != architecture["in_channels"]:
        raise DataError(f"the DiT takes {architecture['in_channels']} latent channels, tokenizer {tokenizer_path} "
                        f"makes {channels}")
    config = OmegaConf.to_container(cfg.ldm, resolve=True)
    for key in TRAINING_ONLY_KEYS:
        config.pop(key, None)
    config.update(architecture)
    config.update(
        latent_stats={"channel_mean": [tokenizer_config["latent_shift"]] * channels,
                      "channel_std": [1.0 / tokenizer_config["latent_scale"]] * channels,
                      "of": "the tokenizer's latent scale: the DiT saw (z - latent_shift) * latent_scale"},
        tokenizer_checkpoint=str(tokenizer_path),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer_path, use_ema=bool(cfg.decode.use_ema)))
    build_objective(OmegaConf.create(config))  # e.g. learned sigma with ldm.objective=flow: refused here
    return config


def build_network(network: str, config: dict) -> torch.nn.Module:
    return build_tokenizer(config) if network == "tokenizer" else dit_from_model_config(config)


def import_weights(cfg: DictConfig) -> dict:
    """stage=import: one checkpoint (step 0, no training state) in ${output_root}/import/${name}."""
    settings = cfg["import"]
    if not settings.source:
        raise ConfigError("import.source is null: give a diffusers model folder, a .safetensors file (with "
                          "import.config) or a facebookresearch/DiT .pt")
    network, config, state, kind = imported_network(Path(settings.source), settings.config, cfg)
    with torch.device("meta"):  # the config rebuilds exactly these weights (checked without allocating)
        build_network(network, config).load_state_dict(state, assign=True)
    with setup(cfg, fresh=True) as runtime:
        checkpoint = CheckpointDir(runtime.run_dir / "checkpoints").save(
            {"step": 0, "config": config, "models": {network: state},
             "source": {"path": str(settings.source), "format": kind}}, step=0)
        key = "tokenizer.checkpoint" if network == "tokenizer" else "ldm.checkpoint"
        runtime.log.info("imported %s (%s) as %s: pass %s=%s", settings.source, kind, network, key, runtime.run_dir)
        result = runtime.finish({"network": network, "source": str(settings.source), "format": kind,
                                 "checkpoint": str(checkpoint)})
    print(json.dumps(result))
    return result


# ------------------------------------------------------------------------------------------------ export
@torch.no_grad()
def largest_difference(network: str, ours: torch.nn.Module, theirs: torch.nn.Module) -> float:
    """max |ours − theirs| over the outputs of both on the same random inputs: posterior means and decoded images
    for a tokenizer, predictions for a DiT."""
    generator = torch.Generator().manual_seed(0)
    if network == "tokenizer":
        side = 4 * ours.downsample
        images = torch.rand(PROBE_BATCH, theirs.config.in_channels, side, side, generator=generator) * 2 - 1
        latents = torch.randn(PROBE_BATCH, ours.latent_channels, 4, 4, generator=generator)
        return max((ours.encode(images).mean - theirs.encode(images).latent_dist.mean).abs().max().item(),
                   (ours.decoder(latents) - theirs.decode(latents).sample).abs().max().item())
    size = ours.grid_size * ours.patch_size
    x = torch.randn(PROBE_BATCH, ours.in_channels, size, size, generator=generator)
    t = torch.randint(0, 1000, (PROBE_BATCH,), generator=generator)
    y = torch.randint(0, ours.num_classes, (PROBE_BATCH,), generator=generator)
    return (ours(x, t.float(), y) - theirs(x, timestep=t, class_labels=y).sample).abs().max().item()


def converted_for_export(settings: DictConfig, network: str, model: torch.nn.Module, config: dict,
                         state: dict) -> tuple[dict, dict]:
    """(config, state dict) in export.format's layout; ConfigError where that layout cannot hold the network."""
    if settings.format == "safetensors":
        return config, state
    if settings.format == "dit":
        if network != "dit":
            raise ConfigError("export.format=dit is facebookresearch/DiT's layout: it takes a DiT, not a tokenizer")
        if not settings.approximate and (model.t_embedder.frequency_shift or model.blocks[0].norm2.eps != NORM_EPS):
            raise ConfigError("export.format=dit: this DiT came from diffusers (its time frequencies and MLP "
                              "LayerNorm eps are diffusers'), so DiT's code would compute another function: use "
                              "export.format=diffusers, or export.approximate=true to write it anyway")
        return {}, official_from_dit(state)
    if network == "tokenizer":
        return autoencoder_from_vae(config, state, settings.latent_scale)
    return diffusers_from_dit(model, bool(settings.approximate))


def export_weights(cfg: DictConfig) -> dict:
    """stage=export: the network of export.source in export.format, in ${output_root}/export/${name}."""
    settings = cfg.export
    if not settings.source:
        raise ConfigError("export.source is null: give a run folder, checkpoint or weights folder of this project")
    if settings.format not in EXPORT_FORMATS:
        raise ConfigError(f"export.format={settings.format!r} is not one of {', '.join(EXPORT_FORMATS)}")
    source = resolve_checkpoint(settings.source)
    checkpoint = load_weights(source, mmap=True)
    network = next((name for name in ("tokenizer", "dit") if name in checkpoint.get("models", {})), None)
    if network is None:
        raise DataError(f"export.source={settings.source} holds neither a tokenizer nor a DiT")
    state, config = network_state(checkpoint, network, bool(cfg.decode.use_ema), settings.source)
    model = build_network(network, config).eval()
    model.load_state_dict(state)
    exported_config, exported_state = converted_for_export(settings, network, model, config, state)

    with setup(cfg, fresh=True) as runtime:
        result = {"network": network, "format": settings.format, "source": str(source), "out": str(runtime.run_dir)}
        if settings.format == "safetensors":
            save_weights_folder(runtime.run_dir, network, state, config, checkpoint.get("step", 0))
        elif settings.format == "dit":
            atomic_save(exported_state, runtime.run_dir / OFFICIAL_DIT_FILE)
        else:
            theirs = save_diffusers_folder(exported_config, exported_state, runtime.run_dir)
            result["max_abs_difference"] = largest_difference(network, model, theirs)
        runtime.log.info("exported: %s", json.dumps(result))
        runtime.finish(result)
    print(json.dumps(result))
    return result
