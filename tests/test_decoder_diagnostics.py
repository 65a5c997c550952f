"""stage=reconstruct's diagnostics of stochastic decoders: the spread of decodes with independent noise
(shared/metrics/noise_sensitivity.py), high-frequency colour noise (shared/metrics/colour_noise.py), and LPIPS with
both backbones."""
from __future__ import annotations

import contextlib
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shared.data.transforms import quantize_to_uint8
from shared.metrics.colour_noise import chroma_hf
from shared.metrics.image_quality import psnr
from shared.metrics.noise_sensitivity import noise_std, seed_mean_psnr
from shared.train.checkpoint import save_weights_folder
from stage1_tokenizer.reconstruct import decoder_noise, per_image_path, reconstruct, reconstruct_split
from stage1_tokenizer.tokenizer import build_tokenizer
from stage1_tokenizer.train import model_config
from tests.helpers import load_config

DATA = ["experiment=smoke", "data.val_size=4"]
GREY = 127.5  # grey levels per unit of an image in [-1, 1]


class NoisyCopy:
    """A stochastic decoder in the tokenizer interface: the latents are the images, and decoding adds the decoder's
    noise, `sigma` grey levels per unit of it."""

    def __init__(self, sigma: float):
        self.sigma = sigma

    def encode(self, images: torch.Tensor):
        return SimpleNamespace(mode=lambda: images)

    def decode(self, latents: torch.Tensor, nfe: int, noise: torch.Tensor) -> torch.Tensor:
        return latents + self.sigma / GREY * noise


def split_metrics(tokenizer, tmp_path, *, noise_seeds: int, batch_size: int = 4, lpips_net: str = "alex") -> tuple:
    """reconstruct_split's result on the 4 synthetic validation images and its per-image arrays."""
    cfg = load_config(DATA)
    per_image_file = tmp_path / f"per_image_k{noise_seeds}_b{batch_size}.npz"
    result = reconstruct_split(tokenizer, cfg.data, "val", num_images=None, nfe=1, batch_size=batch_size,
                               device=torch.device("cpu"), autocast=contextlib.nullcontext, lpips_net=lpips_net,
                               noise_seeds=noise_seeds, seed=0, per_image_file=per_image_file)
    return result, dict(np.load(per_image_file))


def mid_grey_images(count: int, size: int, seed: int) -> torch.Tensor:
    """Images on the PNG grid (as the data loader gives them) whose values stay far from black and white."""
    images = torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed)) - 0.5
    return quantize_to_uint8(images).float() / GREY - 1


# ------------------------------------------------------------------------------------------- decoder noise
def test_a_deterministic_decoder_has_no_noise_and_its_seed_mean_is_its_reconstruction(tmp_path):
    torch.manual_seed(0)
    vae = build_tokenizer(load_config(["tokenizer=vae_tiny"]).tokenizer).eval()
    result, per_image = split_metrics(vae, tmp_path, noise_seeds=3)  # 3: a mean that is not a power of two
    assert result["noise_seeds"] == 3
    assert np.array_equal(per_image["noise_std"], np.zeros(4)) and result["noise_std"] == 0
    np.testing.assert_array_equal(per_image["seed_mean_psnr"], per_image["psnr"])
    assert result["seed_mean_psnr"] == result["psnr"] and result["seed_mean_psnr_ci95"] == result["psnr_ci95"]


def test_decodes_with_noise_of_sigma_grey_levels_spread_by_sigma_and_their_mean_gains_10_log10_k_db():
    sigma, draws, count, size = 8.0, 4, 8, 32
    originals = mid_grey_images(count, size, seed=1)  # within ±0.5: 6σ from clamping
    decoder = NoisyCopy(sigma)
    decodes = torch.stack([decoder.decode(originals, 1, decoder_noise(7, draw, range(count), originals.shape[1:]))
                           for draw in range(draws)]).clamp(-1, 1)  # (K, B, 3, H, W)
    spread = noise_std(decodes)
    # Per image, an unbiased variance of K − 1 = 3 degrees of freedom pooled over 3·32·32 pixels: its relative
    # standard deviation is sqrt(2 / (3 · 3072)) = 1.5 %, that of its square root half that. Within 4 of those:
    assert spread.numpy() == pytest.approx(np.full(count, sigma), rel=0.03)
    assert spread.mean().item() == pytest.approx(sigma, rel=0.012)  # the mean of 8
    # The error is the decoder's noise alone, plus the PNG grid's rounding (uniform, variance 1/12) on top: one
    # decode has MSE σ² + 1/12, the mean of K has σ²/K + 1/12 (its noise is still many grey levels wide), so the
    # mean gains 10 log10((σ² + 1/12) / (σ²/K + 1/12)) = 6.00 dB, nearly 10 log10 K. Each MSE over 3072 values
    # is within about 2.6 % (0.11 dB); the gain's mean over 8 images within about 0.06 dB.
    single, averaged = psnr(originals, decodes[0]), seed_mean_psnr(originals, decodes)
    expected_gain = 10 * math.log10((sigma ** 2 + 1 / 12) / (sigma ** 2 / draws + 1 / 12))
    assert single.numpy() == pytest.approx(np.full(count, 10 * math.log10(255 ** 2 / (sigma ** 2 + 1 / 12))),
                                           abs=0.5)
    assert (averaged - single).mean().item() == pytest.approx(expected_gain, abs=0.25)


