"""The SDE step and its log-prob, against torch.distributions and hand-computed values."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from policy.sampler import sd3_sigmas, suffix_window
from policy.sde import gaussian_kl, ode_step, sde_step_with_logprob

SIGMAS = sd3_sigmas(10, shift=3.0)


def _random_step(step: int, batch: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    v = torch.randn(batch, 4, 8, 8, generator=g)
    sigma = SIGMAS[step].expand(batch)
    sigma_next = SIGMAS[step + 1].expand(batch)
    return x, v, sigma, sigma_next, g


@pytest.mark.parametrize("step", [0, 1, 4, 8])
@pytest.mark.parametrize("given", ["noise", "prev_sample"])
def test_log_prob_equals_torch_normal(step, given):
    x, v, sigma, sigma_next, g = _random_step(step)
    noise = torch.randn(x.shape, generator=g)
    if given == "noise":
        prev, log_prob, mean, std = sde_step_with_logprob(x, v, sigma, sigma_next, 0.7, noise=noise)
        assert torch.allclose(prev, mean + std.view(-1, 1, 1, 1) * noise)
    else:
        target = x + torch.randn(x.shape, generator=g) * 0.3
        prev, log_prob, mean, std = sde_step_with_logprob(
            x, v, sigma, sigma_next, 0.7, prev_sample=target
        )
        assert torch.equal(prev, target)
    expected = torch.distributions.Normal(mean.double(), std.double().view(-1, 1, 1, 1))
    expected = expected.log_prob(prev.double()).mean(dim=(1, 2, 3))
    assert log_prob.shape == (3,)
    torch.testing.assert_close(log_prob.double(), expected, rtol=1e-5, atol=1e-5)


def test_mean_and_std_by_hand():
    # One element, step 3 of the shift-3 schedule, noise level a = 0.7, in float64.
    s, s_next, a = float(SIGMAS[3]), float(SIGMAS[4]), 0.7
    x, v = 0.3, -1.2
    dt = s_next - s
    std_t = a * math.sqrt(s / (1 - s))
    mean = x * (1 + std_t**2 / (2 * s) * dt) + v * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
    _, _, got_mean, got_std = sde_step_with_logprob(
        torch.full((1, 1, 1, 1), x), torch.full((1, 1, 1, 1), v),
        torch.tensor([s]), torch.tensor([s_next]), a, noise=torch.zeros(1, 1, 1, 1),
    )
    assert got_mean.item() == pytest.approx(mean, rel=1e-6)
    assert got_std.item() == pytest.approx(std_t * math.sqrt(-dt), rel=1e-6)


def test_first_step_uses_sigma_next_in_the_denominator():
    # At sigma == 1, 1 - sigma is 0; the reference code uses sigmas[1] there.
    x, v, sigma, sigma_next, _ = _random_step(0)
    assert float(sigma[0]) == 1.0
    _, log_prob, _, std = sde_step_with_logprob(x, v, sigma, sigma_next, 0.7)
    s1 = float(SIGMAS[1])
    expected = 0.7 * math.sqrt(1.0 / (1.0 - s1)) * math.sqrt(1.0 - s1)
    assert std[0].item() == pytest.approx(expected, rel=1e-6)
    assert torch.isfinite(log_prob).all()


def test_cps_step_by_hand():
    x, v, sigma, sigma_next, g = _random_step(5)
    a = 0.7
    target = torch.randn(x.shape, generator=g)
    _, log_prob, mean, std = sde_step_with_logprob(
        x, v, sigma, sigma_next, a, prev_sample=target, sde_type="cps"
    )
    s, sn = float(SIGMAS[5]), float(SIGMAS[6])
    std_hand = sn * math.sin(a * math.pi / 2)
    mean_hand = (x - s * v) * (1 - sn) + (x + (1 - s) * v) * math.sqrt(sn**2 - std_hand**2)
    torch.testing.assert_close(mean, mean_hand)
    torch.testing.assert_close(std, torch.full((3,), std_hand))
    torch.testing.assert_close(log_prob, -((target - mean_hand) ** 2).mean(dim=(1, 2, 3)))


def test_log_prob_is_a_per_element_mean_not_a_sum():
    # Doubling the number of elements with the same per-element residuals keeps log_prob.
    x, v, sigma, sigma_next, _ = _random_step(2, batch=1)
    _, lp, mean, _ = sde_step_with_logprob(x, v, sigma, sigma_next, 0.7)
    _, lp2, _, _ = sde_step_with_logprob(
        torch.cat([x, x], 1), torch.cat([v, v], 1), sigma, sigma_next, 0.7,
        prev_sample=torch.cat([mean, mean], 1) + 0.0,
    )
    _, lp1, _, _ = sde_step_with_logprob(x, v, sigma, sigma_next, 0.7, prev_sample=mean)
    torch.testing.assert_close(lp1, lp2)


def test_bad_arguments_raise():
    x, v, sigma, sigma_next, _ = _random_step(1)
    with pytest.raises(ValueError, match="noise_level"):
        sde_step_with_logprob(x, v, sigma, sigma_next, 0.0)
    with pytest.raises(ValueError, match="sde_type"):
        sde_step_with_logprob(x, v, sigma, sigma_next, 0.7, sde_type="ddim")
    with pytest.raises(ValueError, match="velocity"):
        sde_step_with_logprob(x, v[:, :2], sigma, sigma_next, 0.7)


def test_ode_step_is_the_zero_noise_mean():
    x, v, sigma, sigma_next, _ = _random_step(3)
    torch.testing.assert_close(ode_step(x, v, sigma, sigma_next), x + v * (SIGMAS[4] - SIGMAS[3]))


def test_kl_forms():
    g = torch.Generator().manual_seed(1)
    mean, mean_ref = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    std, dt = torch.tensor([0.2, 0.1]), torch.tensor([-0.05, -0.05])
    exact = gaussian_kl(mean, mean_ref, std, dt, form="exact")
    torch.testing.assert_close(exact, ((mean - mean_ref) ** 2).mean((1, 2, 3)) / (2 * std**2))
    flow = gaussian_kl(mean, mean_ref, std, dt, form="flow_grpo")
    torch.testing.assert_close(flow, exact * 0.05)
    cps = gaussian_kl(mean, mean_ref, std, dt, form="flow_grpo", sde_type="cps")
    torch.testing.assert_close(cps, exact)
    assert torch.all(gaussian_kl(mean, mean, std, dt) == 0)
    with pytest.raises(ValueError, match="KL form"):
        gaussian_kl(mean, mean_ref, std, dt, form="reverse")


@pytest.mark.parametrize("steps", [1, 10, 40])
def test_sigmas_match_the_diffusers_scheduler(steps):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(steps)
    torch.testing.assert_close(sd3_sigmas(steps, 3.0), scheduler.sigmas.float(), atol=1e-6, rtol=0)


def test_suffix_window():
    assert suffix_window(9, 0.5) == (4, 9)  # docs/design.md: 5 probe/trained steps of 9
    assert suffix_window(9, 0.6) == (3, 9)
    assert suffix_window(9, 1.0) == (0, 9)
    assert suffix_window(3, 0.01) == (2, 3)
    with pytest.raises(ValueError, match="fraction"):
        suffix_window(9, 0.0)
