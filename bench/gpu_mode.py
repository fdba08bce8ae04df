"""Part 7, the GPU mode: the stages of parts 1-3 on an SD3.5-M-shaped transformer.

On a GPU: SD3.5-M's transformer shape at 512 px in bf16, random init, with random text
conditioning (its text encoders are not on this machine). Without one: a CPU smoke size,
so that the code path runs everywhere. Model FLOPs per image at the full shape are counted
on the meta device either way.
"""

from __future__ import annotations

import torch

from bench.stages import count_flops, stage_pairs
from bench.workloads import StageModel, bare_inputs, forward
from learner.config import Config
from policy.pipeline import add_lora
from policy.sampler import Conditioning, suffix_window

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
# bf16 matrix throughput of an H100 as docs/design.md section 7 counts it (the spec sheet says 989
# dense); H200 has the same tensor cores.
PEAK_FLOPS = {"H100": 790e12, "H200": 790e12}


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


def gpu_config(cfg: Config, on_gpu: bool) -> tuple[Config, dict, int, str]:
    """The GPU mode's config, transformer shape, text length and device.

    On a GPU: SD3.5-M's shape at 512 px in bf16 with the SD3.5-M preset's batch sizes.
    Without one: the CPU smoke size, so that the code path runs everywhere.
    """
    # The shapes' own sample_size sets the image size (64 latents = the preset's 512 px):
    # sampler.resolution would ask a VAE, which the stage model does not have.
    native = cfg.sampler.model_copy(update={"resolution": None})
    if on_gpu:
        text_len = CLIP_TOKENS + cfg.model.max_sequence_length
        return cfg.model_copy(update={"model": cfg.model.model_copy(
            update={"device": "cuda", "dtype": "bfloat16"}), "sampler": native}), \
            SD35M_SHAPE, text_len, "cuda"
    small = {"grpo": cfg.grpo.model_copy(update={"group_size": 2, "micro_batch": 2}),
             "sampler": native.model_copy(update={"num_steps": 4}),
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
    fwd = count_flops(lambda: forward(m.transformer, *bare_inputs(m, 1)))
    fwd_bwd = count_flops(
        lambda: forward(m.transformer, *bare_inputs(m, 1)).float().sum().backward())
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
