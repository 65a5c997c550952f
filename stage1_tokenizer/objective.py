"""The stage-1 training objectives: the generator side (encoder + decoder) and the discriminator side.

ε-VAE (Sec. 3 of the paper), with z ~ q(z|x0), t ~ logit-normal, ε ~ N(0, I), x_t = (1 − t) γ x0 + t ε:
    L_G = w_v ‖G(c_in x_t, t, z) − (ε − γ x0)‖²  +  w_p LPIPS(x̂0, x0)  +  w_a softplus(−D(x̂0, c_in x_t, t))
          + w_kl KL(q(z|x0) ‖ N(0, I)),                     x̂0 = (x_t − t v̂) / γ
    L_D = softplus(−D(x0, c_in x_t, t)) + softplus(D(x̂0, c_in x_t, t)) + w_r1 ‖∇_x0 D(x0, c_in x_t, t)‖²
DGAE: the same without the GAN terms, its denoiser guided by features of z (stage1_tokenizer/dgae.py).
VAE baseline, x̂ = Dec(z):
    L_G = w_rec |x̂ − x0| + w_p LPIPS(x̂, x0) + w_a softplus(−D(x̂)) + w_kl KL,
    L_D = softplus(−D(x0)) + softplus(D(x̂)) + w_r1 ‖∇_x0 D(x0)‖².
The adversarial terms start at step `disc_start` and use a fixed weight (no VQGAN adaptive weight).

Logs are dicts of *detached tensors*: converting them to floats forces a host-device sync, so the training loop
does that only on the steps it logs.

The generator loss also runs D (its parameters get gradients from L_G): the loop zeroes D's gradients before
L_D's backward, as it does for every optimiser step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from shared.errors import ConfigError
from shared.flow import sample_logit_normal, sample_uniform
from stage1_tokenizer import losses
from stage1_tokenizer.discriminator import build_discriminator
from stage1_tokenizer.tokenizer import DiffusionTokenizer, Tokenizer, as_dict, build_tokenizer

# The keys of tokenizer.loss and tokenizer.flow. Their values come from the config group alone (each family's base
# file, e.g. configs/tokenizer/epsvae_sd_b.yaml): defaults here as well would be a second source that can disagree.
LOSS_KEYS = ("velocity", "lpips", "lpips_net", "adversarial", "r1", "kl", "reconstruction", "reconstruction_kind",
             "disc_start")
FLOW_KEYS = ("process", "t_sampling", "logit_mean", "logit_std", "gamma", "grid")


def complete_section(section, keys: tuple[str, ...], key: str) -> dict:
    """The config section `key` as a dict of exactly `keys`; a missing or unknown key is a ConfigError."""
    values = as_dict(section or {})
    unknown = sorted(set(values) - set(keys))
    if unknown:
        raise ConfigError(f"{key} has unknown keys {unknown}; known: {sorted(keys)}")
    missing = [name for name in keys if name not in values]
    if missing:
        raise ConfigError(f"{key} lacks {', '.join(missing)}: every tokenizer config sets them (configs/tokenizer/)")
    return values


@dataclass
class DiscriminatorBatch:
    """What D compares: real images, the generator's detached estimates, and (ε-VAE) the noisy input and time."""

    images: torch.Tensor
    fake: torch.Tensor
    x_t: torch.Tensor | None = None
    t: torch.Tensor | None = None


