"""The ε-VAE's diffusion decoder can learn: trained through the project's own objective, it reconstructs what it saw.

The tiny ε-VAE (configs/tokenizer/epsvae_tiny.yaml, γ = 0.6, no GAN, no LPIPS: AlexNet cannot see 16 px) overfits
four 16 px images of the embedded synthetic data set (shared/data/synthetic.py) with `TokenizerObjective.
generator_loss`: the velocity loss on x_t that the tokenizer's own `corrupt`, `predict` and `target` build (the KL
term rides along). Nothing trains x̂0 directly. The images are contrast-stretched to [-1, 1] per channel, so that a
sampler which forgets to undo γ (every pixel pulled towards grey by γ) is far from them. Then `tokenizer.decode`,
the real 3-step Euler sampler on the reversed-log grid, decodes the posterior means with fixed noise draws, and:

* its PSNR beats, by a clear margin, what broken decoders reach, each computed here on the same images:
  the best constant image (the per-pixel mean of the four), the images scaled by γ (the best a sampler that forgets
  to undo γ can return) and the trained decoder's own output for another image's latent (a decoder that ignores z
  scores the same on both); plus an absolute floor;
* its output barely depends on the noise: the per-pixel std across noise draws, in grey levels (RMS over pixels), is
  far below that of the same decoder at initialisation (which returns the noise itself: its output layer is zero).

Calibration (Adam lr 3e-3 cosine to 0, 600 steps of batch 8 = each image twice; one thread), over torch seeds 0-7:
    trained decoder              PSNR 21.9-22.8 dB     noise std 17.5-19.5 grey levels
    best constant image          PSNR 10.6 dB
    images scaled by γ           PSNR 17.8 dB
    another image's latent       PSNR 6.0-6.1 dB
    decoder at initialisation                          noise std 106
and with a deliberate bug, trained the same way (seeds 0-1; the γ bug 0-3):
    velocity target sign flipped             PSNR 4.4 dB        noise std 116
    γ in training, not at sampling           PSNR 17.0-17.7 dB  (decode without / γ, or with γ = 1)
    decoder ignores z (condition zeroed)     PSNR 8.6-10.6 dB   noise std 57-64
So the thresholds, PSNR ≥ 20 dB and ≥ 2 dB above the γ-scaled images, ≥ 5 dB above the mean image and the swapped
latents, noise std ≤ 30 grey levels and ≤ a third of the initial decoder's, sit at least 2 dB / 10 grey levels from
the trained decoder on one side and from every bug above on the other. About 30 s on one thread.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from pipelines.configs import group_config
from shared.data.synthetic import SyntheticImages
from shared.data.transforms import quantize_to_uint8
from shared.metrics.image_quality import psnr
from stage1_tokenizer.objective import build_objective
from stage1_tokenizer.tokenizer import EpsVAE
from tests.helpers import torch_threads

pytestmark = pytest.mark.slow

NUM_IMAGES = 4
RESOLUTION = 16
REPEATS_PER_BATCH = 2  # each image twice per step, with its own t and ε: batch 8, the tiny config's
STEPS = 600
LEARNING_RATE = 3e-3  # cosine-decayed to 0 over STEPS
GRAD_CLIP = 1.0  # the config's train.grad_clip
SEED = 0
NFE = 3
NOISE_DRAWS = 3

PSNR_FLOOR_DB = 20.0
MARGIN_OVER_GAMMA_SCALED_DB = 2.0
MARGIN_OVER_MEAN_IMAGE_DB = 5.0
MARGIN_OVER_SWAPPED_LATENTS_DB = 5.0
MAX_NOISE_STD_GREY_LEVELS = 30.0
MAX_NOISE_STD_FRACTION_OF_INITIAL = 1 / 3


def contrast_stretched_images() -> torch.Tensor:
    """(NUM_IMAGES, 3, R, R) synthetic images (one class each), every channel stretched to span [-1, 1]."""
    data = SyntheticImages(NUM_IMAGES, RESOLUTION, num_classes=NUM_IMAGES)
    images = torch.stack([data[index]["image"] for index in range(NUM_IMAGES)])
    low, high = images.amin(dim=(2, 3), keepdim=True), images.amax(dim=(2, 3), keepdim=True)
    return (images - low) / (high - low) * 2 - 1


def noise_std_grey_levels(decodes: list[torch.Tensor]) -> float:
    """Per-pixel std across decodes of the same latents, in grey levels of the saved PNGs, RMS over pixels."""
    pixels = torch.stack([quantize_to_uint8(images).double() for images in decodes])
    return pixels.std(dim=0).pow(2).mean().sqrt().item()


@dataclass
class Measurements:
    trained_psnr: float
    trained_noise_std: float
    initial_noise_std: float
    mean_image_psnr: float
    gamma_scaled_psnr: float
    swapped_latents_psnr: float


@torch.no_grad()
def decode_draws(tokenizer: EpsVAE, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The posterior means of `images` and their decodes from NOISE_DRAWS fixed noises."""
    latents = tokenizer.encode(images).mean
    generator = torch.Generator().manual_seed(1234)
    noises = [torch.randn(images.shape, generator=generator) for _ in range(NOISE_DRAWS)]
    return latents, [tokenizer.decode(latents, nfe=NFE, noise=noise) for noise in noises]


