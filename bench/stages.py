"""Stage efficiencies (parts 1-3): each stage against its bare forwards, interleaved.

Every figure is a ratio measured in one process with one thread setting:

    efficiency = stage rate / bare rate = bare seconds / stage seconds

where the *stage* is what an actor runs per call (prompt encoding, the sampler with CFG
and the SDE step, ``Rollout.numpy``; the reward's probes and aggregation; the Flow-GRPO
update with log-probs, KL, loss and AdamW) and the *bare* workload is only the
transformer calls of that stage on the same batch shapes: ``T`` forwards of ``2B`` (CFG)
for sampling, ``P`` forwards of ``K G`` per group for scoring, forward+backward of ``2b``
plus the no-grad reference forward of ``2b`` per trained step and micro-batch for the
update. Bare and stage repetitions alternate (bare first on even repetitions, stage first
on odd), so machine noise hits both; each pair gives one ratio, and the table reports the
median and the min-max of those ratios.

Model FLOPs are counted with ``torch.utils.flop_counter`` on a ``meta``-device twin of the
transformer (shapes only, no compute), over the bare workload, so MFU needs no vendor
numbers beyond the peak. The stages and their bare workloads are in :mod:`bench.workloads`;
the GPU mode (part 7) runs :func:`stage_pairs` in :mod:`bench.gpu_mode`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from bench.workloads import (
    StageModel,
    advantages_of,
    bare_sampling,
    bare_scoring,
    bare_update,
    close_deepspeed,
    deepspeed_rank,
    stage_inputs,
    stage_sampling,
    stage_scoring,
    stage_update,
)
from learner.config import Config
from policy.logprob import trained_steps
from policy.pipeline import add_lora, build_pipeline
from policy.sampler import Conditioning, encode_prompts, suffix_window


@dataclass
class Pair:
    """Interleaved timings of one stage and its bare transformer workload."""

    name: str
    items: int  # images (samples) one repetition handles
    forwards: str  # what the bare workload runs, in words
    stage_s: list[float] = field(default_factory=list)
    bare_s: list[float] = field(default_factory=list)
    flops: float | None = None  # model FLOPs of one bare repetition (counted on meta)
    profile: dict = field(default_factory=dict)  # op_profile of the stage, when below target

    @property
    def ratios(self) -> list[float]:
        return [b / s for b, s in zip(self.bare_s, self.stage_s, strict=True)]

    def summary(self) -> dict:
        rates = lambda ts: [self.items / t for t in ts]  # noqa: E731
        return {"name": self.name, "items": self.items, "forwards": self.forwards,
                "stage_rate": rates(self.stage_s), "bare_rate": rates(self.bare_s),
                "ratio": self.ratios, "flops": self.flops, "profile": self.profile}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleave(pair: Pair, stage: Callable[[], object], bare: Callable[[], object],
               repeats: int, device: torch.device) -> Pair:
    """One warm-up of each, then ``repeats`` alternating (bare, stage) / (stage, bare) pairs."""
    def timed(fn):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        return time.perf_counter() - t0

    timed(bare), timed(stage)  # allocators, first-call paths
    for r in range(repeats):
        if r % 2 == 0:
            pair.bare_s.append(timed(bare))
            pair.stage_s.append(timed(stage))
        else:
            pair.stage_s.append(timed(stage))
            pair.bare_s.append(timed(bare))
    return pair


# -- models ---------------------------------------------------------------------------------

def tiny_model(cfg: Config, threads: int) -> StageModel:
    """The configured pipeline (the shipped tiny model by default) with the run's LoRA."""
    pipe = build_pipeline(cfg.model.path, cfg.model.dtype, cfg.model.device, threads)
    add_lora(pipe.transformer, cfg.lora.spec(cfg.seed))
    encode = partial(encode_prompts, pipe, max_sequence_length=cfg.model.max_sequence_length)
    return StageModel(pipe.transformer, encode, encode([""]), cfg.model.path)


def meta_twin(m: StageModel, cfg: Config) -> StageModel:
    """The same transformer (config and LoRA) on the meta device, for counting FLOPs."""
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        transformer = SD3Transformer2DModel.from_config(m.transformer.config)
    transformer.requires_grad_(False)
    add_lora(transformer, cfg.lora.spec(cfg.seed))
    ref = m.encode(["x"])
    encode = lambda ps: Conditioning(  # noqa: E731
        torch.zeros(len(ps), *ref.embeds.shape[1:], device="meta"),
        torch.zeros(len(ps), *ref.pooled.shape[1:], device="meta"))
    return StageModel(transformer, encode, encode([""]), m.label + " (meta)")


def count_flops(fn: Callable[[], object]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def op_profile(stage: Callable[[], object], bare: Callable[[], object], top: int = 8) -> dict:
    """Where a stage spends time its bare workload does not: ops by extra self time (ms)."""
    from torch.profiler import ProfilerActivity, profile

    def self_ms(fn):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            fn()
            wall = (time.perf_counter() - t0) * 1e3
        ops = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}
        ops["(outside torch ops: Python)"] = max(0.0, wall - sum(ops.values()))
        return ops, wall

    (s, s_wall), (b, b_wall) = self_ms(stage), self_ms(bare)
    extra = {k: v - b.get(k, 0.0) for k, v in s.items()}
    ops = sorted(((k, round(v, 1)) for k, v in extra.items()), key=lambda kv: -kv[1])[:top]
    return {"stage_ms": round(s_wall, 1), "bare_ms": round(b_wall, 1), "ops": ops}


