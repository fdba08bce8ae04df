"""The memory model per actor role: ``python -m bench memory [--gpu-config PRESET]``.

For a config, what each role holds on its GPU at the config's batch sizes:

* **weights**: every component the role loads, built on the meta device from its config
  (the published SD3.5-M configs in ``bench.memtrace``, or a local model's own config
  files), in the run's dtype, the LoRA attached as the actors attach it;
* **activations**: the peak of the tensors the role's largest call creates, counted on
  fake tensors at the full shape (``bench.memtrace.traced_peak``: no compute, nothing
  downloaded), through the functions the actors call: ``predict_velocity`` with CFG,
  the adapter-disabled reference forward, the backward with or without gradient
  checkpointing, ``vae.decode``, the text encoders;
* **buffers**: latents a role keeps through a call (trajectories, probes, the learner's
  shard) and the learner's DeepSpeed ZeRO state: fp32 master weights, Adam's two moments
  and the fp32 gradient partition (each over the ranks), and the reduce bucket.

The total is checked against the GPU of the node type ``ray_cluster.yaml`` gives the
role, with :data:`REQUIRED_MARGIN` of the GPU left free for what the model does not
count: the CUDA context, cuBLAS/cuDNN workspaces and allocator fragmentation
(``python -m bench.gpu_check`` measures peaks on a GPU, to check the model there).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml

from bench.memtrace import GIB, build_fake, fake_mode, numel, resident_bytes, traced_peak
from learner.config import Config
from policy.pipeline import DTYPES, adapter_disabled, add_lora
from policy.sampler import Conditioning, predict_velocity

SD35M_HUB_ID = "stabilityai/stable-diffusion-3.5-medium"
REQUIRED_MARGIN = 0.15  # share of a GPU's memory left free (module docstring)
CLIP_TOKENS = 77  # SD3's joint text sequence: 77 CLIP tokens, then the T5 slots
PROMPT_ENCODER_BATCH = 64  # actors.text.PromptEncoder.build encodes 64 prompts at a time
# DeepSpeed's ZeRO default reduce_bucket_size (elements); ZeRO-2 allocates one bucket of it
# in the gradient dtype (deepspeed/runtime/zero/stage_1_and_2.py, setup_buckets).
REDUCE_BUCKET = 500_000_000
# Per-GPU memory of the instance types (AWS's instance-type pages).
INSTANCE_GPUS = {
    "g5.xlarge": ("A10G", 24), "g5.2xlarge": ("A10G", 24), "g5.4xlarge": ("A10G", 24),
    "g6.2xlarge": ("L4", 24), "g6e.2xlarge": ("L40S", 48),
    "p4d.24xlarge": ("A100 40GB", 40), "p4de.24xlarge": ("A100 80GB", 80),
    "p5.48xlarge": ("H100 80GB", 80),
}


@dataclass
class Role:
    """What one actor role holds on its GPU (bytes), and the GPU it gets."""

    name: str
    weights: dict[str, int] = field(default_factory=dict)
    activations: dict[str, int] = field(default_factory=dict)  # one per kind of call
    buffers: dict[str, int] = field(default_factory=dict)
    node_type: str | None = None
    gpu: str | None = None
    gpu_gib: float | None = None

    @property
    def total(self) -> int:
        # A role's calls run one after another: its peak is the largest one's.
        return (sum(self.weights.values()) + max(self.activations.values(), default=0)
                + sum(self.buffers.values()))

    def margin(self) -> float | None:
        return None if self.gpu_gib is None else 1 - self.total / (self.gpu_gib * GIB)

    def summary(self) -> dict:
        return asdict(self) | {"total": self.total, "margin": self.margin()}


# -- the components ----------------------------------------------------------------------------

class Components:
    """Shape-only (fake) components of the config's model, in the run's dtype."""

    def __init__(self, cfg: Config):
        from diffusers import AutoencoderKL, SD3Transformer2DModel

        from bench.memtrace import sd35m_vae, text_encoders

        self.cfg, self.dtype, self.mode = cfg, DTYPES[cfg.model.dtype], fake_mode()
        path = Path(cfg.model.path)
        if cfg.model.path == SD35M_HUB_ID:
            from bench.gpu_mode import SD35M_SHAPE

            self.transformer_config = dict(SD35M_SHAPE)
            vae, encoders = sd35m_vae(self.dtype), text_encoders(self.dtype)
        elif (path / "model_index.json").is_file():
            self.transformer_config = dict(SD3Transformer2DModel.load_config(path / "transformer"))
            vae_config = AutoencoderKL.load_config(path / "vae")
            vae = lambda: AutoencoderKL.from_config(vae_config).to(self.dtype)  # noqa: E731
            encoders = local_text_encoders(path, self.dtype)
        else:
            raise ValueError(f"model.path {cfg.model.path!r}: the memory model knows "
                             f"{SD35M_HUB_ID!r} and local diffusers directories")
        self.encoders = {name: build_fake(make, self.mode) for name, make in encoders.items()}
        self.vae = build_fake(vae, self.mode)
        self.policy = self.transformer(trainable=False)

    @classmethod
    def from_shape(cls, cfg: Config, shape: dict) -> Components:
        """A transformer of ``shape`` alone, no VAE or text encoders (the GPU check's)."""
        self = cls.__new__(cls)
        self.cfg, self.dtype, self.mode = cfg, DTYPES[cfg.model.dtype], fake_mode()
        self.transformer_config, self.encoders, self.vae = dict(shape), {}, None
        self.policy = self.transformer(trainable=False)
        return self

    def transformer(self, trainable: bool, checkpointing: bool = False) -> torch.nn.Module:
        """The transformer with the run's LoRA, trainable (the learner) or frozen."""
        from diffusers import SD3Transformer2DModel

        def make():
            t = SD3Transformer2DModel.from_config(self.transformer_config).to(self.dtype)
            t.requires_grad_(False)
            names = set(add_lora(t, self.cfg.lora.spec(self.cfg.seed)))
            for name, p in t.named_parameters():
                p.requires_grad_(trainable and name in names)
            return t
        t = build_fake(make, self.mode)
        if checkpointing:
            t.enable_gradient_checkpointing()
        return t

    def latent_shape(self) -> tuple[int, int]:
        """(channels, side) of the latents at ``sampler.resolution``."""
        config = self.policy.config
        side = config.sample_size
        if self.cfg.sampler.resolution is not None:
            side = self.cfg.sampler.resolution // 2 ** (len(self.vae.config.block_out_channels) - 1)
        return config.in_channels, side

    def cond(self, batch: int) -> Conditioning:
        """Conditioning of ``batch`` prompts: the joint text sequence and the pooled vector."""
        c = self.policy.config
        length = self.clip_tokens() + self.cfg.model.max_sequence_length
        return Conditioning(torch.zeros(batch, length, c.joint_attention_dim, dtype=self.dtype),
                            torch.zeros(batch, c.pooled_projection_dim, dtype=self.dtype))

    def clip_tokens(self) -> int:
        """CLIP's share of the joint text sequence: 77 for SD3, a tiny model's own less."""
        clips = [e.config.max_position_embeddings for e in self.encoders.values()
                 if "CLIP" in type(e).__name__]
        return min([CLIP_TOKENS, *clips])

    def latents(self, batch: int) -> torch.Tensor:
        channels, side = self.latent_shape()
        return torch.zeros(batch, channels, side, side)  # fp32, as the sampler keeps them


def local_text_encoders(path: Path, dtype: torch.dtype) -> dict:
    """Makers of a local pipeline's text encoders, from their config files."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    out = {}
    for name, (config_cls, model_cls) in {
            "text_encoder": (CLIPTextConfig, CLIPTextModelWithProjection),
            "text_encoder_2": (CLIPTextConfig, CLIPTextModelWithProjection),
            "text_encoder_3": (T5Config, T5EncoderModel)}.items():
        file = path / name / "config.json"
        if file.is_file():
            config = config_cls.from_dict(json.loads(file.read_text()))
            out[name] = lambda c=config, m=model_cls: m(c).to(dtype)
    return out


# -- the calls ----------------------------------------------------------------------------------

def forward_peak(c: Components, batch: int, guidance: float) -> int:
    """A no-grad velocity of ``batch`` latents (CFG doubles the forward's batch)."""
    def run():
        with torch.no_grad():
            negative = c.cond(1) if guidance != 1.0 else None
            return predict_velocity(c.policy, c.latents(batch), torch.full((batch,), 0.5),
                                    c.cond(batch), negative, guidance)
    return traced_peak(run, c.mode)


def train_peak(c: Components, transformer: torch.nn.Module, batch: int, guidance: float,
               reference: bool) -> int:
    """One training term of ``learner.update``: the policy's velocity with grad, the
    adapter-disabled reference without (while the graph is alive), then the backward."""
    def run():
        negative = c.cond(1) if guidance != 1.0 else None
        x, sigma, cond = c.latents(batch), torch.full((batch,), 0.5), c.cond(batch)
        v = predict_velocity(transformer, x, sigma, cond, negative, guidance)
        if reference:
            with torch.no_grad(), adapter_disabled(transformer):
                ref = predict_velocity(transformer, x, sigma, cond, negative, guidance)
            v = v - ref
        v.square().mean().backward()
    return traced_peak(run, c.mode)


def decode_peak(c: Components, batch: int) -> int:
    """``vae.decode`` of ``batch`` latents at once (policy.sampler.decode_latents)."""
    def run():
        with torch.no_grad():
            z = c.latents(batch).to(c.dtype)
            images = c.vae.decode(z, return_dict=False)[0]
            return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return traced_peak(run, c.mode)


def encode_peak(c: Components, batch: int) -> int:
    """The text encoders on ``batch`` prompts, as diffusers' SD3 encode_prompt runs them:
    CLIP with every hidden state kept, T5 at ``max_sequence_length`` tokens."""
    def run():
        with torch.no_grad():
            kept = []
            for encoder in c.encoders.values():
                t5 = "T5" in type(encoder).__name__
                length = c.cfg.model.max_sequence_length if t5 else c.clip_tokens()
                ids = torch.zeros(batch, length, dtype=torch.long)
                out = encoder(ids) if t5 else encoder(ids, output_hidden_states=True)
                kept.append(out[0] if t5 else out.hidden_states[-2])
            return kept
    return traced_peak(run, c.mode)


# -- the roles ----------------------------------------------------------------------------------

def weights(c: Components, text: bool, vae: bool = True, transformer: bool = True) -> dict[str, int]:
    out = {}
    if transformer:
        out["transformer + LoRA"] = resident_bytes(c.policy)
    if vae:
        out["VAE"] = resident_bytes(c.vae)
    if text:
        out["text encoders"] = sum(resident_bytes(e) for e in c.encoders.values())
    return out


def roles(cfg: Config) -> list[Role]:
    """Every role of a run of ``cfg``, its weights, largest calls and buffers."""
    c = Components(cfg)
    gr, sc, ro, sampler = cfg.grpo, cfg.self_confidence, cfg.rollout, cfg.sampler
    text = not cfg.model.prompt_table  # without the table every actor loads the encoders
    channels, side = c.latent_shape()
    latent_bytes = channels * side * side * 4  # one fp32 latent
    steps = sampler.num_steps + 1  # latents a trajectory keeps
    call = math.ceil(gr.prompts_per_step / ro.num_actors) * gr.group_size  # samples a call
    chunk = min(ro.micro_batch or call, call)
    eval_batch = ro.micro_batch or 32
    grid_decode = min(ro.decode_batch or call, call)  # images decoded at once
    eval_decode = min(ro.decode_batch or eval_batch, eval_batch)

    rollout = Role("rollout", weights(c, text))
    rollout.activations = {
        f"sampling forward ({chunk} x {2 if sampler.guidance_scale != 1 else 1} CFG)":
            forward_peak(c, chunk, sampler.guidance_scale),
        f"evaluation forward ({eval_batch} x CFG)": forward_peak(c, eval_batch,
                                                                 sampler.guidance_scale),
        f"sample grid / evaluation: decode {max(grid_decode, eval_decode)} images at once":
            decode_peak(c, max(grid_decode, eval_decode))}
    # the chunk's noise and trajectory as a list and stacked, and the call's earlier chunks
    rollout.buffers = {f"trajectories ({call} x {steps} latents, up to 3 copies)":
                       3 * call * steps * latent_bytes}

    probes = sc.num_probes * gr.group_size
    probe_batch = min(sc.micro_batch or probes, probes)
    reward = Role("self-confidence reward", weights(c, text))
    reward.activations = {f"probe forward ({probe_batch} latents)": forward_peak(c, probe_batch, 1.0)}
    reward.buffers = {f"rollout + probed latents ({call} + 2 x {probes})":
                      (call * steps + 2 * probes) * latent_bytes}

    learner = Role(f"learner rank (1 of {cfg.learner.num_ranks})", weights(c, text))
    trainable = c.transformer(trainable=True, checkpointing=cfg.learner.gradient_checkpointing)
    ckpt = "with" if cfg.learner.gradient_checkpointing else "without"
    learner.activations = {
        f"train forward + backward ({gr.micro_batch} x CFG, {ckpt} checkpointing"
        f"{', + reference' if gr.beta > 0 else ''})":
            train_peak(c, trainable, gr.micro_batch, sampler.guidance_scale, gr.beta > 0)}
    if cfg.learner.recompute_old_logprobs:
        learner.activations["recompute old log-probs (no grad)"] = forward_peak(
            c, gr.micro_batch, sampler.guidance_scale)
    shard = math.ceil(gr.prompts_per_step * gr.group_size / cfg.learner.num_ranks)
    learner.buffers = {f"rollout shard ({shard} x {steps} latents)": shard * steps * latent_bytes}
    learner.buffers.update(zero_state(numel(trainable, trainable=True), cfg))

    external = Role("external-reward (VAE only)", weights(c, False, transformer=False))
    external.activations = {f"decode {grid_decode} images at once": decode_peak(c, grid_decode)}
    external.buffers = {"scorer model": 0}  # the scorer's own: not known to the model

    encoder = Role("prompt encoder", {"text encoders": weights(c, True, False, False)[
        "text encoders"]})
    encoder.activations = {f"encode {PROMPT_ENCODER_BATCH} prompts":
                           encode_peak(c, PROMPT_ENCODER_BATCH)}
    return [rollout, reward, learner, external, encoder]


def zero_state(trainable: int, cfg: Config) -> dict[str, int]:
    """DeepSpeed's state of the LoRA on one rank: ZeRO >= 1 partitions the fp32 master
    weights, Adam's moments and (ZeRO-2) the fp32 gradients over the ranks; ZeRO-2 keeps
    one reduce bucket in the gradient dtype."""
    ranks, stage = cfg.learner.num_ranks, cfg.learner.zero_stage
    half = cfg.model.dtype != "float32"
    share = 1 / ranks if stage >= 1 else 1.0
    out = {"Adam moments (fp32, 2 per weight)": int(8 * trainable * share)}
    if half:
        out["fp32 master weights"] = int(4 * trainable * share)
    out["gradients"] = int((4 if half and stage >= 2 else DTYPES[cfg.model.dtype].itemsize)
                           * trainable * (1 / ranks if stage >= 2 else 1.0))
    if stage == 2:
        out["ZeRO-2 reduce bucket"] = REDUCE_BUCKET * DTYPES[cfg.model.dtype].itemsize
    return out


# -- the cluster --------------------------------------------------------------------------------

ROLE_RESOURCE = {"rollout": "rollout", "self-confidence reward": "reward", "learner": "learner",
                 "prompt encoder": "rollout"}


def place(roles_: list[Role], cluster: Path) -> None:
    """Give each role the GPU of the node type with its custom resource; an external
    reward (no custom resource) the smallest GPU of the cluster."""
    types = yaml.safe_load(cluster.read_text())["available_node_types"]
    gpus = {}
    for name, t in types.items():
        instance = t.get("node_config", {}).get("InstanceType")
        if t.get("resources", {}).get("GPU") and instance in INSTANCE_GPUS:
            gpus[name] = (t["resources"], *INSTANCE_GPUS[instance])
    for role in roles_:
        key = next((v for k, v in ROLE_RESOURCE.items() if role.name.startswith(k)), None)
        found = [(n, g, gib) for n, (res, g, gib) in gpus.items() if key and key in res]
        if not found:  # no custom resource: any GPU node; check the smallest
            found = sorted(((n, g, gib) for n, (_, g, gib) in gpus.items()), key=lambda x: x[2])
        if found:
            role.node_type, role.gpu, role.gpu_gib = found[0]


def run_memory(cfg: Config, config_path: Path, cluster: Path | None = None) -> dict:
    """The memory model of ``cfg`` on ``cluster`` (default: the repository's ray_cluster.yaml)."""
    root = Path(__file__).resolve().parents[1]
    cluster = cluster or root / "ray_cluster.yaml"
    rs = roles(cfg)
    place(rs, cluster)

    def shown(path: Path) -> str:  # relative to the repository when inside it
        path = Path(path).resolve()
        return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
    return {"config": shown(config_path), "cluster": shown(cluster), "dtype": cfg.model.dtype,
            "required_margin": REQUIRED_MARGIN, "roles": [r.summary() for r in rs]}


def fits(results: dict) -> bool:
    return all(r["margin"] is None or r["margin"] >= results["required_margin"]
               for r in results["roles"])


def console(results: dict) -> str:
    gib = lambda b: f"{b / GIB:6.2f}"  # noqa: E731
    lines = [f"memory per role, {results['config']} ({results['dtype']}) on "
             f"{results['cluster']}; GiB; required margin {results['required_margin']:.0%}"]
    for r in results["roles"]:
        lines.append(f"\n{r['name']}: {gib(r['total'])} GiB on {r['node_type']} "
                     f"({r['gpu']}, {r['gpu_gib']} GiB): margin "
                     + (f"{r['margin']:.0%}" if r["margin"] is not None else "-"))
        for kind in ("weights", "activations", "buffers"):
            for name, b in r[kind].items():
                lines.append(f"  {kind[:-1] if kind != 'activations' else 'call'}: {gib(b)}  {name}")
    lines.append("\nfits with the margin: " + ("yes" if fits(results) else "NO"))
    return "\n".join(lines)