def train_through_the_diffusion_path() -> Measurements:
    cfg = group_config("tokenizer", "epsvae_tiny")
    cfg["loss"].update(adversarial=0.0, lpips=0.0)
    torch.manual_seed(SEED)
    objective = build_objective(cfg)
    tokenizer = objective.tokenizer
    assert isinstance(tokenizer, EpsVAE) and tokenizer.gamma == 0.6
    images = contrast_stretched_images()

    tokenizer.eval()
    initial_noise_std = noise_std_grey_levels(decode_draws(tokenizer, images)[1])

    tokenizer.train()
    parameters = list(tokenizer.parameters())
    optimizer = torch.optim.Adam(parameters, lr=LEARNING_RATE)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / STEPS)))
    batch = images.repeat(REPEATS_PER_BATCH, 1, 1, 1)
    for step in range(STEPS):
        loss, _ = objective.generator_loss(batch, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, GRAD_CLIP)
        optimizer.step()
        schedule.step()

    tokenizer.eval()
    latents, decodes = decode_draws(tokenizer, images)
    another_images_latents = latents.roll(1, dims=0)
    swapped = tokenizer.decode(another_images_latents, nfe=NFE,
                               noise=torch.randn(images.shape, generator=torch.Generator().manual_seed(1234)))
    mean_image = images.mean(dim=0, keepdim=True).expand_as(images)
    return Measurements(
        trained_psnr=torch.stack([psnr(decoded, images) for decoded in decodes]).mean().item(),
        trained_noise_std=noise_std_grey_levels(decodes),
        initial_noise_std=initial_noise_std,
        mean_image_psnr=psnr(mean_image, images).mean().item(),
        gamma_scaled_psnr=psnr(tokenizer.gamma * images, images).mean().item(),
        swapped_latents_psnr=psnr(swapped, images).mean().item(),
    )


@pytest.fixture(scope="module")
def measured() -> Measurements:
    with torch_threads(1):
        return train_through_the_diffusion_path()


def test_the_trained_decoder_reconstructs_its_images_better_than_broken_decoders(measured):
    assert measured.trained_psnr >= PSNR_FLOOR_DB, measured
    assert measured.trained_psnr >= measured.gamma_scaled_psnr + MARGIN_OVER_GAMMA_SCALED_DB, measured
    assert measured.trained_psnr >= measured.mean_image_psnr + MARGIN_OVER_MEAN_IMAGE_DB, measured


def test_the_trained_decoder_follows_the_latent(measured):
    """Another image's latent decodes far from this image: the decoder does not ignore z."""
    assert measured.trained_psnr >= measured.swapped_latents_psnr + MARGIN_OVER_SWAPPED_LATENTS_DB, measured


def test_the_trained_decoder_denoises(measured):
    """Different noise draws decode the same latents to nearly the same image."""
    assert measured.trained_noise_std <= MAX_NOISE_STD_GREY_LEVELS, measured
    assert measured.trained_noise_std <= MAX_NOISE_STD_FRACTION_OF_INITIAL * measured.initial_noise_std, measured
