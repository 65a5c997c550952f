"""Stage-1 losses and objectives: each term's definition, finiteness and where its gradients go."""
import pytest
import torch
from omegaconf import OmegaConf

from shared.errors import ConfigError
from stage1_tokenizer import losses
from stage1_tokenizer.discriminator import build_discriminator
from stage1_tokenizer.encoder import DiagonalGaussian
from stage1_tokenizer.objective import TokenizerObjective, build_objective
from stage1_tokenizer.tokenizer import build_tokenizer
from tests.helpers import load_config


class PixelDistance(torch.nn.Module):
    """A differentiable stand-in for LPIPS with the same call: (B,) distances."""

    def forward(self, x, y):
        return (x - y).pow(2).flatten(1).mean(1)


def tiny_objective(name: str, **loss_overrides) -> TokenizerObjective:
    """The tiny tokenizer of `name` as after some training: its zero-initialised velocity output layer (which
    blocks every gradient into the latent at step 0) is made non-zero."""
    cfg = OmegaConf.to_container(load_config([f"tokenizer={name}"]).tokenizer)
    cfg["loss"].update(loss_overrides)
    torch.manual_seed(0)
    tokenizer = build_tokenizer(cfg)
    denoiser = getattr(tokenizer.decoder, "denoiser", tokenizer.decoder)
    torch.nn.init.normal_(denoiser.conv_out.weight, std=0.05)
    return TokenizerObjective(tokenizer, build_discriminator(cfg), PixelDistance(), cfg["loss"], cfg["flow"])


def images(batch: int = 4, size: int = 32) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_r1_penalty_matches_the_analytic_gradient():
    # D(x) = Σ_c x² per pixel: the mean patch logit is Σ x² / (H W), its gradient 2 x / (H W).
    x = torch.randn(3, 2, 4, 5, requires_grad=True)
    logits = x.pow(2).sum(1, keepdim=True)
    expected = (2 * x.detach() / 20).pow(2).flatten(1).sum(1).mean()
    penalty = losses.r1_penalty(logits, x)
    torch.testing.assert_close(penalty, expected)
    (weight,) = torch.autograd.grad(penalty, x)  # create_graph: the penalty itself is differentiable
    torch.testing.assert_close(weight, 8 * x.detach() / 400 / 3)


def test_gan_losses_are_the_non_saturating_forms():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    torch.testing.assert_close(losses.generator_adv_loss(fake), -torch.log(torch.sigmoid(fake)).mean())
    torch.testing.assert_close(losses.discriminator_loss(real, fake),
                               -torch.log(torch.sigmoid(real)).mean() - torch.log(1 - torch.sigmoid(fake)).mean())


def test_pixel_and_kl_losses():
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(losses.reconstruction_loss(a, b, "l1"), (a - b).abs().mean())
    torch.testing.assert_close(losses.reconstruction_loss(a, b, "l2"), (a - b).pow(2).mean())
    torch.testing.assert_close(losses.velocity_loss(a, b), (a - b).pow(2).mean())
    with pytest.raises(ConfigError, match="reconstruction_kind"):
        losses.reconstruction_loss(a, b, "huber")
    posterior = DiagonalGaussian(torch.randn(2, 8, 3, 3))
    torch.testing.assert_close(losses.kl_loss(posterior), posterior.kl().mean() / (4 * 3 * 3))


def test_perceptual_loss_with_the_real_lpips():
    from shared.metrics.lpips import LPIPS

    lpips = LPIPS("alex")
    x = images(2)
    estimate = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    distance = losses.perceptual_loss(lpips, estimate, x)
    assert distance > losses.perceptual_loss(lpips, x, x) == 0
    distance.backward()
    assert estimate.grad.abs().sum() > 0


