import math

import pytest
import torch

from shared.ddpm import GaussianDiffusion, Prediction, discretized_gaussian_log_likelihood, linear_betas


def true_noise_fn(diffusion: GaussianDiffusion, data_point: torch.Tensor):
    """The exact ε-prediction when the data distribution is the single point x*: ε = (x_t − √ᾱ x*) / √(1 − ᾱ),
    at the original-chain step the sampler passes, and v = 0 for the learned variance."""
    def model_fn(x_t, model_time):
        alpha_bar = diffusion.alphas_cumprod[model_time.long()].float().reshape(-1, 1, 1, 1)
        eps = (x_t - alpha_bar.sqrt() * data_point) / (1 - alpha_bar).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], dim=1) if diffusion.learn_sigma else eps
    return model_fn


def test_linear_schedule_endpoints():
    diffusion = GaussianDiffusion.linear(1000)
    assert diffusion.betas[0].item() == pytest.approx(1e-4)
    assert diffusion.betas[-1].item() == pytest.approx(0.02)
    assert diffusion.alphas_cumprod[0].item() == pytest.approx(1 - 1e-4)
    # ᾱ_T ≈ 4e-5: the last step is (almost) pure noise, as in DDPM.
    assert 1e-5 < diffusion.alphas_cumprod[-1].item() < 1e-4
    assert (diffusion.alphas_cumprod.diff() < 0).all()
    # Shorter chains scale β so that the total noise is about the same.
    assert linear_betas(100).sum().item() == pytest.approx(linear_betas(1000).sum().item(), rel=0.02)


def test_q_sample_matches_running_the_chain():
    """q(x_t | x_0) in closed form has the statistics of t one-step transitions x ← √(1 − β) x + √β z."""
    torch.manual_seed(0)
    diffusion = GaussianDiffusion.linear(50)
    x0 = torch.full((20000, 1), 0.7)
    x = x0.clone()
    for beta in diffusion.betas.float():
        x = (1 - beta).sqrt() * x + beta.sqrt() * torch.randn_like(x)
    t = torch.full((20000,), 49)
    closed_form = diffusion.q_sample(x0, t, torch.randn_like(x0))
    assert closed_form.mean().item() == pytest.approx(x.mean().item(), abs=0.03)
    assert closed_form.var().item() == pytest.approx(x.var().item(), rel=0.05)
    assert closed_form.mean().item() == pytest.approx(0.7 * diffusion.alphas_cumprod[-1].sqrt().item(), abs=0.02)


def test_posterior_is_bayes_rule():
    """q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0), a product of two Gaussians in x_{t-1}."""
    torch.manual_seed(0)
    diffusion = GaussianDiffusion.linear(1000)
    x0, x_t = torch.randn(4, 3, 2, 2, dtype=torch.float64), torch.randn(4, 3, 2, 2, dtype=torch.float64)
    t = torch.tensor([1, 10, 500, 999])
    beta = diffusion.betas[t].reshape(-1, 1, 1, 1)
    alpha_bar_prev = diffusion.alphas_cumprod_prev[t].reshape(-1, 1, 1, 1)
    precision = (1 - beta) / beta + 1 / (1 - alpha_bar_prev)
    expected_mean = ((1 - beta).sqrt() / beta * x_t + alpha_bar_prev.sqrt() / (1 - alpha_bar_prev) * x0) / precision
    mean, log_variance = diffusion.q_posterior(x0, x_t, t)
    assert torch.allclose(mean, expected_mean, rtol=1e-9)
    assert torch.allclose(log_variance, -torch.log(precision), rtol=1e-9)


def test_x0_prediction_inverts_q_sample():
    torch.manual_seed(0)
    diffusion = GaussianDiffusion.linear(1000)
    x0, noise = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    t = torch.tensor([0, 400, 900])
    assert torch.allclose(diffusion.predict_x0(diffusion.q_sample(x0, t, noise), t, noise), x0, atol=1e-3)


def test_respacing_keeps_alpha_bar_at_kept_steps():
    diffusion = GaussianDiffusion.linear(1000)
    respaced = diffusion.respace(250)
    kept = respaced.timestep_map
    assert respaced.num_timesteps == 250 and len(kept.unique()) == 250
    assert kept[0] == 0 and kept[-1] == 999
    assert torch.allclose(respaced.alphas_cumprod, diffusion.alphas_cumprod[kept], rtol=1e-12)
    assert torch.equal(respaced.model_time(torch.tensor([0, 249])), torch.tensor([0.0, 999.0]))
    assert torch.allclose(diffusion.respace(1000).betas, diffusion.betas)


def test_learned_range_variance_extremes():
    diffusion = GaussianDiffusion.linear(1000, learn_sigma=True)
    x_t, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([1, 300, 999])
    beta = diffusion.betas[t].float().reshape(-1, 1, 1, 1)
    beta_tilde = diffusion.posterior_variance[t].float().reshape(-1, 1, 1, 1)
    at_max = diffusion.p_mean_variance(torch.cat([eps, torch.ones_like(eps)], 1), x_t, t)
    at_min = diffusion.p_mean_variance(torch.cat([eps, -torch.ones_like(eps)], 1), x_t, t)
    assert torch.allclose(at_max.log_variance.exp(), beta.expand_as(x_t), rtol=1e-5)
    assert torch.allclose(at_min.log_variance.exp(), beta_tilde.expand_as(x_t), rtol=1e-5)
    assert (beta_tilde < beta).all()


