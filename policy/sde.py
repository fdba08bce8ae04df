"""Stochastic flow-matching step with its Gaussian log-probability (Flow-GRPO).

SD3 conventions (diffusers): ``x_s = (1 - s) x0 + s eps``, velocity ``v = eps - x0``,
sigmas run from 1 to 0 and ``dt = s_next - s < 0``.

Two step types, as in docs/design.md section 4:

* ``"sde"``: the Euler-Maruyama discretisation of the reverse SDE whose marginals
  match the flow ODE (Flow-GRPO). ``std_t = a sqrt(s / (1 - s'))`` with ``s' = s``,
  except ``s' = sigma_next`` at ``s == 1`` (where ``1 - s`` is zero). On the first step
  of a schedule ``sigma_next`` is ``sigmas[1]``, which is what the reference code uses,
  so the function needs no schedule state.
* ``"cps"`` (coefficient-preserving): ``std = s_next sin(a pi / 2)``; its log-prob
  drops the Gaussian normaliser and the variance, as the reference code does.

The log-prob is a per-element *mean* over all non-batch dims, not a sum, which is why
PPO clip ranges in this field are ~1e-4.

Everything here runs in fp32: the log-prob subtracts two nearly equal numbers and
divides by ``std^2``, and the ratio ``exp(logp - logp_old)`` must be exactly 1 on-policy.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

SdeType = Literal["sde", "cps"]

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def _per_sample(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-sample ``[B]`` tensor against a ``[B, ...]`` tensor."""
    return x.reshape(-1, *([1] * (like.ndim - 1)))


def _mean_over_non_batch(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


def _broadcast_sigmas(
    sigma: torch.Tensor | float, sigma_next: torch.Tensor | float, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sigma``/``sigma_next`` (scalars or ``[B]``) as fp32 ``[B, 1, 1, 1]`` tensors."""
    def as_b(t: torch.Tensor | float) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(x.shape[0])
        return _per_sample(t, x)

    return as_b(sigma), as_b(sigma_next)


def sde_step_with_logprob(
    sample: torch.Tensor,
    velocity: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    noise_level: float,
    prev_sample: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    sde_type: SdeType = "sde",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One stochastic denoising step from ``sigma`` to ``sigma_next``.

    Args:
        sample: ``x_s``, ``[B, C, H, W]``.
        velocity: the model's ``v`` at ``(x_s, s)`` (after CFG), ``[B, C, H, W]``.
        sigma, sigma_next: ``[B]`` (or scalar) noise levels, ``sigma_next < sigma``.
        noise_level: ``a`` in docs/design.md; must be > 0 (use a plain Euler step for ODE).
        prev_sample: ``x_{s_next}`` to score (training); if None it is sampled.
        noise: standard normal ``[B, C, H, W]`` used to sample ``prev_sample``;
            drawn with ``torch.randn`` when both it and ``prev_sample`` are None.
        sde_type: ``"sde"`` or ``"cps"``.

    Returns:
        ``(prev_sample [B,C,H,W], log_prob [B], mean [B,C,H,W], std [B])`` where ``std``
        is the standard deviation of ``prev_sample`` given ``sample``.
    """
    if noise_level <= 0:
        raise ValueError(f"noise_level must be > 0 for a stochastic step, got {noise_level}")
    if sample.shape != velocity.shape:
        raise ValueError(f"sample {tuple(sample.shape)} and velocity {tuple(velocity.shape)} differ")
    # fp32 throughout: see the module docstring.
    x = sample.float()
    v = velocity.float()
    batch = x.shape[0]
    s_b, s_next_b = _broadcast_sigmas(sigma, sigma_next, x)  # [B,1,1,1]
    dt = s_next_b - s_b  # < 0

    if sde_type == "sde":
        # std_t = a sqrt(s / (1 - s')), s' = s except at s == 1 where s' = sigma_next.
        s_safe = torch.where(s_b == 1.0, s_next_b, s_b)
        std_t = noise_level * torch.sqrt(s_b / (1.0 - s_safe))
        mean = x * (1.0 + std_t**2 / (2.0 * s_b) * dt) + v * (
            1.0 + std_t**2 * (1.0 - s_b) / (2.0 * s_b)
        ) * dt
        std = std_t * torch.sqrt(-dt)
    elif sde_type == "cps":
        std = s_next_b * math.sin(noise_level * math.pi / 2.0)
        x0_hat = x - s_b * v
        x1_hat = x + (1.0 - s_b) * v
        mean = x0_hat * (1.0 - s_next_b) + x1_hat * torch.sqrt(s_next_b**2 - std**2)
    else:
        raise ValueError(f"sde_type must be 'sde' or 'cps', got {sde_type!r}")

    if prev_sample is None:
        if noise is None:
            noise = torch.randn_like(x)
        prev_sample = mean + std * noise.float()
    # The sample is data, not a function of the parameters being trained.
    x_next = prev_sample.detach().float()

    if sde_type == "sde":
        log_prob = -((x_next - mean) ** 2) / (2.0 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    else:
        log_prob = -((x_next - mean) ** 2)
    return prev_sample, _mean_over_non_batch(log_prob), mean, std.reshape(batch)


def ode_step(
    sample: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor
) -> torch.Tensor:
    """Deterministic Euler step of the flow ODE: ``x + v dt`` (the ``a = 0`` limit)."""
    x = sample.float()
    s_b, s_next_b = _broadcast_sigmas(sigma, sigma_next, x)
    return x + velocity.float() * (s_next_b - s_b)


def gaussian_kl(
    mean: torch.Tensor,
    mean_ref: torch.Tensor,
    std: torch.Tensor,
    dt: torch.Tensor,
    *,
    form: Literal["exact", "flow_grpo"] = "exact",
    sde_type: SdeType = "sde",
) -> torch.Tensor:
    """KL between the policy's and the reference's step Gaussians, per element-mean.

    Both Gaussians share ``std`` (it depends only on the schedule), so
    ``KL = ||mean - mean_ref||^2 / (2 std^2)``, averaged over non-batch dims: ``[B]``.

    ``form="flow_grpo"`` reproduces Flow-GRPO's code, which divides by ``std_t^2``
    rather than ``(std_t sqrt|dt|)^2`` for the ``"sde"`` step: the exact KL times
    ``|dt|``. For ``"cps"`` both forms coincide (its ``std`` has no ``dt`` factor).
    """
    # fp32: the squared difference of two nearly equal means.
    sq = _mean_over_non_batch((mean.float() - mean_ref.float()) ** 2)
    kl = sq / (2.0 * std.float().reshape(-1) ** 2)
    if form == "flow_grpo" and sde_type == "sde":
        kl = kl * torch.as_tensor(dt, dtype=torch.float32, device=kl.device).abs().reshape(-1)
    elif form not in ("exact", "flow_grpo"):
        raise ValueError(f"KL form must be 'exact' or 'flow_grpo', got {form!r}")
    return kl