# -- parts ----------------------------------------------------------------------------------

def stage_pairs(m: StageModel, cfg: Config, prompts: list[str], repeats: int,
                deepspeed: bool = False, threads: int = 1) -> list[Pair]:
    """Parts 1-3 on one model: sampler, self-confidence and update against their bare work."""
    device = m.device
    per_sample, ids, seeds = stage_inputs(cfg, prompts)
    n, g, T = len(per_sample), cfg.grpo.group_size, cfg.sampler.num_steps
    sc = cfg.self_confidence
    probe_steps = len(range(*suffix_window(T - 1, sc.probe_fraction)))

    sampling = stage_sampling(m, cfg, per_sample, ids, seeds)
    rollout = sampling()
    pairs = [interleave(Pair("sampler", n, f"{T} x fwd({2 * n}) [CFG]"), sampling,
                        bare_sampling(m, n, T), repeats, device)]

    scoring = stage_scoring(m, cfg, rollout)
    reward = scoring()
    pairs.append(interleave(
        Pair("self-confidence", n, f"{len(prompts)} groups x {probe_steps} x fwd({sc.num_probes * g})"),
        scoring, bare_scoring(m, len(prompts), g, sc.num_probes, probe_steps), repeats, device))

    steps = trained_steps(rollout.torch(), cfg.grpo.train_fraction)
    mb, ref = cfg.grpo.micro_batch, cfg.grpo.beta > 0
    words = (f"{len(steps)} steps x {-(-n // mb)} x [fwd+bwd({2 * min(n, mb)})"
             + (f" + fwd({2 * min(n, mb)}) ref]" if ref else "]"))
    bare = bare_update(m, n, mb, len(steps), ref)
    pairs.append(interleave(Pair("update (torch AdamW)", n, words),
                            stage_update(m, cfg, rollout, reward), bare, repeats, device))
    if deepspeed:  # the service's learner: a DeepSpeed rank (ZeRO stage of the config), 1 rank
        rank = deepspeed_rank(cfg, threads)
        try:
            adv, _ = advantages_of(cfg, reward, torch.device("cpu"))
            kept = np.flatnonzero(adv.keep.numpy())
            run = lambda: rank.train_step(adv.values.numpy(), kept, steps, len(kept), None, rollout)  # noqa: E731
            pairs.append(interleave(
                Pair(f"update (DeepSpeed ZeRO-{cfg.learner.zero_stage} rank)", n, words),
                # Bare on the twin module ``m``: a plain backward through the engine's module
                # would trip ZeRO's reduce-once hooks.
                run, bare_update(m, n, mb, len(steps), ref), repeats, device))
        finally:
            close_deepspeed()
            torch.set_num_threads(threads)
    twin = meta_twin(m, cfg)
    work = [bare_sampling(twin, n, T), bare_scoring(twin, len(prompts), g, sc.num_probes, probe_steps),
            bare_update(twin, n, mb, len(steps), ref)]
    for pair, fn in zip(pairs, work + [work[-1]], strict=False):
        pair.flops = count_flops(fn)
    return pairs


def profile_misses(pairs: list[Pair], m: StageModel, cfg: Config, prompts: list[str],
                   target: float) -> None:
    """For each torch stage below ``target``: the ops that make up its extra time."""
    per_sample, ids, seeds = stage_inputs(cfg, prompts)
    n, T = len(per_sample), cfg.sampler.num_steps
    sampling = stage_sampling(m, cfg, per_sample, ids, seeds)
    rollout = sampling()
    sc = cfg.self_confidence
    probe_steps = len(range(*suffix_window(T - 1, sc.probe_fraction)))
    scoring = stage_scoring(m, cfg, rollout)
    reward = scoring()
    steps = trained_steps(rollout.torch(), cfg.grpo.train_fraction)
    work = {
        "sampler": (sampling, bare_sampling(m, n, T)),
        "self-confidence": (scoring, bare_scoring(m, len(prompts), cfg.grpo.group_size,
                                                  sc.num_probes, probe_steps)),
        "update (torch AdamW)": (stage_update(m, cfg, rollout, reward),
                                 bare_update(m, n, cfg.grpo.micro_batch, len(steps),
                                             cfg.grpo.beta > 0)),
    }
    for pair in pairs:
        if pair.name in work and statistics.median(pair.ratios) < target:
            pair.profile = op_profile(*work[pair.name])


def run_stages(cfg: Config, prompts: list[str], repeats: int, threads: int,
               deepspeed: bool, target: float = 0.9) -> dict:
    """Parts 1-3 on the configured model at ``threads`` torch threads."""
    torch.set_num_threads(threads)
    m = tiny_model(cfg, threads)
    pairs = stage_pairs(m, cfg, prompts, repeats, deepspeed=deepspeed, threads=threads)
    profile_misses(pairs, m, cfg, prompts, target)
    return {"model": cfg.model.path, "threads": threads, "repeats": repeats,
            "batch": len(prompts) * cfg.grpo.group_size, "pairs": [p.summary() for p in pairs]}
