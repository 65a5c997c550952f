"""stage=sample's samplers and their options (stage2_ldm/objective.py, shared/flow.py, shared/ddpm.py): convergence
on a Gaussian whose exact model is known, DDIM, SiT's SDE, the timestep shift and the guidance interval."""
import pytest
import torch
from torch import nn

from shared import flow
from shared.ddpm import GaussianDiffusion
from shared.errors import ConfigError
from stage2_ldm.objective import DDPMObjective, FlowObjective

# The data: independent N(μ_d, σ_d²) in three dimensions; the exact "networks" below know it.
DATA_MEAN = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
DATA_STD = torch.tensor([0.7, 1.0, 1.4], dtype=torch.float64)
SAMPLES = 20_000


def exact_velocity(x: torch.Tensor, model_time: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """E[ε − x0 | x_t] for x_t = a x0 + t ε, a = 1 − t: x_t ~ N(a μ, V), V = a² σ² + t², and the regression of
    ε − x0 on x_t has slope (t − a σ²) / V. Time in the DiT's units, 1000 t."""
    t = (model_time.double() / 1000).reshape(-1, 1)
    a = 1 - t
    variance = a**2 * DATA_STD**2 + t**2
    return (t - a * DATA_STD**2) * (x - a * DATA_MEAN) / variance - DATA_MEAN


def exact_noise(diffusion: GaussianDiffusion):
    """E[ε | x_t] for x_t = √ᾱ x0 + √(1 − ᾱ) ε: √(1 − ᾱ) (x_t − √ᾱ μ) / (ᾱ σ² + 1 − ᾱ), at the DDPM step given."""
    def model(x: torch.Tensor, model_time: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        alpha_bar = diffusion.alphas_cumprod[model_time.long()].reshape(-1, 1)
        return (1 - alpha_bar).sqrt() * (x - alpha_bar.sqrt() * DATA_MEAN) / (alpha_bar * DATA_STD**2 + 1 - alpha_bar)
    return model


def toy_error(objective, sampler: str, steps: int, **options) -> float:
    """The larger of the sample mean's error (in data standard deviations) and the sample variance's relative
    error, worst over the dimensions, for SAMPLES samples from fixed noise."""
    torch.manual_seed(0)
    noise = torch.randn(SAMPLES, 3, dtype=torch.float64)
    model = exact_velocity if isinstance(objective, FlowObjective) else exact_noise(objective.diffusion)
    x = objective.sample(model, noise, torch.zeros(SAMPLES, dtype=torch.long), cfg_scale=1.0, sampler=sampler,
                         steps=steps, **options)
    mean_error = ((x.mean(0) - DATA_MEAN) / DATA_STD).abs().max()
    variance_error = (x.var(0) / DATA_STD**2 - 1).abs().max()
    return max(mean_error.item(), variance_error.item())


@pytest.mark.parametrize(("objective", "sampler", "options"), [
    ("ddpm", "ddpm", {}), ("ddpm", "ddim", {"ddim_eta": 0.0}), ("ddpm", "ddim", {"ddim_eta": 0.5}),
    ("flow", "euler", {}), ("flow", "heun", {}), ("flow", "sde", {}), ("flow", "euler", {"timestep_shift": 3.0}),
], ids=["ddpm", "ddim-eta0", "ddim-eta0.5", "euler", "heun", "sde", "euler-shift3"])
def test_samplers_converge_to_the_gaussian_data_as_steps_grow(objective, sampler, options):
    objective = DDPMObjective(learn_sigma=False) if objective == "ddpm" else FlowObjective()
    few, many = toy_error(objective, sampler, 4, **options), toy_error(objective, sampler, 250, **options)
    # 20k samples leave about 0.01 of sampling error in the variance; 4 steps miss by 0.1 to 1.
    assert many < 0.05 and few > 2 * many


def test_ddim_with_eta_one_is_the_ancestral_sampler_with_the_posterior_variance():
    """σ_t = √β̃_t makes DDIM's step the posterior q(x_{t-1} | x_t, x̂0), which is the ancestral step whose
    learned variance sits at the β̃ end (v = −1): the same samples from the same random draws."""
    diffusion = GaussianDiffusion.linear(1000, learn_sigma=True).respace(20)
    noise_model = exact_noise(GaussianDiffusion.linear(1000))

    def model_fn(x, model_time):
        return torch.cat([noise_model(x, model_time, None), -torch.ones_like(x)], dim=1)

    noise = torch.randn(500, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    ddim = diffusion.ddim_sample(model_fn, noise, eta=1.0)
    torch.manual_seed(1)
    ancestral = diffusion.sample(model_fn, noise)
    torch.testing.assert_close(ddim, ancestral, rtol=1e-9, atol=1e-9)


def test_ddim_without_noise_is_deterministic_and_lands_on_a_single_data_point():
    diffusion = GaussianDiffusion.linear(1000, learn_sigma=False)
    point = torch.tensor([[0.3, -1.2, 2.0]], dtype=torch.float64)

    def model_fn(x, model_time):  # exact ε when the data is the single point
        alpha_bar = diffusion.alphas_cumprod[model_time.long()].reshape(-1, 1)
        return (x - alpha_bar.sqrt() * point) / (1 - alpha_bar).sqrt()

    noise = torch.randn(8, 3, dtype=torch.float64)
    first = diffusion.respace(10).ddim_sample(model_fn, noise, eta=0.0)
    torch.testing.assert_close(first, point.expand_as(first))
    assert torch.equal(first, diffusion.respace(10).ddim_sample(model_fn, noise, eta=0.0))


# ---------------------------------------------------------------------------------------------- time grids
def test_timestep_shift_keeps_the_end_points_and_order_and_moves_times_towards_noise():
    grid = flow.time_grid(10, "uniform")
    shifted = flow.shift_time(grid, 3.0)
    assert shifted[0] == 1 and shifted[-1] == 0 and bool((shifted[1:] < shifted[:-1]).all())
    assert bool((shifted[1:-1] > grid[1:-1]).all())
    assert flow.shift_time(torch.tensor([0.5]), 3.0).item() == pytest.approx(0.75)  # 1.5 / (1 + 2 · 0.5)
    assert flow.shift_time(torch.tensor([0.5]), 1 / 3).item() == pytest.approx(0.25)  # the inverse shift
    assert torch.equal(flow.shift_time(grid, 1.0), grid)  # 1: today's uniform grid, bit for bit


def test_sde_grid_is_sits_uniform_grid_then_the_last_step():
    torch.testing.assert_close(flow.sde_grid(3), torch.tensor([1.0, 0.52, 0.04, 0.0]))
    assert len(flow.sde_grid(50)) == 51 and flow.sde_grid(50)[-2].item() == pytest.approx(flow.SDE_LAST_STEP)


def test_sde_sampler_calls_the_model_once_per_step_and_its_last_step_adds_no_noise():
    times = []

    def velocity(x, t):
        times.append(t[0].item())
        return torch.zeros_like(x)

    grid = flow.sde_grid(5)
    flow.sde_sample(velocity, torch.randn(4, 3), grid)
    assert times == pytest.approx(grid[:-1].tolist())
    # From t = 0.04 with v̂ = 0, so that ε̂ = x: x − 0.04 x, the same whatever the random state.
    x = torch.randn(4, 3)
    torch.testing.assert_close(flow.sde_sample(velocity, x, torch.tensor([0.04, 0.0])), 0.96 * x)


# ---------------------------------------------------------------------------------------------- guidance interval
class VisibleGuidance(nn.Module):
    """Conditional output 1, unconditional 0, so guided = s; records the times (in [0, 1]) of each kind of call."""

    def __init__(self):
        super().__init__()
        self.conditional_times, self.guided_times = [], []

    def forward(self, x, model_time, labels):
        self.conditional_times.append(model_time[0].item() / 1000)
        return torch.ones_like(x)

    def forward_with_cfg(self, x, model_time, labels, cfg_scale):
        self.guided_times.append(model_time[0].item() / 1000)
        return torch.full_like(x, cfg_scale)


SAMPLERS = [("ddpm", "ddpm"), ("ddpm", "ddim"), ("flow", "euler"), ("flow", "heun"), ("flow", "sde")]


def draw(objective: str, sampler: str, model: nn.Module, steps: int, **options) -> torch.Tensor:
    objective_fn = DDPMObjective(learn_sigma=False) if objective == "ddpm" else FlowObjective()
    torch.manual_seed(0)
    noise = torch.randn(2, 3)
    return objective_fn.sample(model, noise, torch.zeros(2, dtype=torch.long), sampler=sampler, steps=steps,
                               **options)


@pytest.mark.parametrize(("objective", "sampler"), SAMPLERS)
def test_guidance_applies_exactly_inside_its_interval(objective, sampler):
    model = VisibleGuidance()
    draw(objective, sampler, model, 6, cfg_scale=2.0, cfg_interval=[0.3, 0.7])
    times = model.conditional_times + model.guided_times
    assert model.guided_times and model.conditional_times
    assert sorted(model.guided_times) == sorted(t for t in times if 0.3 <= t <= 0.7)


@pytest.mark.parametrize(("objective", "sampler"), SAMPLERS)
def test_a_step_outside_the_interval_is_the_unguided_step_and_one_inside_is_guided(objective, sampler):
    """Two steps (t = 1 and one more; DDPM t = 0.999 and 0): guided over [0.9, 1] and over none of them."""
    unguided = draw(objective, sampler, VisibleGuidance(), 2, cfg_scale=1.0)
    guided_everywhere = draw(objective, sampler, VisibleGuidance(), 2, cfg_scale=3.0)
    outside = draw(objective, sampler, VisibleGuidance(), 2, cfg_scale=3.0, cfg_interval=[0.2, 0.3])
    first_step_only = draw(objective, sampler, VisibleGuidance(), 2, cfg_scale=3.0, cfg_interval=[0.9, 1.0])
    assert torch.equal(outside, unguided)
    assert not torch.allclose(first_step_only, unguided) and not torch.allclose(first_step_only, guided_everywhere)
    assert torch.equal(draw(objective, sampler, VisibleGuidance(), 2, cfg_scale=3.0, cfg_interval=[0.0, 1.0]),
                       guided_everywhere)


@pytest.mark.parametrize("interval", [[0.5, 0.2], [-0.1, 0.5], [0.1, 0.2, 0.3]])
def test_an_interval_that_is_not_one_is_a_config_error(interval):
    with pytest.raises(ConfigError, match="sample.cfg_interval"):
        draw("flow", "euler", VisibleGuidance(), 2, cfg_scale=2.0, cfg_interval=interval)


@pytest.mark.parametrize(("objective", "sampler", "options", "key"), [
    ("ddpm", "ddpm", {"timestep_shift": 3.0}, "sample.timestep_shift"),
    ("ddpm", "ddpm", {"ddim_eta": 0.5}, "sample.ddim_eta"),
    ("flow", "euler", {"ddim_eta": 0.5}, "sample.ddim_eta"),
    ("flow", "sde", {"steps": 1}, "sample.steps"),
])
def test_an_option_the_sampler_has_no_use_for_is_a_config_error(objective, sampler, options, key):
    steps = options.pop("steps", 4)
    with pytest.raises(ConfigError, match=key):
        draw(objective, sampler, VisibleGuidance(), steps, cfg_scale=1.0, **options)
