"""`stage=describe`: parameter counts as one JSON line, built on the meta device (instant, no memory).

    python pipelines/run.py stage=describe tokenizer=epsvae_sd_m   {"tokenizer": ..., "encoder_params": ..., ...}
    python pipelines/run.py stage=describe ldm=dit_xl2             {"ldm": ..., "params": ...}

Which one is asked for: the DiT when `ldm=NAME` is on the command line (Hydra's task overrides), the tokenizer
otherwise. The DiT is counted for the published setting, 32×32×4 latents and 1000 classes (its count barely
depends on them: only the patch embedding, output layer and label table do).
"""
from __future__ import annotations

import json

import torch
from omegaconf import DictConfig

PUBLISHED_LATENT_CHANNELS = 4
PUBLISHED_LATENT_SIZE = 32
PUBLISHED_NUM_CLASSES = 1000


def count_parameters(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def describe_tokenizer(tok_cfg: DictConfig, name: str) -> dict:
    from stage1_tokenizer.discriminator import build_discriminator
    from stage1_tokenizer.tokenizer import build_tokenizer

    with torch.device("meta"):
        tokenizer = build_tokenizer(tok_cfg)
        discriminator = build_discriminator(tok_cfg)
    return {"tokenizer": name, "encoder_params": count_parameters(tokenizer.encoder),
            "decoder_params": count_parameters(tokenizer.decoder),
            "discriminator_params": count_parameters(discriminator)}


def describe_ldm(ldm_cfg: DictConfig, name: str) -> dict:
    from stage2_ldm.dit import build_dit

    with torch.device("meta"):
        dit = build_dit(ldm_cfg, PUBLISHED_LATENT_CHANNELS, PUBLISHED_LATENT_SIZE, PUBLISHED_NUM_CLASSES)
    return {"ldm": name, "params": count_parameters(dit), "latent_shape": [PUBLISHED_LATENT_CHANNELS,
            PUBLISHED_LATENT_SIZE, PUBLISHED_LATENT_SIZE], "num_classes": PUBLISHED_NUM_CLASSES}


def hydra_choices() -> tuple[dict, list[str]]:
    """(config group -> chosen name, command-line overrides); empty outside a Hydra run."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}, []
    hydra_cfg = HydraConfig.get()
    return dict(hydra_cfg.runtime.choices), list(hydra_cfg.overrides.task)


def main(cfg: DictConfig) -> dict:
    choices, overrides = hydra_choices()
    if any(override.split("=", 1)[0].lstrip("+~") == "ldm" for override in overrides):
        description = describe_ldm(cfg.ldm, choices.get("ldm", "ldm"))
    else:
        description = describe_tokenizer(cfg.tokenizer, choices.get("tokenizer", "tokenizer"))
    print(json.dumps(description), flush=True)
    return description
