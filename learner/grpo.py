"""Flow-GRPO advantages and the clipped policy loss (docs/design.md section 4).

Pure torch: no ray, no deepspeed, so the math is tested on its own.

Deviations from the Flow-GRPO reference:

* Groups whose rewards are all equal carry no signal; they are marked ``keep=False``
  and counted rather than trained on with zero advantage.
* Several rewards combine either as a weighted sum of rewards (then one advantage),
  or, SOLACE's hybrid rule, as a weighted sum of per-reward advantages, each
  normalised and clipped on its own so that no reward's scale dominates.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

StdMode = Literal["global", "group"]
CombineRule = Literal["advantages", "rewards"]
Objective = Literal["clipped", "decoupled"]


@dataclass
class Advantages:
    """Per-sample advantages of one step."""

    values: torch.Tensor  # [N] fp32, 0 where keep is False
    keep: torch.Tensor  # [N] bool; False for samples of groups with no reward spread
    num_groups: int
    num_dropped_groups: int
    # Per-reward weighted advantages w_k A_k (for metrics), by reward name.
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    std_mode: StdMode = "global",
    clip: float = 5.0,
    eps: float = 1e-4,
) -> Advantages:
    """``A = (r - mean_group) / (std + eps)``, clipped to ``[-clip, clip]``.

    ``std`` is the std of every reward in the step (``"global"``, the SD3 default; it
    needs the whole step's rewards, docs/design.md trap 4) or of the sample's group.
    Groups whose rewards are all equal are dropped (``keep=False``, advantage 0).
    """
    if rewards.shape != group_ids.shape or rewards.ndim != 1:
        raise ValueError(
            f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must be equal 1-D"
        )
    if std_mode not in ("global", "group"):
        raise ValueError(f"std_mode must be 'global' or 'group', got {std_mode!r}")
    r = rewards.double()  # float64: a group mean of near-equal rewards loses digits in fp32
    values = torch.zeros_like(r)
    keep = torch.zeros_like(r, dtype=torch.bool)
    global_std = r.std(unbiased=False)
    groups = torch.unique(group_ids)
    dropped = 0
    for g in groups:
        rows = group_ids == g
        rg = r[rows]
        if torch.all(rg == rg[0]):
            dropped += 1
            continue
        std = global_std if std_mode == "global" else rg.std(unbiased=False)
        values[rows] = (rg - rg.mean()) / (std + eps)
        keep[rows] = True
    values = values.clamp(-clip, clip).float()
    return Advantages(values, keep, len(groups), dropped)


def combine_advantages(
    rewards: Mapping[str, torch.Tensor],
    weights: Mapping[str, float],
    group_ids: torch.Tensor,
    rule: CombineRule = "advantages",
    std_mode: StdMode = "global",
    clip: float = 5.0,
    eps: float = 1e-4,
) -> Advantages:
    """Advantages from several named rewards ``{name: [N]}`` with ``weights[name]``.

    * ``"rewards"``: ``A = adv(sum_k w_k r_k)``.
    * ``"advantages"`` (SOLACE's hybrid rule): ``A = sum_k w_k adv(r_k)``; a group is
      dropped only if every reward is flat in it.

    A reward of weight 0 is only watched: it never moves an advantage or keeps a group.
    """
    if set(rewards) != set(weights):
        raise ValueError(
            f"rewards {sorted(rewards)} and weights {sorted(weights)} must name the same rewards"
        )
    if rule == "rewards":
        total = sum(weights[k] * rewards[k].double() for k in rewards)
        return group_advantages(total, group_ids, std_mode, clip, eps)
    if rule != "advantages":
        raise ValueError(f"combine rule must be 'advantages' or 'rewards', got {rule!r}")
    parts = {k: group_advantages(r, group_ids, std_mode, clip, eps) for k, r in rewards.items()}
    weighted = {k: weights[k] * p.values for k, p in parts.items()}
    used = [p.keep for k, p in parts.items() if weights[k] != 0]
    keep = torch.stack(used).any(dim=0) if used else torch.zeros_like(group_ids, dtype=torch.bool)
    dropped = len(torch.unique(group_ids[~keep]))
    return Advantages(
        sum(weighted.values()), keep, len(torch.unique(group_ids)), dropped, parts=weighted
    )


def step_advantages(
    step_scores: torch.Tensor,
    group_ids: torch.Tensor,
    clip: float = 5.0,
    eps: float = 1e-4,
) -> Advantages:
    """Per-step credit from self-confidence along the trajectory.

    ``step_scores [N, S+1]``: column ``k < S`` is the self-confidence of the sampler's
    predicted clean latent at the k-th trained step, column ``S`` that of the final
    latent. The reward of trained step k is the gain it brought,
    ``r_k = s_{k+1} - s_k`` (so ``sum_k r_k = s_S - s_0``, the final score less the
    first step's), and its advantage ``A_k = (r_k - mean_group r_k) / (std_group r_k + eps)``
    is normalised per step within each group, so every step's advantages sum to zero
    over a group (before the clip to ``[-clip, clip]``). Returns ``values [N, S]``. A
    group is dropped when no step's reward varies in it; a step whose reward is flat in
    a kept group gets advantage 0.
    """
    if step_scores.ndim != 2 or step_scores.shape[1] < 2 or len(step_scores) != len(group_ids):
        raise ValueError(f"step_scores must be [N, S+1] with S >= 1 and N = {len(group_ids)} "
                         f"samples, got {tuple(step_scores.shape)}")
    gains = step_scores.double().diff(dim=1)  # [N, S]
    values = torch.zeros_like(gains)
    keep = torch.zeros(len(gains), dtype=torch.bool)
    groups = torch.unique(group_ids)
    dropped = 0
    for g in groups:
        rows = group_ids == g
        r = gains[rows]  # [G, S]
        spread = (r != r[0]).any(dim=0)  # [S]
        if not spread.any():
            dropped += 1
            continue
        a = (r - r.mean(dim=0)) / (r.std(dim=0, unbiased=False) + eps)
        values[rows] = torch.where(spread, a, torch.zeros_like(a))
        keep[rows] = True
    return Advantages(values.clamp(-clip, clip).float(), keep, len(groups), dropped)


def shuffle_within_groups(
    rewards: Mapping[str, torch.Tensor], group_ids: torch.Tensor, seed: int
) -> dict[str, torch.Tensor]:
    """Each reward permuted within each group: the random-reward control.

    A permutation keeps every group's reward distribution (so the advantages have the
    same scale and the same groups are dropped) but cuts the link between a sample and
    its reward: training on it shows what the gradient noise alone does to the model.
    All rewards of a sample move together, with one permutation per group drawn from
    ``seed``.
    """
    generator = torch.Generator().manual_seed(seed)
    order = torch.arange(len(group_ids))
    for g in torch.unique(group_ids):
        rows = torch.nonzero(group_ids == g).flatten()
        order[rows] = rows[torch.randperm(len(rows), generator=generator)]
    return {name: r[order] for name, r in rewards.items()}


def group_spreads(values: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """The std of each group's advantages, ``[groups]`` in order of ``group_ids``' values
    (per-step advantages ``[N, S]``: of each sample's mean over steps). A dropped group,
    whose rewards were all equal, has 0: it carried no gradient."""
    rows = values.double().mean(dim=1) if values.ndim == 2 else values.double()  # [N]
    return torch.stack([rows[group_ids == g].std(unbiased=False)
                        for g in torch.unique(group_ids)])


def policy_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    kl: torch.Tensor | None = None,
    beta: float = 0.0,
    objective: Objective = "clipped",
    max_weight: float = 2.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The surrogate of one trained step, plus ``beta * KL``. All inputs ``[N]``.

    ``"clipped"`` (Flow-GRPO): ``ratio = exp(logp - logp_old)`` against the behaviour
    policy that sampled, ``L = mean(max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)))``.
    A stale sample whose ratio already left the clip gets no gradient.

    ``"decoupled"`` (a proximal policy, as in AReaL): the clip is taken against the
    weights being updated, whose log-probs are this pass's (``logp.detach()``: one
    optimizer step per round, so they are the proximal policy), and the behaviour
    policy enters as a detached importance weight ``w = min(pi_prox / pi_old,
    max_weight)``: ``L = mean(max(-A w r, -A w clip(r, 1 - eps, 1 + eps)))`` with
    ``r = exp(logp - logp.detach()) = 1``. On-policy (``logp == logp_old``) it is
    ``"clipped"`` exactly; stale, every term keeps its gradient ``-A w grad logp``.

    Returns the scalar loss and detached per-batch metrics; the ratio metrics are always
    against the behaviour policy, and ``loss/no_grad_fraction`` counts the terms whose
    policy gradient is zero.
    """
    # fp32: log-probs are per-element means and differ by ~1e-4 between policies.
    behaviour = torch.exp(log_prob.float() - old_log_prob.float())  # [N] pi_theta / pi_old
    adv = advantages.float()  # [N]
    if objective == "clipped":
        ratio, weight = behaviour, torch.ones_like(behaviour)  # [N], [N]
    elif objective == "decoupled":
        ratio = torch.exp(log_prob.float() - log_prob.detach().float())  # [N], == 1
        weight = behaviour.detach().clamp(max=max_weight)  # [N] pi_prox / pi_old
    else:
        raise ValueError(f"objective must be 'clipped' or 'decoupled', got {objective!r}")
    unclipped = -adv * weight * ratio  # [N]
    clipped = -adv * weight * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)  # [N]
    policy = torch.maximum(unclipped, clipped).mean()
    loss = policy
    kl_mean = torch.zeros((), device=behaviour.device)
    if kl is not None:
        kl_mean = kl.float().mean()
        loss = loss + beta * kl_mean
    with torch.no_grad():
        outside = (ratio > 1.0 + clip_range) & (adv > 0) | (ratio < 1.0 - clip_range) & (adv < 0)
        metrics = {
            "loss/policy": policy.detach(),
            "loss/kl": kl_mean.detach(),
            "loss/total": loss.detach(),
            "loss/ratio_mean": behaviour.mean(),
            "loss/ratio_min": behaviour.min(),
            "loss/ratio_max": behaviour.max(),
            "loss/clip_fraction": ((behaviour - 1.0).abs() > clip_range).float().mean(),
            "loss/no_grad_fraction": (outside | (adv == 0)).float().mean(),
            "loss/approx_kl": 0.5 * ((log_prob - old_log_prob).float() ** 2).mean(),
        }
    return loss, metrics


def advantage_metrics(adv: Advantages) -> dict[str, float]:
    """Flat ``reward/``-namespaced statistics of one step's advantages."""
    kept = adv.values[adv.keep]
    out = {
        "reward/groups": float(adv.num_groups),
        "reward/groups_dropped": float(adv.num_dropped_groups),
        "reward/adv_mean": float(kept.mean()) if len(kept) else 0.0,
        "reward/adv_std": float(kept.std(unbiased=False)) if len(kept) else 0.0,
        "reward/adv_abs_max": float(kept.abs().max()) if len(kept) else 0.0,
    }
    total = sum(p.abs() for p in adv.parts.values()) if adv.parts else None
    for name, part in adv.parts.items():
        share = (part.abs()[adv.keep].sum() / total[adv.keep].sum().clamp_min(1e-12))
        out[f"reward/{name}/adv_share"] = float(share)
    return out
