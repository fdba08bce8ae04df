"""SOLACE's intrinsic self-confidence reward (docs/design.md section 4).

For a generated latent ``z0`` and its prompt ``c``, re-inject noise at the probe steps
and measure how well the model recovers it, without CFG:

    eps_1..K ~ N(0, I), antithetic: eps_{K/2+m} = -eps_m
    z_t      = (1 - t) z0 + t eps_m
    eps_hat  = v_theta(z_t, t, c) + z0          (since v = eps - x0)
    MSE_t    = mean_m mean_dims (eps_hat - eps_m)^2
    S_t      = -log(MSE_t + delta)

Deviations from the paper, on purpose:

* ``MSE`` is a per-element mean rather than the paper's squared L2 norm (a sum), so
  that ``delta`` means the same thing at every resolution. ``-log`` turns the
  difference into a constant offset, which the advantage normalisation removes.
* The ``K`` probes are shared by every sample of a call, as in the paper; they come
  from ``generator``, so a group scored in one call or in two halves with the same
  generator seed sees the same probes and gets the same per-step scores.
* The official code's aggregation z-normalises ``S_t`` across the local GPU batch;
  here it is across the GRPO group (``group_ids``), so a reward never depends on how
  a pool happened to batch its work. :func:`aggregate` does this on its own, so a
  group split over several calls can be aggregated once all its scores are in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from policy.sampler import (
    PROBE_STREAM,
    Rollout,
    conditional_velocity,
    derive_seed,
    predict_x0,
    suffix_window,
)

Aggregation = Literal["paper", "official"]
VelocityFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


@dataclass
class SelfConfidence:
    """Self-confidence of a batch of samples."""

    reward: torch.Tensor  # [B] aggregated reward
    per_step: torch.Tensor  # [B, P] S_t at each probe step
    mse: torch.Tensor  # [B, P] MSE_t
    probe_sigmas: torch.Tensor  # [P] the t of each probe step
    probe_steps: tuple[int, ...]  # indices into the schedule's sigmas


def antithetic_probes(
    num_probes: int, shape: tuple[int, ...], generator: torch.Generator | None = None
) -> torch.Tensor:
    """``K`` standard normal probes ``[K, *shape]`` whose second half negates the first."""
    if num_probes < 2 or num_probes % 2:
        raise ValueError(f"num_probes must be even and >= 2 (antithetic pairs), got {num_probes}")
    half = torch.randn((num_probes // 2, *shape), generator=generator)
    return torch.cat([half, -half])


def _repeat(cond: Any, times: int) -> Any:
    """Repeat a conditioning ``times`` along the batch (probe-major: [c; c; ...])."""
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return cond.repeat(times, *([1] * (cond.ndim - 1)))
    return cond.repeat(times)  # e.g. policy.sampler.Conditioning


def aggregate(
    per_step: torch.Tensor,
    probe_sigmas: torch.Tensor,
    aggregation: Aggregation = "paper",
    group_ids: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Aggregate per-step scores ``[B, P]`` into one reward per sample ``[B]``.

    * ``"paper"``: ``R = sum_t w(t) S_t / sum_t w(t)`` with ``w = weights`` (default 1).
    * ``"official"``: z-normalise ``S_t`` per probe step within each GRPO group, multiply
      by ``t (1 - t)``, and average over probe steps. ``group_ids=None`` is one group.
    """
    per_step = per_step.float()
    if aggregation == "paper":
        w = torch.ones_like(probe_sigmas) if weights is None else weights.float()
        return (per_step * w).sum(dim=1) / w.sum()
    if aggregation != "official":
        raise ValueError(f"aggregation must be 'paper' or 'official', got {aggregation!r}")
    if group_ids is None:
        group_ids = torch.zeros(per_step.shape[0], dtype=torch.long)
    z = torch.empty_like(per_step)
    for g in torch.unique(group_ids):
        rows = group_ids == g
        s = per_step[rows]  # [G, P]
        z[rows] = (s - s.mean(dim=0)) / (s.std(dim=0, unbiased=False) + eps)
    t = probe_sigmas.float().to(per_step.device)
    return (z * t * (1.0 - t)).mean(dim=1)


