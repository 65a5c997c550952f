"""The bench's settings: `cfg.bench` with the DiT shape of `cfg.ldm` (or the tiny `bench.quick` sizes), the shapes
every section shares, the targets of the ratios and where the loaders' images are."""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from pipelines.configs import ROOT

# bench.quick: the same benchmark on tiny networks and inputs, a smoke test of the stage (seconds, not minutes).
QUICK = {
    "warmup": 0, "repeats": 1, "dit_batch_size": 2, "image_batch_size": 1, "latent_size": 8, "image_size": 32,
    "sample_images": 2, "sample_steps": 3, "loader_images": 32, "fid_images": 1, "matmul_size": 256,
    "conv_channels": 32, "conv_size": 16,
    "dit": {"depth": 2, "hidden_size": 64, "num_heads": 4, "patch_size": 2},
    "sd_vae_channels": [32, 32, 64, 64],
    "epsvae": "epsvae_tiny", "vae": "vae_tiny",
}
NUM_CLASSES = 1000
LATENT_CHANNELS = 4
TARGETS = {"dit_train_step": 1.0, "vae_decode": 1.0, "latent_loader": 20.0}
IMAGENETTE = ROOT.parent / "shared" / "data" / "imagenette2-224"  # the loaders' images when beside the checkout


def bench_settings(cfg: DictConfig) -> DictConfig:
    """cfg.bench with the DiT shape of cfg.ldm, or the tiny QUICK settings with bench.quick."""
    dit_shape = {key: cfg.ldm[key] for key in ("depth", "hidden_size", "num_heads", "patch_size")}
    settings = OmegaConf.merge(OmegaConf.to_container(cfg.bench, resolve=True), {"dit": dit_shape})
    return OmegaConf.merge(settings, QUICK) if settings.quick else settings
