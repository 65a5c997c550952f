"""shared/flow.py: the rectified-flow maths every diffusion part relies on."""
import math

import pytest
import torch

from shared import flow


@pytest.fixture
def pair():
    torch.manual_seed(0)
    return torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)


def test_interpolation_endpoints(pair):
    x0, noise = pair
    assert torch.equal(flow.interpolate(x0, noise, torch.zeros(4)), x0)
    assert torch.equal(flow.interpolate(x0, noise, torch.ones(4)), noise)


def test_velocity_target_is_the_time_derivative(pair):
    x0, noise = pair
    t, h = torch.full((4,), 0.3, dtype=torch.float64), 1e-6
    x0, noise = x0.double(), noise.double()
    finite_difference = (flow.interpolate(x0, noise, t + h) - flow.interpolate(x0, noise, t - h)) / (2 * h)
    torch.testing.assert_close(finite_difference, flow.velocity_target(x0, noise))


def test_true_velocity_recovers_image_and_noise(pair):
    x0, noise = pair
    t = torch.rand(4)
    x_t = flow.interpolate(x0, noise, t)
    v = flow.velocity_target(x0, noise)
    torch.testing.assert_close(flow.x0_from_velocity(x_t, t, v), x0)
    torch.testing.assert_close(flow.noise_from_velocity(x_t, t, v), noise)


def test_reversed_log_grid_values():
    torch.testing.assert_close(flow.time_grid(3), torch.tensor([1.0, 0.913, 0.766, 0.0]), atol=1e-3, rtol=0)
    torch.testing.assert_close(flow.time_grid(2), torch.tensor([1.0, 0.852, 0.0]), atol=1e-3, rtol=0)
    grid = flow.time_grid(7)
    assert grid[0] == 1 and grid[-1] == 0 and bool((grid[1:] < grid[:-1]).all())
    with pytest.raises(ValueError):
        flow.time_grid(0)


def test_gamma_scaling_keeps_unit_variance():
    torch.manual_seed(0)
    gamma = 0.6
    x0, noise = torch.randn(200_000), torch.randn(200_000)
    for t_value in (0.0, 0.1, 0.5, 0.9, 1.0):
        t = torch.full((1,), t_value)
        x_t = flow.interpolate(gamma * x0[None], noise[None], t)
        scaled = flow.input_scale(t, gamma) * x_t
        assert abs(scaled.var().item() - 1.0) < 0.02


def test_euler_with_exact_velocity_lands_on_the_image(pair):
    x0, noise = pair
    velocity = lambda x_t, t: flow.velocity_target(x0, noise)  # noqa: E731  straight path: constant velocity
    for steps in (1, 3):
        torch.testing.assert_close(flow.euler_sample(velocity, noise, flow.time_grid(steps)), x0)


def test_heun_is_second_order():
    # dx/dt = x, x(1) = 1: integrating down to t = 0.01 gives exp(-0.99). Heun's error falls as h², Euler's as h.
    start = torch.ones(1, 1)
    grid = lambda steps: torch.linspace(1.0, 0.01, steps + 1)  # noqa: E731  no t = 0 endpoint: all steps are Heun
    exact = math.exp(-0.99)
    velocity = lambda x, t: x  # noqa: E731
    heun_errors = [abs(flow.heun_sample(velocity, start, grid(n)).item() - exact) for n in (8, 16)]
    euler_errors = [abs(flow.euler_sample(velocity, start, grid(n)).item() - exact) for n in (8, 16)]
    assert heun_errors[0] / heun_errors[1] > 3.5
    assert euler_errors[0] / euler_errors[1] < 2.5
    assert heun_errors[1] < euler_errors[1] / 10


def test_logit_normal_times_lie_in_the_unit_interval_and_centre_on_the_mean():
    generator = torch.Generator().manual_seed(0)
    t = flow.sample_logit_normal(50_000, mean=1.0, std=0.5, generator=generator)
    assert bool(((t > 0) & (t < 1)).all())
    assert abs(torch.logit(t).mean().item() - 1.0) < 0.02
