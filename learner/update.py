"""The Flow-GRPO update as gradient accumulation over a shard of the step's samples.

One function, :func:`accumulate_grpo_gradients`, runs forward and backward over every
(micro-batch x trained step) pair of the samples it is given and takes no optimizer
step. The sequential loop calls it on all kept samples with ``loss.backward``; a
DeepSpeed rank calls it on its shard with ``engine.backward`` (``learner.engine``).

Sharding rule. Each term's loss is weighted by ``len(chunk) / (global_count |steps|)``,
so the gradient accumulated over the shard is

    g_shard = 1 / (global_count |steps|) sum_{i in shard} sum_{j in steps} grad L_ij

and the sum of ``g_shard`` over disjoint shards covering the ``global_count`` kept
samples is the gradient of the mean loss over the whole step, whatever the shard sizes.
A backend that *averages* gradients over W ranks must therefore be handed ``W * loss``.

Pure torch: no ray, no deepspeed.

Deviations from Flow-GRPO's train_sd3.py: gradients accumulate over all micro-batches
and trained steps of a step before one optimizer step (``micro_batch`` bounds memory
only), and metrics are sample-weighted means so that shards combine exactly
(:func:`merge_metrics`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch

from learner.config import GrpoConfig
from learner.grpo import policy_loss
from policy.logprob import reference_kl, step_log_prob
from policy.sampler import Conditioning, Rollout

# Metrics that are sample-weighted means over (sample, trained step) pairs.
MEAN_METRICS = ("loss/policy", "loss/kl", "loss/total", "loss/ratio_mean",
                "loss/clip_fraction", "loss/no_grad_fraction", "loss/approx_kl")
SAMPLES = "loss/samples"


def micro_batches(index: torch.Tensor, micro_batch: int,
                  count: int | None = None) -> list[torch.Tensor]:
    """``index`` in chunks of at most ``micro_batch``; with ``count``, exactly ``count`` chunks.

    Data-parallel ranks must run the same number of backward passes (ZeRO-2 reduces
    gradients in every one), so a rank with a short shard is given ``count`` and may
    get empty chunks, which :func:`accumulate_grpo_gradients` pads.
    """
    if count is None:
        return list(index.split(micro_batch))
    if count < math.ceil(len(index) / micro_batch):
        raise ValueError(f"{len(index)} samples do not fit in {count} micro-batches of "
                         f"grpo.micro_batch={micro_batch}; pass a larger num_micro_batches")
    return list(index.tensor_split(count))


def accumulate_grpo_gradients(
    transformer: torch.nn.Module,
    rollout: Rollout,
    cond: Conditioning,
    negative: Conditioning | None,
    advantages: torch.Tensor,
    index: torch.Tensor,
    steps: Sequence[int],
    cfg: GrpoConfig,
    backward: Callable[[torch.Tensor], object],
    global_count: int,
    num_micro_batches: int | None = None,
) -> dict[str, float]:
    """Accumulate the Flow-GRPO gradient of samples ``index`` into the LoRA ``.grad``s.

    ``rollout``, ``cond`` and ``advantages`` ([N], or [N, len(steps)] per trained step)
    are aligned; ``index`` ([n] int64)
    picks the samples trained here, ``global_count`` is the number of samples trained
    in the whole step over all shards, ``steps`` the trained steps j. ``backward(loss)``
    is called once per (micro-batch x trained step) with the already weighted loss;
    with ``num_micro_batches`` the count of calls is fixed at ``num_micro_batches *
    len(steps)`` (empty micro-batches run sample 0 of ``rollout`` with weight 0).
    ``transformer`` may be a DeepSpeed engine wrapping the transformer.

    Returns sample-weighted means of the loss terms, the ratio range, the largest
    ``|ratio - 1|`` at the first trained step (1 on-policy before any update), and
    ``loss/samples = n``; combine shards with :func:`merge_metrics`.
    """
    if advantages.ndim == 2 and advantages.shape[1] != len(steps):
        raise ValueError(f"per-step advantages {tuple(advantages.shape)} need one column per "
                         f"trained step ({len(steps)})")
    if global_count < len(index) or global_count < 1:
        raise ValueError(f"global_count={global_count} must be >= 1 and >= this shard's "
                         f"{len(index)} samples")
    weighted = dict.fromkeys(MEAN_METRICS, 0.0)
    ratio_min, ratio_max, first_dev = math.inf, -math.inf, 0.0
    for chunk in micro_batches(index, cfg.micro_batch, num_micro_batches):
        padding = len(chunk) == 0
        rows = torch.zeros(1, dtype=torch.long) if padding else chunk  # [b]
        chunk_cond = cond.select(rows)
        for k, j in enumerate(steps):
            # one advantage per sample, or per (sample, trained step) with grpo.credit per_step
            adv = advantages[rows] if advantages.ndim == 1 else advantages[rows, k]
            # log pi_theta(x_{j+1} | x_j) through the sampler's own step (ratio 1 on-policy)
            new = step_log_prob(transformer, rollout, j, chunk_cond, negative, rows,
                                cfg.detach_uncond)  # [b]
            # KL(pi_theta || pi_ref), the reference being the adapter-disabled transformer
            kl = None
            if cfg.beta > 0 and not padding:
                kl = reference_kl(transformer, rollout, j, chunk_cond, negative, new, rows,
                                  form=cfg.kl_form)  # [b]
            # ratio = exp(logp_theta - logp_old);
            # L = mean(max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))) + beta KL
            # (objective "decoupled": the clip against this pass's weights, the behaviour
            # policy as a detached weight; learner.grpo.policy_loss)
            loss, m = policy_loss(new.log_prob, rollout.log_probs[rows, j], adv,
                                  cfg.clip_range, kl, cfg.beta, cfg.objective, cfg.max_weight)
            # Weight by the chunk's share of the GLOBAL batch: shards' gradients sum to the mean.
            weight = len(chunk) / (global_count * len(steps))
            backward(loss * weight)
            if padding:
                continue  # keeps ranks in lockstep; contributes no gradient and no metrics
            for k in MEAN_METRICS:
                weighted[k] += float(m[k]) * len(chunk)
            lo, hi = float(m["loss/ratio_min"]), float(m["loss/ratio_max"])
            ratio_min, ratio_max = min(ratio_min, lo), max(ratio_max, hi)
            if j == steps[0]:
                first_dev = max(first_dev, hi - 1, 1 - lo)
    terms = len(index) * len(steps)
    metrics = {k: v / terms if terms else 0.0 for k, v in weighted.items()}
    metrics.update({"loss/ratio_min": ratio_min, "loss/ratio_max": ratio_max,
                    "loss/first_ratio_max_dev": first_dev, SAMPLES: float(len(index))})
    return metrics


@torch.no_grad()
def recompute_old_log_probs(
    transformer: torch.nn.Module,
    rollout: Rollout,
    cond: Conditioning,
    negative: Conditioning | None,
    index: torch.Tensor,
    steps: Sequence[int],
    cfg: GrpoConfig,
    num_micro_batches: int | None = None,
) -> Rollout:
    """``rollout`` with the old log-probs of samples ``index`` at ``steps`` recomputed here.

    The ratio's denominator then comes from the same kernels, micro-batches and dtype as
    the numerator that :func:`accumulate_grpo_gradients` computes next: in bf16 on GPUs
    a kernel's result depends on the batch it runs in (a rollout of 32 trajectories vs a
    training micro-batch of 8), and with ``clip_range`` 1e-4 that drift alone clips
    samples. ``transformer`` must hold the weights that sampled the rollout (the caller
    swaps them in when the rollout is stale). Same chunks as the update, so the same
    batch shapes; other samples and steps keep the rollout's own log-probs.
    """
    log_probs = torch.as_tensor(rollout.log_probs).clone()  # [N, T]
    for chunk in micro_batches(index, cfg.micro_batch, num_micro_batches):
        if len(chunk) == 0:
            continue  # a padding pass trains nothing
        chunk_cond = cond.select(chunk)
        for j in steps:
            new = step_log_prob(transformer, rollout, j, chunk_cond, negative, chunk,
                                cfg.detach_uncond)
            log_probs[chunk, j] = new.log_prob.to(log_probs.device, log_probs.dtype)
    return replace(rollout, log_probs=log_probs)


def merge_metrics(parts: Sequence[dict[str, float]]) -> dict[str, float]:
    """Combine the metrics of disjoint shards into the metrics of their union.

    Means are weighted by ``loss/samples``; ranges and deviations take min/max. Keys
    outside these (e.g. ``loss/grad_norm``, equal on every rank) come from ``parts[0]``.
    """
    total = sum(p[SAMPLES] for p in parts)
    out = dict(parts[0])
    for k in MEAN_METRICS:
        out[k] = sum(p[k] * p[SAMPLES] for p in parts) / total if total else 0.0
    out["loss/ratio_min"] = min(p["loss/ratio_min"] for p in parts)
    out["loss/ratio_max"] = max(p["loss/ratio_max"] for p in parts)
    out["loss/first_ratio_max_dev"] = max(p["loss/first_ratio_max_dev"] for p in parts)
    out[SAMPLES] = total
    return out