def test_decoder_noise_is_the_same_for_any_batch_size(tmp_path):
    alone = torch.cat([decoder_noise(0, 1, range(position, position + 1), (3, 8, 8)) for position in range(4)])
    assert torch.equal(decoder_noise(0, 1, range(4), (3, 8, 8)), alone)
    assert not torch.equal(decoder_noise(0, 0, range(4), (3, 8, 8)), alone)  # another draw, other noise
    # The whole stage: decoded one by one or four at a time, every image's figures are the same (up to the order
    # of float64 sums over a batch; other noise would move them by percents).
    _, one_by_one = split_metrics(NoisyCopy(8.0), tmp_path, noise_seeds=2, batch_size=1)
    _, together = split_metrics(NoisyCopy(8.0), tmp_path, noise_seeds=2, batch_size=4)
    for name in ("psnr", "noise_std", "seed_mean_psnr", "chroma_hf", "chroma_hf_original"):
        np.testing.assert_allclose(one_by_one[name], together[name], rtol=1e-12, atol=0)
    assert (together["noise_std"] > 0).all()


def test_one_noise_seed_measures_no_noise_but_the_colour_noise(tmp_path):
    result, per_image = split_metrics(NoisyCopy(8.0), tmp_path, noise_seeds=1)
    assert result["noise_seeds"] == 1
    for key in ("noise_std", "noise_std_ci95", "seed_mean_psnr", "seed_mean_psnr_ci95"):
        assert result[key] is None
    assert "noise_std" not in per_image and "seed_mean_psnr" not in per_image
    assert result["chroma_hf"] > result["chroma_hf_original"] > 0 and len(per_image["chroma_hf"]) == 4
    assert result["chroma_hf_ratio"] == pytest.approx(per_image["chroma_hf"].mean()
                                                      / per_image["chroma_hf_original"].mean())


# ------------------------------------------------------------------------------------------- colour noise
def noise(count: int, size: int, seed: int) -> torch.Tensor:
    """(count, 1, size, size) standard normal."""
    return torch.randn(count, 1, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_chroma_noise_raises_the_colour_noise_by_its_high_passed_energy():
    images = mid_grey_images(4, 64, seed=2).double()
    # The RGB direction of one unit of Cb (BT.601 inverse: R = Y + 1.402 Cr, G = Y − 0.344136 Cb − 0.714136 Cr,
    # B = Y + 1.772 Cb), in units of the image.
    unit_cb = torch.tensor([0.0, -0.344136, 1.772], dtype=torch.float64).view(1, 3, 1, 1) / GREY
    sigma = 5.0
    # White noise minus its 3×3 mean keeps (1 − 1/9)² + 8/81 = 8/9 of its variance; Cr stays 0, and the energy is the
    # RMS over both channels: σ sqrt(8/9 / 2) = 2σ/3 (the reflected border, 6 % of the pixels, adds about 0.3 %).
    # Over 64×64 pixels it scatters by 1.3 % (100 seeds' standard deviation); within 4 of those:
    on_grey = chroma_hf(sigma * noise(4, 64, seed=3) * unit_cb)
    assert on_grey.numpy() == pytest.approx(np.full(4, 2 * sigma / 3), rel=0.052)
    assert (chroma_hf(images + sigma * noise(4, 64, seed=3) * unit_cb) > chroma_hf(images)).all()


def test_grey_noise_leaves_the_colour_noise_unchanged_and_blurring_lowers_it():
    images = mid_grey_images(4, 32, seed=4).double()
    grey_noise = 10 * noise(4, 32, seed=5) / GREY  # the same on R, G and B: luma only
    np.testing.assert_allclose(chroma_hf(images + grey_noise).numpy(), chroma_hf(images).numpy(), rtol=0, atol=1e-9)
    blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="reflect"), 3, stride=1)
    assert (chroma_hf(blurred) < 0.5 * chroma_hf(images)).all()  # about a fifth for these white-noise images
    assert chroma_hf(torch.zeros(1, 3, 8, 8)).item() == 0  # grey has no chroma
    # uint8 images are grey levels already: the same figure as their float form
    as_saved = quantize_to_uint8(images)
    assert chroma_hf(as_saved).numpy() == pytest.approx(chroma_hf(as_saved.double() / GREY - 1).numpy(), rel=1e-9)


# ------------------------------------------------------------------------------------------- the stage
def test_stage_reconstruct_reports_both_lpips_nets_and_the_diagnostics_with_intervals(tmp_path):
    cfg = load_config(["stage=reconstruct", *DATA, "tokenizer=epsvae_tiny", "reconstruct.num_images=4",
                       "reconstruct.grid_images=4", "decode.nfe=1", "evaluate.bootstrap=0", "device=cpu"],
                      output_root=tmp_path)
    torch.manual_seed(0)
    weights = build_tokenizer(cfg.tokenizer).state_dict()  # a fresh ε-VAE: its decodes are mostly its noise
    checkpoint = save_weights_folder(tmp_path / "epsvae", "tokenizer", weights, model_config(cfg.tokenizer))
    run_dir = tmp_path / "reconstruct"
    result = reconstruct(cfg, checkpoint, run_dir=run_dir)
    assert result["lpips_net"] == "vgg" and result["noise_seeds"] == 2  # the YAML's defaults
    for key in ("lpips", "lpips_alex", "noise_std", "seed_mean_psnr", "chroma_hf", "chroma_hf_original"):
        low, high = result[f"{key}_ci95"]
        assert low <= result[key] <= high, key
    assert result["lpips"] != result["lpips_alex"] and result["noise_std"] > 0
    assert result["chroma_hf_ratio"] == pytest.approx(result["chroma_hf"] / result["chroma_hf_original"])
    assert json.loads((run_dir / "result.json").read_text())["lpips_alex"] == result["lpips_alex"]
    per_image = np.load(per_image_path(run_dir, 1))
    for key in ("lpips", "lpips_alex", "noise_std", "seed_mean_psnr", "chroma_hf", "chroma_hf_original"):
        assert per_image[key].shape == (4,), key
    assert per_image["lpips_alex"].mean() == pytest.approx(result["lpips_alex"])
