"""SD-VAE's shape on both sides: our VAE baseline configured as SD-VAE, and diffusers' AutoencoderKL with the same
`block_out_channels` (also `stage=paper_speed`'s SD-VAE decoder column)."""
from __future__ import annotations

from torch import nn

from pipelines.bench.settings import LATENT_CHANNELS
from pipelines.configs import group_config


def sd_vae_config(channels: list[int]) -> dict:
    """Our VAE baseline shaped as SD-VAE (`block_out_channels` = channels): vae_sd_b's encoder, the mirrored
    decoder (num_res_blocks + 1 ResBlocks per level, attention in the middle block only) and single-head attention
    as in diffusers' AutoencoderKL."""
    layout = {"base_channels": channels[0], "channel_mult": [c // channels[0] for c in channels],
              "num_res_blocks": 2, "attention_levels": [], "head_channels": channels[-1]}
    config = group_config("tokenizer", "vae_sd_b")
    config["encoder"].update(layout)
    config["decoder"].update(layout)
    config["downsample"] = 2 ** (len(channels) - 1)
    return config


def diffusers_sd_vae(channels: list[int]) -> nn.Module:
    from diffusers import AutoencoderKL

    levels = len(channels)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
                         block_out_channels=tuple(channels), layers_per_block=2,
                         down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, norm_num_groups=32)