def chunked_velocity(velocity_fn: VelocityFn, z: torch.Tensor, sigma: torch.Tensor, cond: Any,
                     micro_batch: int | None = None) -> torch.Tensor:
    """``velocity_fn`` over ``z`` in forwards of at most ``micro_batch`` latents (fp32)."""
    if micro_batch is None or micro_batch >= len(z):
        return velocity_fn(z, sigma, cond).float()
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
    parts = []
    for start in range(0, len(z), micro_batch):
        rows = slice(start, start + micro_batch)
        part = cond.select(rows) if hasattr(cond, "select") else (
            None if cond is None else cond[rows])
        parts.append(velocity_fn(z[rows], sigma[rows], part).float())
    return torch.cat(parts)


@torch.no_grad()
def self_confidence(
    velocity_fn: VelocityFn,
    z0: torch.Tensor,
    sigmas: torch.Tensor,
    cond: Any,
    num_probes: int = 8,
    probe_window: tuple[int, int] | None = None,
    delta: float = 1e-6,
    aggregation: Aggregation = "paper",
    group_ids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    micro_batch: int | None = None,
) -> SelfConfidence:
    """Score generated latents ``z0 [B, C, H, W]`` by the model's self-confidence.

    Args:
        velocity_fn: ``(z_t [N,C,H,W], sigma [N], cond) -> v [N,C,H,W]``, the *conditional*
            velocity (no CFG: SOLACE scores the base conditional policy).
        sigmas: the sampling schedule ``[T+1]`` (1 -> 0); probe ``t`` values are taken
            from it.
        cond: conditioning for the ``B`` samples; repeated ``K`` times (probe-major).
        probe_window: ``[start, stop)`` step indices into ``sigmas``; default is the
            suffix window of rho = 0.5 over the ``T-1`` trainable steps.
        generator: draws the probes (CPU); pass a seeded one for reproducible rewards.
        micro_batch: at most this many of the ``K*B`` probe latents per transformer
            forward (None: all at once); the probes and the results do not change.
    """
    batch = z0.shape[0]
    num_trainable = len(sigmas) - 2  # the last step is never trained (docs/design.md trap 3)
    start, stop = probe_window or suffix_window(num_trainable, 0.5)
    if not 0 <= start < stop <= len(sigmas) - 1:
        raise ValueError(f"probe_window {probe_window} must lie within [0, {len(sigmas) - 1})")
    steps = tuple(range(start, stop))
    # fp32: the MSE of a well-trained model is small and its log is what is rewarded.
    x0 = z0.float()
    eps = antithetic_probes(num_probes, tuple(x0.shape[1:]), generator).to(x0.device)  # [K,C,H,W]
    eps_k = eps[:, None].expand(num_probes, batch, *x0.shape[1:])  # [K,B,C,H,W]
    x0_k = x0[None].expand_as(eps_k)  # [K,B,C,H,W]
    cond_k = _repeat(cond, num_probes)

    mse = []
    for j in steps:
        t = sigmas[j].float().to(x0.device)
        z_t = ((1.0 - t) * x0_k + t * eps_k).reshape(num_probes * batch, *x0.shape[1:])
        v = chunked_velocity(velocity_fn, z_t, t.expand(num_probes * batch), cond_k,
                             micro_batch)  # [K*B,C,H,W]
        eps_hat = v.reshape_as(eps_k) + x0_k  # eps = v + x0
        err = ((eps_hat - eps_k) ** 2).mean(dim=tuple(range(2, eps_k.ndim)))  # [K,B]
        mse.append(err.mean(dim=0))  # [B]
    mse_t = torch.stack(mse, dim=1)  # [B,P]
    per_step = -torch.log(mse_t + delta)
    probe_sigmas = sigmas[list(steps)].float()
    reward = aggregate(per_step, probe_sigmas, aggregation, group_ids)
    return SelfConfidence(reward, per_step, mse_t, probe_sigmas, steps)


def group_slices(prompt_ids: torch.Tensor) -> list[slice]:
    """The GRPO groups of a rollout: runs of equal consecutive prompt ids."""
    _, counts = torch.unique_consecutive(prompt_ids, return_counts=True)
    ends = counts.cumsum(0).tolist()
    return [slice(end - n, end) for end, n in zip(ends, counts.tolist(), strict=True)]


