"""Stage efficiencies (parts 1-3) and the GPU mode (part 7): each stage against its bare forwards.

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
numbers beyond the peak.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from types import SimpleNamespace

import numpy as np
import torch

from learner.config import Config
from learner.grpo import combine_advantages
from learner.sequential import Batch, update_step
from policy.logprob import trained_steps
from policy.pipeline import add_lora, build_pipeline
from policy.sampler import Conditioning, Rollout, encode_prompts, sample_rollout, suffix_window
from rewards.self_confidence import score_rollout

# SD3.5-Medium's transformer (diffusers config of stabilityai/stable-diffusion-3.5-medium),
# with sample_size 64: 512 px images are 64x64 latents.
SD35M_SHAPE = dict(
    sample_size=64, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
    attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
    caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
# The CPU smoke size of the GPU mode: 2 layers (one dual), 4 heads x 64, 64 px, 16 text tokens.
SD35M_CPU_SHAPE = dict(SD35M_SHAPE, num_layers=2, num_attention_heads=4,
                       caption_projection_dim=256, dual_attention_layers=(0,), sample_size=8)
CLIP_TOKENS = 77  # SD3's joint text sequence is 77 CLIP tokens followed by the T5 tokens
# bf16 matrix throughput of an H100 as DESIGN.md section 7 counts it (the spec sheet says 989
# dense); H200 has the same tensor cores.
PEAK_FLOPS = {"H100": 790e12, "H200": 790e12}


@dataclass
class StageModel:
    """A transformer with LoRA, how a stage encodes prompts, and the CFG negative."""

    transformer: torch.nn.Module
    encode: Callable[[list[str]], Conditioning]
    negative: Conditioning
    label: str

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def pipe(self) -> SimpleNamespace:
        """What ``sample_rollout``/``update_step`` read of a pipeline when given conditioning."""
        return SimpleNamespace(transformer=self.transformer)


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


# -- the bare workloads: only the transformer calls of each stage --------------------------

def forward(transformer: torch.nn.Module, x: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    t = torch.full((x.shape[0],), 500.0, dtype=x.dtype, device=x.device)
    return transformer(hidden_states=x, timestep=t, encoder_hidden_states=cond.embeds,
                       pooled_projections=cond.pooled, return_dict=False)[0]


def _inputs(m: StageModel, batch: int) -> tuple[torch.Tensor, Conditioning]:
    cfg = m.transformer.config
    dtype = next(m.transformer.parameters()).dtype
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size,
                    device=m.device).to(dtype)
    c = m.encode(["a photo of a red circle"] * batch)
    return x, Conditioning(c.embeds.to(dtype), c.pooled.to(dtype))


def bare_sampling(m: StageModel, batch: int, steps: int) -> Callable[[], None]:
    x, c = _inputs(m, 2 * batch)  # CFG: one forward of [negative; cond]

    @torch.no_grad()
    def run():
        for _ in range(steps):
            forward(m.transformer, x, c)
    return run


def bare_scoring(m: StageModel, groups: int, group_size: int, probes: int,
                 probe_steps: int) -> Callable[[], None]:
    x, c = _inputs(m, probes * group_size)  # one K*G forward per group and probe step

    @torch.no_grad()
    def run():
        for _ in range(groups * probe_steps):
            forward(m.transformer, x, c)
    return run


def bare_update(m: StageModel, batch: int, micro_batch: int, steps: int,
                reference: bool) -> Callable[[], None]:
    chunks = [len(c) for c in torch.arange(batch).split(micro_batch)]
    inputs = {b: _inputs(m, 2 * b) for b in set(chunks)}  # CFG in the training forward too
    params = [p for p in m.transformer.parameters() if p.requires_grad]

    def run():
        for _ in range(steps):
            for b in chunks:
                x, c = inputs[b]
                forward(m.transformer, x, c).float().square().mean().backward()
                if reference:  # the KL reference forward, without grad
                    with torch.no_grad():
                        forward(m.transformer, x, c)
        for p in params:
            p.grad = None
    return run


# -- the stages, as the actors and the learner run them ------------------------------------

def stage_inputs(cfg: Config, prompts: list[str]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    g = cfg.grpo.group_size
    per_sample = [p for p in prompts for _ in range(g)]
    ids = torch.arange(len(prompts)).repeat_interleave(g)
    seeds = torch.arange(len(per_sample)) + 1000 * cfg.seed
    return per_sample, ids, seeds


def stage_sampling(m: StageModel, cfg: Config, prompts, ids, seeds) -> Callable[[], Rollout]:
    spec = cfg.sampler.spec()

    def run():  # RolloutWorker.sample: encode, sample with CFG, hand back numpy
        cond = m.encode(prompts)
        return sample_rollout(m.pipe, prompts, seeds, spec, prompt_ids=ids, cond=cond,
                              negative=m.negative).numpy()
    return run


def stage_scoring(m: StageModel, cfg: Config, rollout: Rollout) -> Callable[[], torch.Tensor]:
    sc = cfg.self_confidence

    def run():  # SelfConfidenceWorker.score, the version already loaded
        r = rollout.torch(m.device)
        cond = m.encode(r.prompts)
        reward, _ = score_rollout(m.transformer, r, cond, cfg.seed, sc.num_probes,
                                  sc.probe_fraction, sc.delta, sc.aggregation)
        return reward
    return run


def advantages_of(cfg: Config, reward: torch.Tensor, device: torch.device):
    group_ids = torch.arange(len(reward)) // cfg.grpo.group_size
    gr = cfg.grpo
    adv = combine_advantages({"sc": reward.cpu()}, {"sc": 1.0}, group_ids, gr.combine,
                             gr.std_mode, gr.adv_clip, gr.adv_eps)
    return replace(adv, values=adv.values.to(device)), group_ids


def stage_update(m: StageModel, cfg: Config, rollout: Rollout, reward: torch.Tensor):
    """``learner.sequential.update_step``: accumulate over the step, clip, one AdamW step."""
    adv, group_ids = advantages_of(cfg, reward, m.device)
    params = [p for p in m.transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.grpo.lr, weight_decay=cfg.grpo.weight_decay)

    def run():
        r = rollout.torch(m.device)
        batch = Batch(r, m.encode(r.prompts), group_ids)
        return update_step(m.pipe, cfg, batch, adv, m.negative, optimizer, params)
    return run


DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_saved_env: dict[str, str | None] = {}  # their values before deepspeed_rank


def deepspeed_rank(cfg: Config, threads: int):
    """A one-rank ``LearnerRank`` in this process (gloo on 127.0.0.1), as the service builds it.

    ``connect`` sets the process-group variables in ``os.environ``; :func:`close_deepspeed`
    restores them, so that Ray workers started later from this process do not inherit them.
    """
    from learner.engine import LearnerRank, find_free_port

    _saved_env.update({k: os.environ.get(k) for k in DIST_ENV})
    m = cfg.model
    rank = LearnerRank(0, 1, lora=cfg.lora.spec(cfg.seed), grpo=cfg.grpo, model_path=m.path,
                       dtype=m.dtype, device=m.device, num_threads=threads,
                       zero_stage=cfg.learner.zero_stage, max_sequence_length=m.max_sequence_length)
    rank.connect("127.0.0.1", find_free_port())
    return rank


def close_deepspeed() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    for key, value in _saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _saved_env.clear()


# -- models ---------------------------------------------------------------------------------

def tiny_model(cfg: Config, threads: int) -> StageModel:
    """The configured pipeline (the shipped tiny model by default) with the run's LoRA."""
    pipe = build_pipeline(cfg.model.path, cfg.model.dtype, cfg.model.device, threads)
    add_lora(pipe.transformer, cfg.lora.spec(cfg.seed))
    encode = partial(encode_prompts, pipe, max_sequence_length=cfg.model.max_sequence_length)
    return StageModel(pipe.transformer, encode, encode([""]), cfg.model.path)


