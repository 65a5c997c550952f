"""The stage-1 losses, one small function each. Every function returns a scalar (mean over the batch) so that
the weights of the config are comparable across image sizes and batch sizes."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from shared.errors import ConfigError
from stage1_tokenizer.encoder import DiagonalGaussian


def velocity_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """E ‖G(x_t, t, z) − (ε − γ x0)‖², per element (the paper's "score matching" term)."""
    return F.mse_loss(predicted.float(), target.float())


def reconstruction_loss(reconstruction: torch.Tensor, images: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Pixel loss of the VAE baseline, per element: |x̂ − x| (l1) or (x̂ − x)² (l2)."""
    if kind == "l1":
        return F.l1_loss(reconstruction.float(), images.float())
    if kind == "l2":
        return F.mse_loss(reconstruction.float(), images.float())
    raise ConfigError(f"tokenizer.loss.reconstruction_kind must be 'l1' or 'l2', not {kind!r}")


def perceptual_loss(lpips, estimate: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """E LPIPS(x̂0, x0) with `lpips(x, y) -> (B,)` on images in [-1, 1] (shared/metrics/lpips.py)."""
    return lpips(estimate, images).mean()


def kl_loss(posterior: DiagonalGaussian) -> torch.Tensor:
    """KL(q(z|x) ‖ N(0, I)) per latent element, averaged over the batch.

    Per element, like the other terms, so that the weight does not depend on resolution or compression. (SD sums
    both its pixel loss and its KL over elements; with its weight 1e-6 that is a KL 3·f²/C times weaker, relative
    to the reconstruction, than the same weight here.)
    """
    return (posterior.kl() / posterior.mean[0].numel()).mean()


def generator_adv_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss: E softplus(−D(fake)) = −E log sigmoid(D(fake))."""
    return F.softplus(-fake_logits.float()).mean()


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating discriminator loss: E softplus(−D(real)) + E softplus(D(fake))."""
    return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()


def r1_penalty(real_logits: torch.Tensor, real_inputs: torch.Tensor) -> torch.Tensor:
    """R1 (Mescheder et al. 2018): E_x ‖∇_x D(x)‖² on real data, with D(x) the mean patch logit of an image.

    `real_inputs` must have requires_grad set before D was applied to it; the gradient is built with
    create_graph so that the penalty trains D.
    """
    (gradient,) = torch.autograd.grad(real_logits.float().flatten(1).mean(1).sum(), real_inputs, create_graph=True)
    return gradient.float().pow(2).flatten(1).sum(1).mean()