def group_probe_seed(rollout: Rollout, rows: slice, run_seed: int) -> int:
    """The seed of one group's probes: run seed, weight version, prompt id and the seed of
    the group's first sample (see :func:`score_rollout`)."""
    key = (int(rollout.prompt_ids[rows][0]), int(rollout.seeds[rows][0]))
    return derive_seed(run_seed, PROBE_STREAM, rollout.weight_version, *key)


@torch.no_grad()
def score_rollout(
    transformer: torch.nn.Module,
    rollout: Rollout,
    cond: Any,
    run_seed: int,
    num_probes: int = 8,
    probe_fraction: float = 0.5,
    delta: float = 1e-6,
    aggregation: Aggregation = "paper",
    guidance_scale: float = 1.0,
    negative: Any = None,
    micro_batch: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-confidence of a (torch) rollout's samples, one group at a time: ``[B]``, ``[B, P]``.

    ``guidance_scale`` 1 (SOLACE's choice) scores the conditional velocity; any other
    value scores the CFG field built with the empty-prompt ``negative`` (an ablation).

    Each group's probes come from ``derive_seed(run_seed, PROBE_STREAM, weight_version,
    prompt_id, seed of the group's first sample)``, so a group's reward depends neither
    on which process scored it nor on the other groups of the call; the sequential loop
    and the reward actors give the same numbers.
    """
    window = suffix_window(rollout.spec.num_steps - 1, probe_fraction)
    velocity = conditional_velocity(transformer, negative, guidance_scale)
    rewards, per_step = [], []
    for rows in group_slices(rollout.prompt_ids):
        seed = group_probe_seed(rollout, rows, run_seed)
        out = self_confidence(
            velocity, rollout.final[rows], rollout.sigmas, cond.select(rows),
            num_probes=num_probes, probe_window=window, delta=delta,
            aggregation=aggregation, generator=torch.Generator().manual_seed(seed),
            micro_batch=micro_batch,
        )  # one group: the official aggregation normalises within it
        rewards.append(out.reward)
        per_step.append(out.per_step)
    return torch.cat(rewards), torch.cat(per_step)


@torch.no_grad()
def score_steps(
    transformer: torch.nn.Module,
    rollout: Rollout,
    cond: Any,
    run_seed: int,
    steps: list[int],
    sampling_negative: Any = None,
    num_probes: int = 8,
    probe_fraction: float = 0.5,
    delta: float = 1e-6,
    aggregation: Aggregation = "paper",
    guidance_scale: float = 1.0,
    negative: Any = None,
    micro_batch: int | None = None,
    final_reward: torch.Tensor | None = None,
) -> torch.Tensor:
    """Self-confidence along the trajectory, for per-step credit: ``[B, len(steps) + 1]``.

    Column ``k`` scores the sampler's predicted clean latent at trained step
    ``steps[k]``, ``x0 = z_j - sigma_j v(z_j)`` with the sampler's own velocity (its CFG,
    from ``sampling_negative``); the last column scores the final latent and equals
    :func:`score_rollout`'s reward. Every column of a group uses the group's probes of
    :func:`score_rollout`, so a difference between columns is the latents', not the
    probes'. The scoring velocity is as in :func:`score_rollout` (no CFG by default).
    ``final_reward``: that reward, already computed (a reward worker has it): the last
    column is taken from it instead of scoring the final latents a second time.
    """
    spec = rollout.spec
    window = suffix_window(spec.num_steps - 1, probe_fraction)
    velocity = conditional_velocity(transformer, negative, guidance_scale)
    out = []
    for rows in group_slices(rollout.prompt_ids):
        seed = group_probe_seed(rollout, rows, run_seed)
        group_cond = cond.select(rows)
        latents = [predict_x0(transformer, rollout.latents[rows, j], rollout.sigmas[j],
                              group_cond, sampling_negative, spec) for j in steps]
        if final_reward is None:
            latents.append(rollout.final[rows])
        columns = [self_confidence(
            velocity, x0, rollout.sigmas, group_cond, num_probes=num_probes,
            probe_window=window, delta=delta, aggregation=aggregation,
            generator=torch.Generator().manual_seed(seed), micro_batch=micro_batch).reward
            for x0 in latents]
        if final_reward is not None:
            columns.append(final_reward[rows].to(columns[0]))
        out.append(torch.stack(columns, dim=1))
    return torch.cat(out)