def random_text(text_len: int, joint_dim: int, pooled_dim: int, device, dtype):
    """Conditioning of random numbers: SD3.5-M's text encoders are not on this machine.

    Drawn once per batch size and reused, so "encoding" costs nothing in the stages.
    """
    cache: dict[int, Conditioning] = {}

    def encode(prompts: list[str]) -> Conditioning:
        n = len(prompts)
        if n not in cache:
            g = torch.Generator().manual_seed(n)
            embeds = torch.randn(n, text_len, joint_dim, generator=g)
            pooled = torch.randn(n, pooled_dim, generator=g)
            cache[n] = Conditioning(embeds.to(device, dtype), pooled.to(device, dtype))
        return cache[n]
    return encode


def sd35m_model(cfg: Config, shape: dict, text_len: int, device: str) -> StageModel:
    """A randomly initialised SD3.5-M-shaped transformer with the config's LoRA."""
    from diffusers import SD3Transformer2DModel

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.model.dtype]
    torch.manual_seed(cfg.seed)
    with torch.device(device):
        transformer = SD3Transformer2DModel(**shape)
    if dtype != torch.float32:
        transformer.to(dtype)
    transformer.requires_grad_(False)
    add_lora(transformer, cfg.lora.spec(cfg.seed))  # peft keeps the adapter in fp32, as the actors do
    encode = random_text(text_len, shape["joint_attention_dim"], shape["pooled_projection_dim"],
                         device, dtype)
    return StageModel(transformer, encode, encode([""]), "SD3.5-M shape, random init")


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