class TokenizerObjective(nn.Module):
    def __init__(self, tokenizer: Tokenizer, discriminator: nn.Module | None, lpips: nn.Module | None,
                 loss_cfg, flow_cfg):
        super().__init__()
        self.tokenizer = tokenizer
        self.discriminator = discriminator
        self.lpips = lpips
        self.loss = complete_section(loss_cfg, LOSS_KEYS, "tokenizer.loss")
        # The VAE has no flow (tokenizer.flow: null).
        self.flow = complete_section(flow_cfg, FLOW_KEYS, "tokenizer.flow") if self.diffusion else None
        if self.loss["lpips"] and lpips is None:
            raise ConfigError("tokenizer.loss.lpips > 0 needs an LPIPS network")
        if self.loss["adversarial"] and discriminator is None:
            raise ConfigError("tokenizer.loss.adversarial > 0 needs a discriminator (tokenizer.discriminator)")
        if self.diffusion and self.flow["t_sampling"] not in ("logit_normal", "uniform"):
            raise ConfigError(f"tokenizer.flow.t_sampling={self.flow['t_sampling']!r} is not logit_normal or uniform")
        # What the generator phase of the current step showed D, one per micro-batch (gradient accumulation), for the
        # discriminator phase of the same step.
        self._pending: list[DiscriminatorBatch] = []
        self._pending_step: int | None = None

    @property
    def diffusion(self) -> bool:
        return isinstance(self.tokenizer, DiffusionTokenizer)

    def adversarial_active(self, step: int) -> bool:
        return self.discriminator is not None and self.loss["adversarial"] > 0 and step >= self.loss["disc_start"]

    def sample_time(self, batch: int, device: torch.device) -> torch.Tensor:
        if self.flow["t_sampling"] == "uniform":
            return sample_uniform(batch, device=device)
        return sample_logit_normal(batch, self.flow["logit_mean"], self.flow["logit_std"], device=device)

    def discriminate(self, images: torch.Tensor, batch: DiscriminatorBatch) -> torch.Tensor:
        """D's patch logits for `images` (real or fake) in the context of `batch` (x_t, t for ε-VAE)."""
        if batch.x_t is None:
            return self.discriminator(images)
        return self.discriminator(images, batch.x_t, batch.t)

    def decoder_estimate(self, images: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, dict, DiscriminatorBatch]:
        """The decoder's image estimate, its own reconstruction terms, and what D would see."""
        if not self.diffusion:
            estimate = self.tokenizer.decoder(z)
            terms = {"reconstruction": losses.reconstruction_loss(estimate, images, self.loss["reconstruction_kind"])}
            return estimate, terms, DiscriminatorBatch(images, estimate.detach())
        tokenizer: DiffusionTokenizer = self.tokenizer
        t = self.sample_time(images.shape[0], images.device)
        # Drawn in the logical (B, C, H, W) order whatever the memory layout, so channels_last draws the same noise.
        noise = torch.randn(images.shape, device=images.device, dtype=images.dtype)
        x_t = tokenizer.corrupt(images, noise, t)
        prediction = tokenizer.predict(x_t, t, tokenizer.condition(z))
        estimate = tokenizer.estimate_image(x_t, t, prediction)
        terms = {"velocity": losses.velocity_loss(prediction, tokenizer.target(images, noise))}
        # D sees the noisy input as the denoiser does, renormalised to unit variance.
        batch = DiscriminatorBatch(images, estimate.detach(), tokenizer.network_input(x_t, t).detach(), t)
        return estimate, terms, batch

    def generator_loss(self, images: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        """(weighted total, {"loss/<term>": detached tensor}) for the encoder and decoder on images (B, 3, H, W)."""
        posterior = self.tokenizer.encode(images)
        estimate, terms, batch = self.decoder_estimate(images, posterior.sample())
        if self.loss["lpips"]:
            terms["lpips"] = losses.perceptual_loss(self.lpips, estimate, images)
        if self.loss["kl"]:
            terms["kl"] = losses.kl_loss(posterior)
        if self.adversarial_active(step):
            fake_logits = self.discriminate(estimate, batch)
            terms["adversarial"] = losses.generator_adv_loss(fake_logits)
        total = sum(self.loss[name] * value for name, value in terms.items())
        if step != self._pending_step:
            self._pending, self._pending_step = [], step
        self._pending.append(batch)
        logs = {f"loss/{name}": value.detach() for name, value in terms.items()}
        logs["loss/total"] = total.detach()
        return total, logs

    def discriminator_loss(self, images: torch.Tensor, step: int) -> tuple[torch.Tensor, dict] | None:
        """(L_D, logs), or None when there is no GAN or step < disc_start.

        Reuses the estimates of this step's generator_loss call on the same `images` tensor (VQGAN's order: one
        generator forward per micro-batch and step); recomputes them without gradients otherwise.
        """
        if not self.adversarial_active(step):
            return None
        batch = next((pending for pending in self._pending if pending.images is images), None)
        self._pending = [pending for pending in self._pending if pending is not batch]
        if batch is None:
            with torch.no_grad():
                posterior = self.tokenizer.encode(images)
                batch = self.decoder_estimate(images, posterior.sample())[2]
        real = images.detach().requires_grad_(self.loss["r1"] > 0)
        real_logits = self.discriminate(real, batch)
        fake_logits = self.discriminate(batch.fake, batch)
        adversarial = losses.discriminator_loss(real_logits, fake_logits)
        total = adversarial
        logs = {"disc/loss": adversarial.detach(), "disc/real_logit": real_logits.detach().mean(),
                "disc/fake_logit": fake_logits.detach().mean()}
        if self.loss["r1"] > 0:
            r1 = losses.r1_penalty(real_logits, real)
            total = total + self.loss["r1"] * r1
            logs["disc/r1"] = r1.detach()
        logs["disc/total"] = total.detach()
        return total, logs


def build_lpips(net: str, pretrained: bool = True) -> nn.Module:
    from shared.metrics.lpips import LPIPS

    return LPIPS(net, pretrained)


def build_objective(tok_cfg, pretrained_lpips: bool = True) -> TokenizerObjective:
    """Tokenizer, discriminator and LPIPS as the tokenizer config says. pretrained_lpips=False: LPIPS with random
    weights, for speed measurements (shared/metrics/lpips.py)."""
    cfg = as_dict(tok_cfg)
    loss_cfg = complete_section(cfg.get("loss"), LOSS_KEYS, "tokenizer.loss")
    if cfg.get("kind") == "dgae" and loss_cfg["adversarial"]:
        raise ConfigError("tokenizer.loss.adversarial must be 0 for kind=dgae: DGAE is trained without a GAN")
    tokenizer = build_tokenizer(cfg)
    lpips = build_lpips(loss_cfg["lpips_net"], pretrained_lpips) if loss_cfg["lpips"] else None
    return TokenizerObjective(tokenizer, build_discriminator(cfg), lpips, loss_cfg, cfg.get("flow"))
