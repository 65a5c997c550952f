"""Our VAE baseline shaped as SD-VAE against diffusers' AutoencoderKL (encode, decode), and the ε-VAE decoder at
NFE 1-3 against the VAE baseline decoder of the same size class."""
from __future__ import annotations

import torch

from pipelines.bench.compare import Context, Row
from pipelines.bench.sd_vae import diffusers_sd_vae, sd_vae_config
from pipelines.bench.settings import LATENT_CHANNELS, TARGETS
from pipelines.configs import group_config
from pipelines.describe import count_parameters


def bench_tokenizers(ctx: Context) -> tuple[list[Row], dict]:
    from stage1_tokenizer.tokenizer import build_tokenizer

    channels = list(ctx.bench.sd_vae_channels)
    ours, theirs = build_tokenizer(sd_vae_config(channels)), diffusers_sd_vae(channels)
    params = {"ours": {"encoder": count_parameters(ours.encoder), "decoder": count_parameters(ours.decoder)},
              "theirs": {"encoder": count_parameters(theirs.encoder) + count_parameters(theirs.quant_conv),
                         "decoder": count_parameters(theirs.decoder) + count_parameters(theirs.post_quant_conv)}}
    ours, theirs = ctx.prepare(ours.eval(), True), ctx.prepare(theirs.eval(), True)
    batch, size = ctx.bench.image_batch_size, ctx.bench.image_size
    images = torch.rand(batch, 3, size, size, device=ctx.device).mul(2).sub(1)
    images = images.contiguous(memory_format=torch.channels_last)
    factor = 2 ** (len(channels) - 1)
    latents = torch.randn(batch, LATENT_CHANNELS, size // factor, size // factor, device=ctx.device)
    latents = latents.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        rows = [
            ctx.side_by_side(f"SD-VAE encode {size} px (ours: VAE baseline)", "images/s", batch,
                             lambda: ours.encode(images).mean, lambda: theirs.encode(images).latent_dist.mean),
            ctx.side_by_side(f"SD-VAE decode {size} px (ours: VAE baseline)", "images/s", batch,
                             lambda: ours.decode(latents), lambda: theirs.decode(latents).sample,
                             target=TARGETS["vae_decode"]),
        ]
    return rows + bench_diffusion_decoder(ctx), params


def bench_diffusion_decoder(ctx: Context) -> list[Row]:
    """ε-VAE against the VAE baseline of the same size class: the price of decoding with 1-3 network calls."""
    from stage1_tokenizer.tokenizer import build_tokenizer

    epsvae_config, vae_config = group_config("tokenizer", ctx.bench.epsvae), group_config("tokenizer", ctx.bench.vae)
    epsvae = ctx.prepare(build_tokenizer(epsvae_config).eval(), True)
    vae = ctx.prepare(build_tokenizer(vae_config).eval(), True)
    batch, size = ctx.bench.image_batch_size, ctx.bench.image_size
    factor = epsvae_config["downsample"]
    latents = torch.randn(batch, LATENT_CHANNELS, size // factor, size // factor, device=ctx.device)
    latents = latents.contiguous(memory_format=torch.channels_last)
    noise = torch.randn(batch, 3, size, size, device=ctx.device).contiguous(memory_format=torch.channels_last)
    rows = []
    with torch.inference_mode():
        for nfe in (1, 2, 3):
            rows.append(ctx.side_by_side(
                f"ε-VAE decode NFE {nfe} ({ctx.bench.epsvae} vs {ctx.bench.vae}) {size} px", "images/s", batch,
                lambda nfe=nfe: epsvae.decode(latents, nfe=nfe, noise=noise), lambda: vae.decode(latents),
                note="theirs = our VAE baseline decoder; not a target (a diffusion decoder pays per NFE)"))
    return rows
