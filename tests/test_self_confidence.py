"""SOLACE's self-confidence reward on plain velocity functions (no pipeline needed)."""

import math

import pytest
import torch

from policy.sampler import sd3_sigmas
from rewards.self_confidence import aggregate, antithetic_probes, self_confidence

SIGMAS = sd3_sigmas(10)
SHAPE = (4, 8, 8)


def _z0(batch=6, seed=0):
    return torch.randn(batch, *SHAPE, generator=torch.Generator().manual_seed(seed))


class Recorder:
    """A velocity function that records its inputs and returns a fixed map of them."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, z_t, sigma, cond):
        self.calls.append((z_t.clone(), sigma.clone(), cond))
        return self.fn(z_t, sigma, cond)


def _toy_model():
    # A per-sample deterministic "model": a fixed conv of z_t plus a conditioning bias.
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    torch.nn.init.normal_(conv.weight, std=0.1, generator=torch.Generator().manual_seed(3))

    def fn(z_t, sigma, cond):
        with torch.no_grad():
            return conv(z_t) * sigma.view(-1, 1, 1, 1) + cond.view(-1, 1, 1, 1)

    return fn


def test_antithetic_probes_cancel():
    eps = antithetic_probes(8, SHAPE, torch.Generator().manual_seed(0))
    assert eps.shape == (8, *SHAPE)
    assert torch.equal(eps[4:], -eps[:4])
    assert torch.equal(eps[:4] + eps[4:], torch.zeros(4, *SHAPE))  # each pair cancels exactly
    torch.testing.assert_close(eps.sum(0), torch.zeros(SHAPE), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="even"):
        antithetic_probes(7, SHAPE)


def test_probe_inputs_average_to_the_clean_interpolant():
    z0 = _z0()
    rec = Recorder(lambda z, s, c: torch.zeros_like(z))
    out = self_confidence(rec, z0, SIGMAS, None, num_probes=8, probe_window=(4, 6),
                          generator=torch.Generator().manual_seed(0))
    assert out.probe_steps == (4, 5) and len(rec.calls) == 2
    for (z_t, sigma, _), j in zip(rec.calls, (4, 5), strict=True):
        t = SIGMAS[j]
        assert z_t.shape == (8 * 6, *SHAPE)  # one batched forward of K*B
        assert torch.all(sigma == t)
        # Antithetic pairs cancel: the mean over probes is (1 - t) z0.
        torch.testing.assert_close(z_t.view(8, 6, *SHAPE).mean(0), (1 - t) * z0)


def test_zero_velocity_mse_by_hand():
    z0 = _z0(batch=2)
    out = self_confidence(lambda z, s, c: torch.zeros_like(z), z0, SIGMAS, None, num_probes=4,
                          probe_window=(7, 8), generator=torch.Generator().manual_seed(5))
    eps = antithetic_probes(4, SHAPE, torch.Generator().manual_seed(5))
    # eps_hat = 0 + z0, so MSE = mean_m mean (z0 - eps_m)^2.
    mse = ((z0[None] - eps[:, None]) ** 2).mean(dim=(2, 3, 4)).mean(0)
    torch.testing.assert_close(out.mse[:, 0], mse)
    torch.testing.assert_close(out.per_step[:, 0], -torch.log(mse + 1e-6))
    torch.testing.assert_close(out.reward, -torch.log(mse + 1e-6))  # paper, one step


def test_oracle_velocity_beats_any_model():
    z0 = _z0()

    def oracle(z_t, sigma, cond):
        # Knows z0, so it recovers the probe exactly: v = eps - z0 with eps from z_t.
        t = sigma.view(-1, 1, 1, 1)
        x0 = z0.repeat(len(z_t) // len(z0), 1, 1, 1)
        return (z_t - (1 - t) * x0) / t - x0

    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    best = self_confidence(oracle, z0, SIGMAS, None, generator=gen())
    assert torch.all(best.reward > -math.log(1e-6) - 0.1)  # MSE ~ 0: S ~ -log(delta)
    for model in (lambda z, s, c: torch.zeros_like(z), lambda z, s, c: -z0.repeat(8, 1, 1, 1),
                  _toy_model()):
        got = self_confidence(model, z0, SIGMAS, torch.zeros(len(z0)), generator=gen())
        assert torch.all(got.reward < best.reward)


def test_one_call_or_two_halves_give_identical_official_rewards():
    z0 = _z0(batch=8)
    cond = torch.linspace(-1, 1, 8)
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    fn = _toy_model()
    gen = lambda: torch.Generator().manual_seed(11)  # noqa: E731
    whole = self_confidence(fn, z0, SIGMAS, cond, aggregation="official", group_ids=groups,
                            generator=gen())
    # Split each group across two calls: rows {0,1,4,5} then {2,3,6,7}.
    a, b = torch.tensor([0, 1, 4, 5]), torch.tensor([2, 3, 6, 7])
    half_a = self_confidence(fn, z0[a], SIGMAS, cond[a], generator=gen())
    half_b = self_confidence(fn, z0[b], SIGMAS, cond[b], generator=gen())
    per_step = torch.empty_like(whole.per_step)
    per_step[a], per_step[b] = half_a.per_step, half_b.per_step
    torch.testing.assert_close(per_step, whole.per_step, atol=1e-6, rtol=0)
    merged = aggregate(per_step, whole.probe_sigmas, "official", groups)
    torch.testing.assert_close(merged, whole.reward, atol=1e-5, rtol=0)
    # The official aggregate is group-relative: each group's rewards sum to ~0.
    for g in (0, 1):
        assert whole.reward[groups == g].sum().abs() < 1e-5


def test_aggregations_by_hand():
    per_step = torch.tensor([[1.0, 4.0], [3.0, 2.0], [5.0, 0.0]])
    t = torch.tensor([0.5, 0.25])
    torch.testing.assert_close(aggregate(per_step, t, "paper"), torch.tensor([2.5, 2.5, 2.5]))
    w = torch.tensor([3.0, 1.0])
    torch.testing.assert_close(aggregate(per_step, t, "paper", weights=w),
                               torch.tensor([7 / 4, 11 / 4, 15 / 4]))
    # Column 0: mean 3, pop std sqrt(8/3); column 1: mean 2, pop std sqrt(8/3).
    s = math.sqrt(8 / 3) + 1e-6
    z = torch.tensor([[-2 / s, 2 / s], [0.0, 0.0], [2 / s, -2 / s]])
    expected = (z * torch.tensor([0.25, 0.1875])).mean(1)
    torch.testing.assert_close(aggregate(per_step, t, "official"), expected)
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(per_step, t, "median")


def test_default_window_is_the_suffix_and_bad_window_raises():
    out = self_confidence(lambda z, s, c: torch.zeros_like(z), _z0(2), SIGMAS, None,
                          generator=torch.Generator().manual_seed(0))
    assert out.probe_steps == (4, 5, 6, 7, 8) and out.per_step.shape == (2, 5)
    with pytest.raises(ValueError, match="probe_window"):
        self_confidence(lambda z, s, c: z, _z0(2), SIGMAS, None, probe_window=(5, 11))
