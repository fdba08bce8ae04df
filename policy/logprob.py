"""Training-time log-probs and the KL to the reference, through the sampler's own step.

The learner recomputes ``log pi_theta(x_{j+1} | x_j)`` for the recorded transition of a
trained step ``j`` by calling :func:`policy.sampler.denoise_step` with
``prev_sample = x_{j+1}``: the same function, guidance and fp32 math that produced the
sample, so on-policy the ratio is exactly 1. The reference for the KL term is the base
model, i.e. the same transformer with its LoRA adapter disabled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from policy.pipeline import adapter_disabled
from policy.sampler import Conditioning, Rollout, SamplerSpec, denoise_step, suffix_window
from policy.sde import gaussian_kl

KlForm = Literal["exact", "flow_grpo"]


@dataclass
class StepLogProb:
    """The policy's Gaussian for one recorded transition of a batch."""

    log_prob: torch.Tensor  # [B]
    mean: torch.Tensor  # [B, C, H, W]
    std: torch.Tensor  # [B]


def trained_steps(rollout: Rollout, fraction: float) -> list[int]:
    """The suffix of the rollout's stochastic steps that is trained (SOLACE's rho)."""
    return window_steps(rollout.spec, fraction)


def window_steps(spec: SamplerSpec, fraction: float) -> list[int]:
    """The last ``fraction`` of the stochastic steps of ``spec``'s SDE window."""
    start, stop = spec.window()
    first, _ = suffix_window(stop - start, fraction)
    return list(range(start + first, stop))


def step_log_prob(
    transformer: torch.nn.Module,
    rollout: Rollout,
    step: int,
    cond: Conditioning,
    negative: Conditioning | None,
    index: torch.Tensor | slice = slice(None),
    detach_uncond: bool = False,
) -> StepLogProb:
    """Recompute the log-prob of transition ``step`` for samples ``index`` (with grad;
    ``detach_uncond``: none through CFG's unconditional branch)."""
    start, stop = rollout.spec.window()
    if not start <= step < stop:
        raise ValueError(f"step {step} is outside the SDE window [{start}, {stop}): no log-prob")
    latents = rollout.latents[index].to(transformer.device)  # [b, T+1, C, H, W]
    _, log_prob, mean, std = denoise_step(
        transformer,
        latents[:, step],
        step,
        rollout.sigmas.to(transformer.device),
        cond,
        negative,
        rollout.spec,
        prev_sample=latents[:, step + 1],
        detach_uncond=detach_uncond,
    )
    return StepLogProb(log_prob, mean, std)


def reference_kl(
    transformer: torch.nn.Module,
    rollout: Rollout,
    step: int,
    cond: Conditioning,
    negative: Conditioning | None,
    policy_step: StepLogProb,
    index: torch.Tensor | slice = slice(None),
    form: KlForm = "exact",
) -> torch.Tensor:
    """``KL(pi_theta || pi_ref)`` of transition ``step``, per element-mean: ``[b]``.

    The reference forward runs without grad and with the adapter disabled.
    """
    with torch.no_grad(), adapter_disabled(transformer):
        ref = step_log_prob(transformer, rollout, step, cond, negative, index)
    dt = (rollout.sigmas[step + 1] - rollout.sigmas[step]).to(ref.mean.device)
    return gaussian_kl(
        policy_step.mean, ref.mean, policy_step.std, dt.expand(len(ref.std)),
        form=form, sde_type=rollout.spec.sde_type,
    )
