"""Paired image metrics: LPIPS (against the official package) and PSNR / SSIM (against their definitions)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from shared.data.transforms import quantize_to_uint8
from shared.errors import ConfigError
from shared.metrics.image_quality import psnr, ssim
from shared.metrics.lpips import (LPIPS, alexnet_features, secondary_net, torchvision_backbone_state_dict,
                                  vgg16_features)


def image_pair(batch: int = 3, size: int = 64, noise: float = 0.3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, size, size, generator=generator) * 2 - 1
    y = (x + noise * torch.randn(x.shape, generator=generator)).clamp(-1, 1)
    return x, y


# ------------------------------------------------------------------------------------------ LPIPS
@pytest.mark.filterwarnings("ignore:.*(pretrained|weight enum).*:UserWarning")  # raised inside the lpips package
@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_matches_the_official_package(net):
    lpips = pytest.importorskip("lpips")
    ours = LPIPS(net)
    # pnet_rand: the official package would download its backbone; it gets our converted one instead, keeping its
    # own linear heads, scaling layer and normalisation.
    official = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    backbone = torchvision_backbone_state_dict(net)
    official.net.load_state_dict({key: backbone[key.split(".", 1)[1]] for key in official.net.state_dict()})
    x, y = image_pair(size=48 if net == "vgg" else 64)
    with torch.no_grad():
        expected = official(x, y).flatten()
        distances = ours(x, y)
    assert distances.shape == (3,)
    torch.testing.assert_close(distances, expected, rtol=0, atol=1e-4)
    # ...and the heads are the official v0.1 heads, not merely loaded alike.
    for head, official_head in zip(ours.heads, official.lins):
        torch.testing.assert_close(head, official_head.model[-1].weight.flatten())


def test_the_backbones_are_torchvisions_trunks_layer_for_layer():
    torchvision = pytest.importorskip("torchvision")
    assert str(alexnet_features()) == str(torchvision.models.alexnet(weights=None).features)
    assert str(vgg16_features()) == str(torchvision.models.vgg16(weights=None).features)


def test_lpips_is_zero_for_identical_images_symmetric_and_grows_with_distortion():
    model = LPIPS("alex")
    x, slightly = image_pair(noise=0.05)
    _, strongly = image_pair(noise=0.5)
    with torch.no_grad():
        assert model(x, x).abs().max() < 1e-6
        torch.testing.assert_close(model(x, slightly), model(slightly, x))
        assert (model(x, strongly) > model(x, slightly)).all()


def test_lpips_is_frozen_but_differentiable_with_respect_to_inputs():
    model = LPIPS("alex")
    assert not any(p.requires_grad for p in model.parameters())
    model.train()
    assert not model.training and not any(m.training for m in model.modules())
    x, y = image_pair(batch=2, size=32)
    x.requires_grad_(True)
    model(x, y).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_a_loss_against_fixed_targets_has_the_value_and_gradient_of_the_joint_pass():
    # y without a gradient takes the path that runs the backbone on y outside the graph; y with one (nothing here
    # uses it) runs both in one pass: the two must agree
    model = LPIPS("vgg")
    x, y = image_pair(batch=2, size=32)
    grads, values = [], []
    for y_needs_grad in (False, True):
        x_leaf, y_leaf = x.clone().requires_grad_(True), y.clone().requires_grad_(y_needs_grad)
        distance = model(x_leaf, y_leaf)
        distance.sum().backward()
        values.append(distance.detach())
        grads.append(x_leaf.grad)
    torch.testing.assert_close(values[0], values[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)
    assert grads[0].abs().sum() > 0


def test_lpips_rejects_unknown_backbones_and_names_the_other_one_as_secondary():
    with pytest.raises(ConfigError, match="squeeze"):
        LPIPS("squeeze")
    with pytest.raises(ConfigError, match="squeeze"):
        secondary_net("squeeze")
    assert secondary_net("vgg") == "alex" and secondary_net("alex") == "vgg"


# ------------------------------------------------------------------------------------------ PSNR / SSIM
def test_identical_images_give_infinite_psnr_and_unit_ssim():
    x, _ = image_pair(batch=2, size=16)
    assert torch.isinf(psnr(x, x)).all()
    torch.testing.assert_close(ssim(x, x), torch.ones(2, dtype=torch.float64))


def test_psnr_of_a_known_mse():
    # uint8 images differing by exactly 5 levels everywhere: MSE = 25, PSNR = 10 log10(255² / 25).
    x = torch.full((1, 3, 8, 8), 100, dtype=torch.uint8)
    y = x + 5
    assert psnr(x, y).item() == pytest.approx(10 * math.log10(255 ** 2 / 25))
    # Float inputs in [-1, 1] are first quantised as a PNG would be.
    assert psnr(x.float() / 127.5 - 1, y.float() / 127.5 - 1).item() == pytest.approx(psnr(x, y).item())


def test_psnr_and_ssim_are_symmetric_and_order_distortions():
    x, slightly = image_pair(batch=2, size=24, noise=0.05)
    _, strongly = image_pair(batch=2, size=24, noise=0.5)
    torch.testing.assert_close(psnr(x, slightly), psnr(slightly, x))
    torch.testing.assert_close(ssim(x, slightly), ssim(slightly, x))
    assert (psnr(x, slightly) > psnr(x, strongly)).all()
    assert (ssim(x, slightly) > ssim(x, strongly)).all()


def test_ssim_matches_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    x, y = image_pair(batch=2, size=40, noise=0.2)
    x = x[..., :33]  # non-square
    y = y[..., :33]
    ours = ssim(x, y)
    for index in range(2):
        a, b = (quantize_to_uint8(image[index]).permute(1, 2, 0).numpy() for image in (x, y))
        expected = metrics.structural_similarity(a, b, channel_axis=2, data_range=255, gaussian_weights=True,
                                                 sigma=1.5, use_sample_covariance=False)
        assert ours[index].item() == pytest.approx(expected, abs=1e-6)
        assert psnr(x[index:index + 1], y[index:index + 1]).item() == pytest.approx(
            metrics.peak_signal_noise_ratio(a, b, data_range=255), abs=1e-6)


def test_ssim_rejects_images_smaller_than_the_window():
    x = torch.zeros(1, 3, 8, 8)
    with pytest.raises(ValueError):
        ssim(x, x)
    assert np.isfinite(psnr(x, x + 0.5).item())