def grad_norm(module) -> float:
    return sum(p.grad.abs().sum().item() for p in module.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", ["epsvae_tiny", "vae_tiny"])
def test_gan_objectives_train_every_part(name):
    objective = tiny_objective(name, disc_start=0, kl=0.0)
    x = images()
    total, logs = objective.generator_loss(x, step=0)
    expected_terms = {"lpips", "adversarial", "velocity" if name == "epsvae_tiny" else "reconstruction"}
    assert {key.split("/")[1] for key in logs} == expected_terms | {"total"}
    assert all(torch.isfinite(value) and not value.requires_grad for value in logs.values())
    total.backward()
    tokenizer = objective.tokenizer
    assert grad_norm(tokenizer.encoder) > 0 and grad_norm(tokenizer.decoder) > 0
    objective.discriminator.zero_grad()
    disc_total, disc_logs = objective.discriminator_loss(x, step=0)
    assert torch.isfinite(disc_total) and disc_logs["disc/r1"] > 0
    tokenizer.zero_grad()
    disc_total.backward()
    assert grad_norm(objective.discriminator) > 0
    assert grad_norm(tokenizer) == 0  # D's loss does not reach the tokenizer


def test_adversarial_terms_wait_for_disc_start():
    objective = tiny_objective("epsvae_tiny", disc_start=10)
    x = images()
    _, logs = objective.generator_loss(x, step=9)
    assert "loss/adversarial" not in logs
    assert objective.discriminator_loss(x, step=9) is None
    _, logs = objective.generator_loss(x, step=10)
    assert "loss/adversarial" in logs and objective.discriminator_loss(x, step=10) is not None


def test_total_is_the_weighted_sum_of_the_terms():
    objective = tiny_objective("epsvae_tiny", disc_start=0, velocity=2.0, lpips=0.25, adversarial=0.5, kl=1e-3)
    total, logs = objective.generator_loss(images(), step=0)
    weights = {"velocity": 2.0, "lpips": 0.25, "adversarial": 0.5, "kl": 1e-3}
    torch.testing.assert_close(total.detach(), sum(w * logs[f"loss/{k}"] for k, w in weights.items()))


def test_discriminator_sees_time_and_noisy_input_for_epsvae():
    objective = tiny_objective("epsvae_tiny", disc_start=0)
    seen = []
    objective.discriminator.register_forward_hook(lambda module, args, out: seen.append(args))
    x = images()
    objective.generator_loss(x, step=0)
    objective.discriminator_loss(x, step=0)
    (fake, x_t, t), (real, real_x_t, real_t), (fake_again, *_) = seen
    assert torch.equal(real, x) and torch.equal(x_t, real_x_t) and torch.equal(t, real_t)
    assert torch.equal(fake.detach(), fake_again)  # the generator step's estimate, reused
    assert not torch.allclose(x_t, x)  # the pair is (image, noisy input), not the image twice


def test_discriminator_loss_recomputes_for_new_images():
    objective = tiny_objective("vae_tiny", disc_start=0)
    objective.generator_loss(images(), step=0)
    other = images() * 0.5
    total, _ = objective.discriminator_loss(other, step=0)
    assert torch.isfinite(total)


def test_dgae_is_gan_free_and_trains_its_feature_decoder():
    objective = tiny_objective("dgae_tiny", kl=0.0)
    assert objective.discriminator is None
    total, logs = objective.generator_loss(images(), step=10**6)
    assert set(logs) == {"loss/velocity", "loss/lpips", "loss/total"}
    total.backward()
    decoder = objective.tokenizer.decoder
    assert grad_norm(decoder.feature_decoder) > 0 and grad_norm(decoder.denoiser) > 0
    assert grad_norm(objective.tokenizer.encoder) > 0
    assert objective.discriminator_loss(images(), step=10**6) is None
    cfg = OmegaConf.to_container(load_config(["tokenizer=dgae_tiny"]).tokenizer)
    cfg["loss"]["adversarial"] = 0.5
    with pytest.raises(ConfigError, match="GAN"):
        build_objective(cfg)


def test_build_objective_uses_the_configured_lpips():
    objective = build_objective(load_config(["tokenizer=epsvae_tiny"]).tokenizer)
    assert type(objective.lpips).__name__ == "LPIPS"
    total, _ = objective.generator_loss(images(2), step=0)
    assert torch.isfinite(total)


def test_unknown_loss_keys_are_config_errors():
    cfg = OmegaConf.to_container(load_config(["tokenizer=epsvae_tiny"]).tokenizer)
    cfg["loss"]["perceptual"] = 1.0
    with pytest.raises(ConfigError, match="tokenizer.loss"):
        build_objective(cfg)


def test_velocity_target_uses_the_gamma_scaled_image():
    """With G predicting exactly ε − γ x0 the velocity loss is zero and x̂0 is the image."""
    objective = tiny_objective("epsvae_tiny", lpips=0.0, kl=0.0, adversarial=0.0)
    tokenizer = objective.tokenizer
    x = images(2)
    captured = {}

    def exact_velocity(x_t, t, condition):  # recover ε from the network input, then form the target
        x_t = x_t / tokenizer.network_input(torch.ones_like(x_t), t)
        noise = (x_t - (1 - t.view(-1, 1, 1, 1)) * tokenizer.gamma * x) / t.view(-1, 1, 1, 1)
        captured["estimate"] = tokenizer.estimate_image(x_t, t, noise - tokenizer.gamma * x)
        return noise - tokenizer.gamma * x

    tokenizer.decoder.forward = exact_velocity
    total, logs = objective.generator_loss(x, step=0)
    assert logs["loss/velocity"] < 1e-8
    torch.testing.assert_close(captured["estimate"], x, atol=1e-4, rtol=0)
