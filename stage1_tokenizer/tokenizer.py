"""ε-VAE, DGAE and the VAE baseline behind one interface (docs/DESIGN.md):

    posterior = tokenizer.encode(images)        # DiagonalGaussian over (B, C, H/f, W/f)
    images = tokenizer.decode(z, nfe=3)         # (B, 3, H, W) in [-1, 1]; the VAE ignores nfe
    tokenizer.latent_channels, tokenizer.downsample

The diffusion decoders (ε-VAE, DGAE) generate the image by integrating the rectified flow of shared/flow.py from
pure noise (t = 1) to the image (t = 0) with Euler steps, on γ-scaled data:
    x_t = (1 − t) γ x0 + t ε,   v̂ = G(c_in(t) x_t, t, condition(z)),   image = x_0 / γ.
For the first row of the paper's ablation (Table 5) the ε-VAE decoder can instead be ADM's ε-prediction DDPM
(`tokenizer.flow.process=ddpm`, `DDPMEpsVAE`).
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from shared.ddpm import GaussianDiffusion
from shared.errors import ConfigError, DataError
from shared.flow import euler_sample, input_scale, interpolate, time_grid, velocity_target, x0_from_velocity
from shared.train.checkpoint import fit_weights, load_model_state
from stage1_tokenizer.dgae import DGAEDecoder
from stage1_tokenizer.dit_decoder import DiTDecoder
from stage1_tokenizer.encoder import DiagonalGaussian, Encoder, check_downsample
from stage1_tokenizer.unet import ADMUNet
from stage1_tokenizer.vae_decoder import ConvDecoder

DEFAULT_NFE = 3  # the paper's decoding budget; quality drops past 3 steps on the reversed-log grid
TOKENIZER_KINDS = ("epsvae", "vae", "dgae")
GRID_KINDS = ("reversed_log", "uniform")
PROCESSES = ("rectified_flow", "ddpm")


class DiffusionTokenizer(nn.Module):
    """Encoder + velocity model G(x_t, t, condition). Subclasses say what conditions G: z itself or features of z."""

    def __init__(self, encoder: Encoder, decoder: nn.Module, latent_channels: int, downsample: int, gamma: float,
                 grid: str, default_nfe: int = DEFAULT_NFE):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.latent_channels = latent_channels
        self.downsample = downsample
        self.gamma = gamma
        self.grid = grid
        self.default_nfe = default_nfe

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        return self.encoder(images)

    def condition(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def network_input(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """c_in(t) · x_t: the γ-scaled flow state renormalised to unit variance."""
        return input_scale(t, self.gamma).reshape(-1, 1, 1, 1).to(x_t.dtype) * x_t

    def corrupt(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t of the decoder's process at times t (B,) in [0, 1]: (1 − t) γ x0 + t ε."""
        return interpolate(self.gamma * x0, noise, t)

    def target(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What G regresses: the velocity ε − γ x0."""
        return velocity_target(self.gamma * x0, noise)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """v̂ = G(c_in(t) · x_t, t, condition) for x_t on the γ-scaled flow (B, 3, H, W), t (B,)."""
        return self.decoder(self.network_input(x_t, t), t, condition)

    def estimate_image(self, x_t: torch.Tensor, t: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
        """One-step image estimate x̂0 = (x_t − t v̂) / γ, in image units."""
        return x0_from_velocity(x_t, t, prediction) / self.gamma

    def initial_noise(self, z: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        if noise is not None:
            return noise
        height, width = z.shape[-2] * self.downsample, z.shape[-1] * self.downsample
        return torch.randn(z.shape[0], 3, height, width, device=z.device, dtype=z.dtype)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, nfe: int | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Latents (B, C, h, w) -> images (B, 3, h·f, w·f) in [-1, 1] with `nfe` Euler steps (default 3).

        noise: the starting point x_1 (B, 3, h·f, w·f); drawn from torch's global RNG when not given.
        """
        condition = self.condition(z)
        grid = time_grid(self.default_nfe if nfe is None else nfe, self.grid)
        x_0 = euler_sample(lambda x_t, t: self.predict(x_t, t, condition), self.initial_noise(z, noise), grid)
        return (x_0 / self.gamma).clamp(-1, 1)


class EpsVAE(DiffusionTokenizer):
    """ε-VAE: G is conditioned on the latent itself, nearest-upsampled to x_t and concatenated."""

    def condition(self, z: torch.Tensor) -> torch.Tensor:
        return z


class DGAE(DiffusionTokenizer):
    """DGAE: G is conditioned on image-resolution features that a convolutional decoder computes from z."""

    decoder: DGAEDecoder

    def condition(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder.condition(z)


class DDPMEpsVAE(EpsVAE):
    """The ε-VAE decoder as ADM's ε-prediction DDPM (1000-step linear β, fixed variance) instead of a rectified flow:
    the first row of the paper's ablation (Table 5), nothing else.

    Training time t ∈ [0, 1) picks chain step ⌊1000 t⌋ (uniform t: DDPM's uniform steps); G sees x_t as it is (the
    chain is variance preserving) and that step as t = step / 1000; it predicts ε, and x̂0 follows from it. The loss
    weight `loss.velocity` weighs its ε MSE. Decoding is ancestral sampling on `nfe` evenly respaced steps.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.chain = GaussianDiffusion.linear(1000, learn_sigma=False)

    def step(self, t: torch.Tensor) -> torch.Tensor:
        return (t * self.chain.num_timesteps).long().clamp(0, self.chain.num_timesteps - 1)

    def network_input(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x_t

    def corrupt(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.chain.q_sample(x0, self.step(t), noise)

    def target(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        return self.decoder(x_t, self.step(t).float() / self.chain.num_timesteps, condition)

    def estimate_image(self, x_t: torch.Tensor, t: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
        return self.chain.predict_x0(x_t, self.step(t), prediction)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, nfe: int | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        condition = self.condition(z)
        steps = self.chain.num_timesteps
        respaced = self.chain.respace(self.default_nfe if nfe is None else nfe)
        # x̂_0 clipped to the image range at every step, as Ho et al. sample (clip_denoised): without it an
        # undertrained ε-network's 1,000 ancestral steps drift to saturated images (results/ladder32_fair)
        image = respaced.sample(lambda x_t, model_time: self.decoder(x_t, model_time / steps, condition),
                                self.initial_noise(z, noise), clip_x0=True)
        return image.clamp(-1, 1)


class VAE(nn.Module):
    """The baseline: the same encoder and a deterministic convolutional decoder."""

    def __init__(self, encoder: Encoder, decoder: ConvDecoder, latent_channels: int, downsample: int):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.latent_channels = latent_channels
        self.downsample = downsample

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        return self.encoder(images)

    def decode(self, z: torch.Tensor, nfe: int | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Latents -> images in [-1, 1]; `nfe` and `noise` exist for the common interface and are ignored."""
        return self.decoder(z).clamp(-1, 1)


Tokenizer = EpsVAE | DGAE | VAE


def construct(cls, section: Mapping, key: str, **fixed):
    """cls(**fixed, **section) with unknown or missing keys reported as ConfigError naming `key`."""
    kwargs = {**dict(section), **fixed}
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as error:
        raise ConfigError(f"{key}: {error} (building {cls.__name__})") from None
    return cls(**kwargs)


def section_without(section: Mapping, *names: str) -> dict:
    return {k: v for k, v in section.items() if k not in names}


def build_denoiser(decoder_cfg: Mapping, condition_channels: int) -> nn.Module:
    arch = decoder_cfg.get("arch")
    if arch == "adm_unet":
        return construct(ADMUNet, section_without(decoder_cfg, "arch", "features"), "tokenizer.decoder",
                         condition_channels=condition_channels)
    if arch == "dit":
        return construct(DiTDecoder, section_without(decoder_cfg, "arch"), "tokenizer.decoder",
                         condition_channels=condition_channels)
    raise ConfigError(f"tokenizer.decoder.arch={arch!r} is not a diffusion decoder: use adm_unet or dit")


def as_dict(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def build_tokenizer(tok_cfg) -> Tokenizer:
    """The tokenizer of a `tokenizer` config group (DictConfig or the plain dict stored in checkpoints)."""
    cfg = as_dict(tok_cfg)
    for key in ("kind", "downsample", "latent_channels", "encoder", "decoder"):
        if key not in cfg:
            raise ConfigError(f"tokenizer.{key} is missing from the tokenizer config")
    kind, latent_channels, downsample = cfg["kind"], cfg["latent_channels"], cfg["downsample"]
    if kind not in TOKENIZER_KINDS:
        raise ConfigError(f"tokenizer.kind={kind!r} is not one of {', '.join(TOKENIZER_KINDS)}")
    check_downsample(cfg["encoder"].get("channel_mult", ()), downsample, "tokenizer.encoder")
    encoder = construct(Encoder, cfg["encoder"], "tokenizer.encoder", latent_channels=latent_channels)
    decoder_cfg = cfg["decoder"]

    if kind == "vae":
        if decoder_cfg.get("arch") != "conv":
            raise ConfigError(f"tokenizer.decoder.arch must be 'conv' for kind=vae, not {decoder_cfg.get('arch')!r}")
        check_downsample(decoder_cfg.get("channel_mult", ()), downsample, "tokenizer.decoder")
        decoder = construct(ConvDecoder, section_without(decoder_cfg, "arch"), "tokenizer.decoder",
                            latent_channels=latent_channels)
        return VAE(encoder, decoder, latent_channels, downsample)

    flow = cfg.get("flow") or {}
    missing = [key for key in ("process", "gamma", "grid") if key not in flow]
    if missing:
        raise ConfigError(f"tokenizer.flow lacks {', '.join(missing)}: a diffusion tokenizer's config sets them "
                          f"(configs/tokenizer/)")
    process, gamma, grid = flow["process"], flow["gamma"], flow["grid"]
    if process not in PROCESSES:
        raise ConfigError(f"tokenizer.flow.process={process!r} is not one of {', '.join(PROCESSES)}")
    if process == "ddpm" and (kind != "epsvae" or gamma != 1.0):
        raise ConfigError("tokenizer.flow.process=ddpm is the ablation's ε-VAE decoder: it needs kind=epsvae and "
                          "tokenizer.flow.gamma=1.0 (γ scales the rectified flow only)")
    if grid not in GRID_KINDS:
        raise ConfigError(f"tokenizer.flow.grid={grid!r} is not one of {', '.join(GRID_KINDS)}")
    if not gamma > 0:
        raise ConfigError(f"tokenizer.flow.gamma={gamma} must be positive")
    flow_args = dict(gamma=float(gamma), grid=grid)
    if kind == "epsvae":
        tokenizer_class = DDPMEpsVAE if process == "ddpm" else EpsVAE
        return tokenizer_class(encoder, build_denoiser(decoder_cfg, latent_channels), latent_channels, downsample,
                               **flow_args)

    features_cfg = decoder_cfg.get("features")
    if not features_cfg:
        raise ConfigError("tokenizer.decoder.features (the convolutional decoder that guides DGAE's denoiser) "
                          "is missing")
    check_downsample(features_cfg.get("channel_mult", ()), downsample, "tokenizer.decoder.features")
    feature_decoder = construct(ConvDecoder, features_cfg, "tokenizer.decoder.features",
                                latent_channels=latent_channels)
    denoiser = build_denoiser(decoder_cfg, features_cfg.get("out_channels", 3))
    return DGAE(encoder, DGAEDecoder(feature_decoder, denoiser), latent_channels, downsample, **flow_args)


def upgrade_stored_config(config: dict) -> dict:
    """A checkpoint's stored tokenizer config in today's terms. tokenizer.flow.process came with the ablation's DDPM
    decoder; every diffusion tokenizer stored before it is a rectified flow."""
    flow = config.get("flow")
    if flow is None or "process" in flow:
        return config
    return {**config, "flow": {**flow, "process": "rectified_flow"}}


def load_tokenizer(path, device: torch.device | str, use_ema: bool = True) -> Tokenizer:
    """The tokenizer of a training checkpoint (its config is stored in it), on `device`, in eval mode."""
    state_dict, config = load_model_state(path, "tokenizer", use_ema)
    if not config:
        raise DataError(f"checkpoint {path} stores no tokenizer config")
    try:
        tokenizer = build_tokenizer(upgrade_stored_config(config))
    except ConfigError as error:
        raise DataError(f"checkpoint {path} stores a tokenizer config that cannot be built: {error}") from None
    fit_weights(tokenizer, state_dict, path)
    return tokenizer.to(device).eval()
