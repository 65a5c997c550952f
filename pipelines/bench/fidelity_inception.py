"""torch-fidelity's InceptionV3 with the offline weights of our FID features (shared/metrics/inception.py), the
other side of the FID-features section: the same network and weights in torch-fidelity's code."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def torch_fidelity_names(directory: Path) -> dict[str, torch.Tensor]:
    """The state dict of an unloaded torch-fidelity InceptionV3: its parameter names in the order of the
    TorchScript convs, and their shapes. Its constructor always loads weights (from a file, or else the internet),
    and a strict load of an empty file would fail, so a subclass skips the load."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Skeleton(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None

    empty = directory / "empty.pth"
    torch.save({}, empty)
    return Skeleton("names", ["2048"], feature_extractor_weights_path=str(empty)).state_dict()


def torch_fidelity_inception(ours: nn.Module, directory: Path) -> nn.Module:
    """torch-fidelity's InceptionV3 loaded with the offline TorchScript weights of `ours`, renamed conv by conv:
    TF's batch norm has no scale (→ ones); the 1008-class head is absent (→ zeros, unused by pool features)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    names = torch_fidelity_names(directory)
    source = ours.net.state_dict()
    source_convs = [key.removesuffix(".weight") for key in source if key.endswith(".weight")]
    target_convs = [key.removesuffix(".conv.weight") for key in names if key.endswith(".conv.weight")]
    converted = {"fc.weight": torch.zeros_like(names["fc.weight"]), "fc.bias": torch.zeros_like(names["fc.bias"])}
    for ts_name, tf_name in zip(source_convs, target_convs, strict=True):
        beta = source[f"{ts_name}.beta"]
        converted |= {f"{tf_name}.conv.weight": source[f"{ts_name}.weight"], f"{tf_name}.bn.weight": torch.ones_like(beta),
                      f"{tf_name}.bn.bias": beta, f"{tf_name}.bn.running_mean": source[f"{ts_name}.mean"],
                      f"{tf_name}.bn.running_var": source[f"{ts_name}.var"],
                      f"{tf_name}.bn.num_batches_tracked": torch.tensor(0)}
    weights = directory / "inception-2015-12-05.pth"
    torch.save(converted, weights)
    return FeatureExtractorInceptionV3("bench", ["2048"], feature_extractor_weights_path=str(weights))