def test_discretized_likelihood_is_a_distribution_over_256_levels():
    levels = torch.linspace(-1, 1, 256)
    for mean, log_std in [(0.0, -1.0), (0.93, -4.0), (-1.2, 0.5)]:
        log_p = discretized_gaussian_log_likelihood(levels, torch.full_like(levels, mean),
                                                    torch.full_like(levels, log_std))
        assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-4)


def test_vlb_vanishes_for_the_true_posterior():
    """With ε̂ = ε and Σ = β̃ the model's reverse step is q(x_{t-1} | x_t, x_0): KL = 0."""
    torch.manual_seed(0)
    diffusion = GaussianDiffusion.linear(1000)
    x0, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([1, 200, 999])
    x_t = diffusion.q_sample(x0, t, noise)
    terms = diffusion.hybrid_loss(torch.cat([noise, -torch.ones_like(noise)], 1), x0, x_t, t, noise)
    assert torch.allclose(terms["vb"], torch.zeros(3), atol=1e-4)
    assert torch.allclose(terms["mse"], torch.zeros(3))


def test_hybrid_loss_is_finite_and_vlb_trains_only_the_variance():
    torch.manual_seed(0)
    diffusion = GaussianDiffusion.linear(1000)
    x0, noise = torch.randn(4, 2, 4, 4).clamp(-1, 1), torch.randn(4, 2, 4, 4)
    t = torch.tensor([0, 1, 500, 999])  # t = 0 exercises the discretised decoder likelihood
    x_t = diffusion.q_sample(x0, t, noise)
    output = torch.randn(4, 4, 4, 4, requires_grad=True)
    terms = diffusion.hybrid_loss(output, x0, x_t, t, noise)
    assert all(torch.isfinite(value).all() for value in terms.values())
    terms["loss"].sum().backward()
    assert torch.isfinite(output.grad).all() and output.grad[:, 2:].abs().sum() > 0
    mse_only = output.detach().clone().requires_grad_(True)
    diffusion.hybrid_loss(mse_only, x0, x_t, t, noise)["mse"].sum().backward()
    assert torch.allclose(output.grad[:, :2], mse_only.grad[:, :2])


@pytest.mark.parametrize("steps", [25, 1])  # one step: the chain has no second step to clip β̃ at t = 0 with
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_ancestral_sampler_lands_on_the_single_data_point(learn_sigma, steps):
    torch.manual_seed(0)
    diffusion = GaussianDiffusion.linear(1000, learn_sigma=learn_sigma)
    data_point = torch.randn(1, 2, 4, 4).clamp(-1, 1)
    noise = torch.randn(3, 2, 4, 4)
    sample = diffusion.respace(steps).sample(true_noise_fn(diffusion, data_point), noise)
    assert sample.shape == noise.shape
    assert torch.allclose(sample, data_point.expand_as(sample), atol=1e-4)


def test_clipping_x0_keeps_every_step_on_the_image_range():
    """A data point outside [-1, 1]: the exact ε lands the sampler on it, unless x̂_0 is clipped at every step (Ho
    et al.'s image sampling), when the chain lands on the range's edge instead."""
    torch.manual_seed(0)
    diffusion = GaussianDiffusion.linear(1000, learn_sigma=False)
    data_point = torch.full((1, 2, 4, 4), 3.0)
    noise = torch.randn(2, 2, 4, 4)
    chain = diffusion.respace(25)
    assert torch.allclose(chain.sample(true_noise_fn(diffusion, data_point), noise), data_point.expand(2, -1, -1, -1),
                          atol=1e-3)
    assert torch.allclose(chain.sample(true_noise_fn(diffusion, data_point), noise, clip_x0=True),
                          torch.ones(2, 2, 4, 4), atol=1e-3)
    t, x_t = torch.tensor([500, 500]), noise
    clipped = diffusion.p_mean_variance(true_noise_fn(diffusion, data_point)(x_t, t.float()), x_t, t, clip_x0=True)
    assert clipped.x0.abs().max() <= 1
    torch.testing.assert_close(clipped.mean, diffusion.q_posterior(clipped.x0, x_t, t)[0])


def test_vlb_is_in_bits():
    """The KL of two unit Gaussians one standard deviation apart is ½ nat per dimension = ½ / log 2 bits."""
    diffusion = GaussianDiffusion.linear(1000, learn_sigma=True)
    t = torch.tensor([500])
    x0, x_t = torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)
    true_mean, true_log_variance = diffusion.q_posterior(x0, x_t, t)
    std = (0.5 * true_log_variance).exp()
    shifted = Prediction(mean=true_mean + std, log_variance=true_log_variance, x0=x0)
    assert diffusion.vlb_terms(shifted, x0, x_t, t).item() == pytest.approx(0.5 / math.log(2), rel=1e-4)
