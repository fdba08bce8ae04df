"""What the on-policy options cost or save, as ratios measured in one process (issue #17).

    python -m bench onpolicy [--repeats N] [--set section.field=value ...]

* ``learner.recompute_old_logprobs``: the Flow-GRPO update (``learner.sequential.
  update_step``) with the old log-probs recomputed first, against the same update
  without; ``cost = t_with / t_without - 1``.
* ``self_confidence.merge_lora``: the self-confidence stage (``score_rollout``) with the
  LoRA merged into the weights for the call (``policy.merged``), against the unmerged
  adapter; ``gain = t_unmerged / t_merged``.

Both on the benchmarked config's model (the shipped tiny model by default) and on the
SD3.5-M-shaped CPU smoke size of the GPU mode (2 layers, random weights), interleaved
as the stage benchmarks are (:func:`bench.stages.interleave`): each repetition pair
gives one ratio; the median and range are printed. CPU figures: on a GPU the matmuls
dominate differently (``python -m bench.gpu_check`` measures the recompute there).
"""

from __future__ import annotations

import statistics
from contextlib import nullcontext

import torch

from bench.stages import Pair, interleave, tiny_model
from bench.workloads import StageModel, advantages_of, stage_inputs, stage_sampling
from learner.config import Config
from learner.sequential import Batch, update_step
from policy.merged import merged_lora
from policy.pipeline import load_lora_state_dict, lora_state_dict
from rewards.self_confidence import score_rollout


def moved_lora(m: StageModel, seed: int = 1) -> None:
    """B off zero, so that the adapter (and its merge) does real work."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def option_pairs(m: StageModel, cfg: Config, prompts: list[str], repeats: int) -> list[Pair]:
    """``[recompute pair, merge pair]`` on one model: ``bare`` = without, ``stage`` = with."""
    moved_lora(m)
    device = m.device
    per_sample, ids, seeds = stage_inputs(cfg, prompts)
    rollout = stage_sampling(m, cfg, per_sample, ids, seeds)().torch(device)
    cond = m.encode(rollout.prompts)
    sc = cfg.self_confidence

    def scoring(merge: bool):
        @torch.no_grad()
        def run():
            with merged_lora(m.transformer) if merge else nullcontext():
                return score_rollout(m.transformer, rollout, cond, cfg.seed, sc.num_probes,
                                     sc.probe_fraction, sc.delta, sc.aggregation,
                                     micro_batch=sc.micro_batch)
        return run

    reward, _ = scoring(False)()
    adv, group_ids = advantages_of(cfg, reward, device)
    params = [p for p in m.transformer.parameters() if p.requires_grad]
    start = {k: v.detach().clone() for k, v in lora_state_dict(m.transformer).items()}

    def updating(recompute: bool):
        run_cfg = cfg.model_copy(update={"learner": cfg.learner.model_copy(
            update={"recompute_old_logprobs": recompute})})

        def run():  # every repetition from the same weights: the same work each time
            load_lora_state_dict(m.transformer, {k: v.clone() for k, v in start.items()})
            optimizer = torch.optim.AdamW(params, lr=cfg.grpo.lr)
            return update_step(m.pipe, run_cfg, Batch(rollout, cond, group_ids), adv,
                               m.negative, optimizer, params)
        return run

    n = len(per_sample)
    return [
        interleave(Pair("update, recompute_old_logprobs (stage) vs without (bare)", n,
                        "update_step"), updating(True), updating(False), repeats, device),
        interleave(Pair("self-confidence, merge_lora (stage) vs unmerged (bare)", n,
                        "score_rollout"), scoring(True), scoring(False), repeats, device),
    ]


def run_onpolicy(cfg: Config, gpu_cfg: Config, prompts: list[str], repeats: int,
                 threads: int) -> dict:
    """The two option ratios on the config's model and on the SD3.5-M CPU smoke shape."""
    from bench.gpu_mode import gpu_config, sd35m_model

    torch.set_num_threads(threads)
    out = {"threads": threads, "repeats": repeats, "models": {}}
    out["models"][cfg.model.path] = [p.summary() for p in option_pairs(
        tiny_model(cfg, threads), cfg, prompts, repeats)]
    scfg, shape, text_len, device = gpu_config(gpu_cfg, on_gpu=False)
    label = "SD3.5-M shape, CPU smoke size"
    out["models"][label] = [p.summary() for p in option_pairs(
        sd35m_model(scfg, shape, text_len, device), scfg, ["prompt 0"], repeats)]
    return out


def console(results: dict) -> str:
    lines = [f"on-policy options, {results['threads']} thread(s), {results['repeats']} "
             "interleaved pairs; ratio = t_without / t_with (median [min-max])"]
    for model, pairs in results["models"].items():
        for p in pairs:
            r = p["ratio"]
            lines.append(f"  {model}: {p['name']}: {statistics.median(r):.2f} "
                         f"[{min(r):.2f}-{max(r):.2f}]")
    return "\n".join(lines)
