import pytest
import torch
from torch import nn

from shared.errors import ConfigError
from stage2_ldm.dit import build_dit
from stage2_ldm.objective import DDPMObjective, FlowObjective, build_objective
from tests.helpers import load_config


def tiny_config(objective: str):
    cfg = load_config(["ldm=dit_tiny"]).ldm
    cfg.objective = objective
    cfg.learn_sigma = objective == "ddpm"
    return cfg


def tiny_setup(objective: str):
    torch.manual_seed(0)
    cfg = tiny_config(objective)
    return build_dit(cfg, in_channels=4, input_size=8, num_classes=10), build_objective(cfg)


class ForwardOnly(nn.Module):
    """Stands for a DDP / DeepSpeed wrapper: the objective may only call it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.module = model

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


class SinglePointModel(nn.Module):
    """The exact prediction for data that is the single point x*, in the DiT's time units (DDPM steps, 1000 · t),
    recording whether guidance was asked for."""

    def __init__(self, data_point: torch.Tensor, objective):
        super().__init__()
        self.data_point = data_point
        self.objective = objective
        self.guidance_scales = []

    def forward(self, x, t, y):
        if isinstance(self.objective, FlowObjective):
            return (x - self.data_point) / (t / 1000).reshape(-1, 1, 1, 1)  # v = (x_t − x*) / t
        alpha_bar = self.objective.diffusion.alphas_cumprod[t.long()].float().reshape(-1, 1, 1, 1)
        eps = (x - alpha_bar.sqrt() * self.data_point) / (1 - alpha_bar).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)

    def forward_with_cfg(self, x, t, y, cfg_scale):
        self.guidance_scales.append(cfg_scale)
        return self(x, t, y)


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_loss_is_finite_differentiable_and_logs_are_detached(objective):
    model, objective_fn = tiny_setup(objective)
    x0, labels = torch.randn(6, 4, 8, 8), torch.randint(0, 10, (6,))
    loss, logs = objective_fn.loss(ForwardOnly(model), x0, labels)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0
    assert all(not value.requires_grad and torch.isfinite(value) for value in logs.values())
    assert "loss" in logs and ("vb" in logs) == (objective == "ddpm")


def test_flow_loss_is_velocity_mse():
    """A model that always predicts zero has loss E‖ε − x0‖² = 2 for unit-variance independent x0 and ε."""
    torch.manual_seed(0)
    zero_model = lambda x, t, y: torch.zeros_like(x)  # noqa: E731
    loss, _ = FlowObjective("uniform").loss(zero_model, torch.randn(64, 4, 8, 8), torch.zeros(64, dtype=torch.long))
    assert loss.item() == pytest.approx(2.0, rel=0.03)


@pytest.mark.parametrize("t_sampling", ["logit_normal", "uniform"])
def test_flow_time_sampling(t_sampling):
    torch.manual_seed(0)
    t = FlowObjective(t_sampling, logit_mean=0.5, logit_std=1.0).sample_time(20000, torch.device("cpu"))
    assert ((t > 0) & (t < 1)).all()
    if t_sampling == "logit_normal":
        assert torch.logit(t).mean().item() == pytest.approx(0.5, abs=0.03)
    else:
        assert t.mean().item() == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("objective,sampler,steps", [("ddpm", None, 5), ("flow", "euler", 3), ("flow", "heun", 3)])
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_samplers_return_latent_shapes(objective, sampler, steps, cfg_scale):
    model, objective_fn = tiny_setup(objective)
    noise, labels = torch.randn(2, 4, 8, 8), torch.tensor([3, 7])
    sample = objective_fn.sample(model.eval(), noise, labels, cfg_scale=cfg_scale, sampler=sampler, steps=steps)
    assert sample.shape == noise.shape and torch.isfinite(sample).all()


@pytest.mark.parametrize("objective,sampler,steps", [("ddpm", "ddpm", 20), ("flow", "euler", 4), ("flow", "heun", 4)])
@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_samplers_land_on_the_single_data_point(objective, sampler, steps, cfg_scale):
    torch.manual_seed(0)
    objective_fn = build_objective(tiny_config(objective))
    data_point = torch.randn(1, 4, 8, 8)
    model = SinglePointModel(data_point, objective_fn)
    noise, labels = torch.randn(3, 4, 8, 8), torch.tensor([0, 1, 2])
    sample = objective_fn.sample(model, noise, labels, cfg_scale=cfg_scale, sampler=sampler, steps=steps)
    assert torch.allclose(sample, data_point.expand_as(sample), atol=1e-4)
    assert set(model.guidance_scales) == (set() if cfg_scale == 1 else {cfg_scale})


def test_ddpm_default_is_250_respaced_steps():
    calls = []

    def model(x, t, y):
        calls.append(t[0].item())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    DDPMObjective().sample(model, torch.randn(1, 4, 2, 2), torch.zeros(1, dtype=torch.long), cfg_scale=1.0)
    assert len(calls) == 250 and calls[0] == 999 and calls[-1] == 0


@pytest.mark.parametrize("objective,sampler", [("ddpm", "euler"), ("ddpm", "heun"), ("flow", "ddpm"), ("flow", "rk4")])
def test_sampler_that_does_not_fit_is_a_config_error(objective, sampler):
    objective_fn = build_objective(tiny_config(objective))
    with pytest.raises(ConfigError, match="sample.sampler"):
        objective_fn.sample(nn.Identity(), torch.randn(1, 4, 8, 8), torch.zeros(1, dtype=torch.long),
                            cfg_scale=1.0, sampler=sampler)


@pytest.mark.parametrize("objective,steps", [("ddpm", 0), ("ddpm", 1001), ("flow", 0)])
def test_bad_step_count_is_a_config_error(objective, steps):
    objective_fn = build_objective(tiny_config(objective))
    with pytest.raises(ConfigError, match="sample.steps"):
        objective_fn.sample(nn.Identity(), torch.randn(1, 4, 8, 8), torch.zeros(1, dtype=torch.long),
                            cfg_scale=1.0, steps=steps)


def test_build_objective_config_errors():
    cfg = tiny_config("flow")
    cfg.learn_sigma = True
    with pytest.raises(ConfigError, match="ldm.learn_sigma"):
        build_objective(cfg)
    cfg = tiny_config("flow")
    cfg.flow.t_sampling = "beta"
    with pytest.raises(ConfigError, match="ldm.flow.t_sampling"):
        build_objective(cfg)
    cfg.objective = "edm"
    with pytest.raises(ConfigError, match="ldm.objective"):
        build_objective(cfg)