def gpu_config(cfg: Config, on_gpu: bool) -> tuple[Config, dict, int, str]:
    """The GPU mode's config, transformer shape, text length and device.

    On a GPU: SD3.5-M's shape at 512 px in bf16 with the SD3.5-M preset's batch sizes.
    Without one: the CPU smoke size, so that the code path runs everywhere.
    """
    if on_gpu:
        text_len = CLIP_TOKENS + cfg.model.max_sequence_length
        return cfg.model_copy(update={"model": cfg.model.model_copy(
            update={"device": "cuda", "dtype": "bfloat16"})}), SD35M_SHAPE, text_len, "cuda"
    small = {"grpo": cfg.grpo.model_copy(update={"group_size": 2, "micro_batch": 2}),
             "sampler": cfg.sampler.model_copy(update={"num_steps": 4}),
             "self_confidence": cfg.self_confidence.model_copy(update={"num_probes": 2}),
             "model": cfg.model.model_copy(update={"device": "cpu", "dtype": "float32"})}
    return cfg.model_copy(update=small), SD35M_CPU_SHAPE, 16, "cpu"


def per_image_flops(cfg: Config, shape: dict, text_len: int) -> dict[str, float]:
    """Model FLOPs per trained image of each stage at ``shape``, counted on the meta device.

    One forward and one forward+backward of a single image are counted (FLOPs are linear
    in the batch) and multiplied out: sampling ``T x 2`` forwards (CFG), scoring ``K x P``
    forwards, the update ``2`` forward+backward (CFG) plus ``2`` reference forwards per
    trained step.
    """
    meta_cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"dtype": "float32"})})
    m = sd35m_model(meta_cfg, shape, text_len, "meta")
    fwd = count_flops(lambda: forward(m.transformer, *_inputs(m, 1)))
    fwd_bwd = count_flops(lambda: forward(m.transformer, *_inputs(m, 1)).float().sum().backward())
    T, sc = cfg.sampler.num_steps, cfg.self_confidence
    probe_steps = len(range(*suffix_window(T - 1, sc.probe_fraction)))
    start, stop = cfg.sampler.spec().window()
    steps = len(range(*suffix_window(stop - start, cfg.grpo.train_fraction)))
    cfg_factor = 2 if cfg.sampler.guidance_scale != 1.0 else 1
    return {"sampler": T * cfg_factor * fwd, "self-confidence": sc.num_probes * probe_steps * fwd,
            "update": steps * cfg_factor * (fwd_bwd + (fwd if cfg.grpo.beta > 0 else 0.0)),
            "forward": fwd, "forward_backward": fwd_bwd,
            "params": float(sum(p.numel() for p in m.transformer.parameters()))}


def run_gpu_mode(cfg: Config, repeats: int, threads: int) -> dict:
    """Part 7: the stages on an SD3.5-M-shaped transformer; on CPU at the smoke size.

    ``cfg`` is the SD3.5-M preset: one rollout call holds ``prompts_per_step /
    rollout.num_actors`` prompts of ``group_size`` samples, as in the service.
    """
    on_gpu = torch.cuda.is_available()
    gcfg, shape, text_len, device = gpu_config(cfg, on_gpu)
    prompts_per_call = max(1, cfg.grpo.prompts_per_step // cfg.rollout.num_actors) if on_gpu else 1
    torch.set_num_threads(threads)
    m = sd35m_model(gcfg, shape, text_len, device)
    prompts = [f"prompt {i}" for i in range(prompts_per_call)]
    pairs = stage_pairs(m, gcfg, prompts, repeats)
    peak = None
    name = "cpu"
    if on_gpu:
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    full_text = CLIP_TOKENS + cfg.model.max_sequence_length
    return {
        "measured_on_gpu": on_gpu, "device_name": name, "peak_flops": peak,
        "shape": {k: list(v) if isinstance(v, tuple) else v for k, v in shape.items()},
        "text_len": text_len, "batch": len(prompts) * gcfg.grpo.group_size,
        "steps": gcfg.sampler.num_steps, "probes": gcfg.self_confidence.num_probes,
        "pairs": [p.summary() for p in pairs],
        "full_shape_flops": per_image_flops(cfg, SD35M_SHAPE, full_text),
        "full_text_len": full_text,
    }
