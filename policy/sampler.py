"""SDE sampling of SD3 trajectories with per-step log-probs, and the shared step.

The sampler and the training-time log-prob recompute (``policy.logprob``) both call
:func:`denoise_step`, so the on-policy ratio is exactly 1 by construction (docs/design.md
trap 1). The math is stateless: sigmas are passed in, the diffusers scheduler is never
stepped (trap 2).

Deviations from the Flow-GRPO reference sampler:

* Each sample draws its initial latent and every step's noise from its own generator,
  seeded from ``(run seed, step, prompt index, sample index)`` (trap 8), so a sample
  does not depend on what else was in its batch.
* Steps outside the SDE window, including by default the last one (whose Gaussian is
  nearly degenerate, trap 3), take a plain Euler ODE step and record log-prob 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from policy.sde import SdeType, ode_step, sde_step_with_logprob


@dataclass
class Conditioning:
    """Text conditioning of a batch: joint-attention tokens and pooled projections."""

    embeds: torch.Tensor  # [B, L, D]
    pooled: torch.Tensor  # [B, P]

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def select(self, index: torch.Tensor | slice) -> Conditioning:
        return Conditioning(self.embeds[index], self.pooled[index])

    def expand(self, batch: int) -> Conditioning:
        """Broadcast a batch-1 conditioning (the empty-prompt negative) to ``batch``."""
        if len(self) != 1:
            raise ValueError(f"expand needs a batch-1 conditioning, got batch {len(self)}")
        return Conditioning(
            self.embeds.expand(batch, -1, -1), self.pooled.expand(batch, -1)
        )

    def repeat(self, times: int) -> Conditioning:
        """``[c; c; ...]``: the batch repeated ``times`` times (probe-major order)."""
        return Conditioning(self.embeds.repeat(times, 1, 1), self.pooled.repeat(times, 1))

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        return Conditioning(
            torch.cat([p.embeds for p in parts]), torch.cat([p.pooled for p in parts])
        )


@dataclass(frozen=True)
class SamplerSpec:
    """How trajectories are sampled; every rollout records the spec it was made with."""

    num_steps: int = 10
    guidance_scale: float = 4.5
    noise_level: float = 0.7  # 0: a deterministic ODE sampler (evaluation)
    sde_type: SdeType = "sde"
    # [start, stop) of the stochastic steps; None: every step but the last.
    sde_window: tuple[int, int] | None = None
    shift: float = 3.0
    # Image side in pixels; None: the transformer's own (``sample_size`` latents).
    resolution: int | None = None

    def window(self) -> tuple[int, int]:
        """``[start, stop)`` of the stochastic steps; empty when ``noise_level == 0`` (ODE)."""
        if self.noise_level == 0:
            return 0, 0
        start, stop = self.sde_window or (0, self.num_steps - 1)
        if not 0 <= start < stop <= self.num_steps:
            raise ValueError(
                f"sde_window {self.sde_window} must satisfy 0 <= start < stop <= num_steps "
                f"({self.num_steps})"
            )
        return start, stop


@dataclass
class Rollout:
    """Trajectories of one batch of samples, as produced by :func:`sample_rollout`."""

    latents: torch.Tensor  # [B, T+1, C, H, W] fp32; latents[:, 0] is the initial noise
    log_probs: torch.Tensor  # [B, T] fp32; 0 outside the SDE window
    sigmas: torch.Tensor  # [T+1] fp32, from 1 to 0
    seeds: torch.Tensor  # [B] int64, the per-sample seeds
    prompt_ids: torch.Tensor  # [B] int64
    prompts: list[str]
    spec: SamplerSpec
    weight_version: int = 0
    extras: dict[str, object] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def final(self) -> torch.Tensor:
        """The generated latents ``z0``: ``[B, C, H, W]``."""
        return self.latents[:, -1]

    _ARRAYS = ("latents", "log_probs", "sigmas", "seeds", "prompt_ids")

    def numpy(self) -> Rollout:
        """A copy holding numpy arrays, which Ray's object store passes zero-copy."""
        arrays = {k: getattr(self, k).detach().cpu().numpy() for k in self._ARRAYS}
        return replace(self, **arrays)

    def torch(self, device: str | torch.device = "cpu") -> Rollout:
        """A copy holding torch tensors (from numpy arrays or tensors)."""
        def as_tensor(x):
            # Arrays read from Ray's object store are read-only; torch wants writable memory.
            if isinstance(x, np.ndarray) and not x.flags.writeable:
                x = x.copy()
            return torch.as_tensor(x).to(device)

        arrays = {k: as_tensor(getattr(self, k)) for k in self._ARRAYS}
        return replace(self, **arrays)

    @staticmethod
    def concat(parts: Sequence[Rollout]) -> Rollout:
        """Samples of several rollouts made with one spec and weight version, in order."""
        first = parts[0]
        for p in parts[1:]:
            if p.spec != first.spec or p.weight_version != first.weight_version:
                raise ValueError("rollouts to concatenate must share their spec and weight "
                                 f"version, got versions {[q.weight_version for q in parts]}")
        if len(parts) == 1:
            return first
        lib = torch if isinstance(first.latents, torch.Tensor) else np
        per_sample = ("latents", "log_probs", "seeds", "prompt_ids")
        arrays = {k: lib.concatenate([getattr(p, k) for p in parts]) for k in per_sample}
        return replace(first, **arrays, prompts=[x for p in parts for x in p.prompts])

    def select(self, index: torch.Tensor | slice) -> Rollout:
        """The samples at ``index`` (a torch rollout)."""
        idx = index.tolist() if isinstance(index, torch.Tensor) else range(len(self))[index]
        return replace(
            self, latents=self.latents[index], log_probs=self.log_probs[index],
            seeds=self.seeds[index], prompt_ids=self.prompt_ids[index],
            prompts=[self.prompts[i] for i in idx],
        )


def sd3_sigmas(num_steps: int, shift: float = 3.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """SD3's inference sigmas for ``num_steps`` steps, followed by 0: ``[T+1]``, 1 -> 0.

    The values ``StableDiffusion3Pipeline`` gets from
    ``FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(T)`` (no dynamic
    shifting), computed here so that no scheduler state is involved (docs/design.md trap 2).
    The scheduler spaces timesteps linearly between its largest and smallest *shifted*
    training sigma and then shifts again, so the last nonzero sigma is tiny (~0.009 at
    shift 3): the last step's Gaussian is nearly degenerate (trap 3).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")

    def shifted(s: np.ndarray | float) -> np.ndarray | float:
        return shift * s / (1.0 + (shift - 1.0) * s)

    sigma_min = shifted(1.0 / num_train_timesteps)
    s = shifted(np.linspace(1.0, sigma_min, num_steps, dtype=np.float64))
    return torch.tensor(np.append(s, 0.0), dtype=torch.float32)


def suffix_window(num_trainable: int, fraction: float) -> tuple[int, int]:
    """The last ``ceil(fraction * num_trainable)`` of steps ``0..num_trainable-1``.

    ``fraction`` is SOLACE's rho, the share of denoising steps that is trained
    (paper 0.6, official SD3 code 0.5): with 9 trainable steps, 0.5 gives [4, 9).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"window fraction must be in (0, 1], got {fraction}")
    if num_trainable < 1:
        raise ValueError(f"need at least one trainable step, got {num_trainable}")
    # 1e-9: keep 0.5 * 9 = 4.5 -> 5 robust to float error in the product.
    count = max(1, math.ceil(fraction * num_trainable - 1e-9))
    return num_trainable - count, num_trainable


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of non-negative integers ``parts``."""
    ss = np.random.SeedSequence([int(p) for p in parts])
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


# Independent seed streams of a run: one per kind of randomness.
SAMPLE_STREAM, PROBE_STREAM, EVAL_STREAM, SHUFFLE_STREAM = 0, 1, 2, 3


def sample_seed(run_seed: int, step: int, prompt_index: int, sample_index: int) -> int:
    """The seed of one sample, a pure function of where the sample sits in the run."""
    return derive_seed(run_seed, SAMPLE_STREAM, step, prompt_index, sample_index)


def eval_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The starting noise of evaluation image ``sample_index`` of prompt ``prompt_index``.

    It depends on neither the run seed nor the step: every model evaluated with the same
    ``seed`` starts from the same noise, so evaluations pair image by image.
    """
    return derive_seed(seed, EVAL_STREAM, prompt_index, sample_index)


def sample_noise(seeds: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Per-sample standard normal noise ``[B, *shape]`` from each sample's own seed (CPU)."""
    out = [
        torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s)))
        for s in seeds.tolist()
    ]
    return torch.stack(out)


@torch.no_grad()
def encode_prompts(pipe, prompts: Sequence[str], max_sequence_length: int = 256) -> Conditioning:
    """Encode prompts with the pipeline's frozen text encoders (no CFG duplication), on
    the transformer's device (the text encoder's in a pipeline without a transformer)."""
    device = (pipe.transformer if pipe.transformer is not None else pipe.text_encoder).device
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=list(prompts),
        prompt_2=None,
        prompt_3=None,
        do_classifier_free_guidance=False,
        max_sequence_length=max_sequence_length,
        device=device,
    )
    return Conditioning(embeds, pooled)


def predict_velocity(
    transformer: torch.nn.Module,
    latents: torch.Tensor,
    sigma: torch.Tensor,
    cond: Conditioning,
    negative: Conditioning | None = None,
    guidance_scale: float = 1.0,
    detach_uncond: bool = False,
) -> torch.Tensor:
    """The transformer's velocity at ``(latents, sigma)``, with CFG when ``guidance_scale > 1``.

    ``v = v_u + w (v_c - v_u)`` from one forward of the batch ``[negative; cond]``.
    ``sigma`` is ``[B]``; SD3's transformer takes ``timestep = 1000 sigma``, in fp32 whatever
    the model's dtype (bf16 would round 743.1 to 744). Returns fp32.
    ``detach_uncond`` stops the gradient through ``v_u`` (Flow-GRPO's training forward
    does; SOLACE's does not); the value is unchanged.
    """
    dtype = next(transformer.parameters()).dtype
    batch = latents.shape[0]
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=latents.device).expand(batch)
    use_cfg = guidance_scale != 1.0
    if use_cfg:
        if negative is None:
            raise ValueError("guidance_scale != 1 needs the negative (empty-prompt) conditioning")
        neg = negative.expand(batch) if len(negative) == 1 else negative
        both = Conditioning.cat([neg, cond])
        x, t = torch.cat([latents, latents]), torch.cat([sigma, sigma])
    else:
        both, x, t = cond, latents, sigma
    v = transformer(
        hidden_states=x.to(dtype),
        timestep=t * 1000.0,  # fp32, as diffusers' pipelines pass it: bf16 is off by up to ~2
        encoder_hidden_states=both.embeds.to(dtype),
        pooled_projections=both.pooled.to(dtype),
        return_dict=False,
    )[0].float()  # upcast: the SDE step and its log-prob are computed in fp32
    if not use_cfg:
        return v
    v_uncond, v_cond = v.chunk(2)
    if detach_uncond:
        v_uncond = v_uncond.detach()
    return v_uncond + guidance_scale * (v_cond - v_uncond)


def predict_x0(transformer: torch.nn.Module, latents: torch.Tensor, sigma: torch.Tensor,
               cond: Conditioning, negative: Conditioning | None, spec: SamplerSpec
               ) -> torch.Tensor:
    """The sampler's predicted clean latent at ``(latents, sigma)``: ``z - sigma v(z)``,
    with the sampler's own velocity (its CFG scale, from the empty-prompt ``negative``)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=latents.device)
    v = predict_velocity(transformer, latents, sigma.expand(latents.shape[0]), cond, negative,
                         spec.guidance_scale)
    return latents - sigma * v


def conditional_velocity(transformer: torch.nn.Module, negative: Conditioning | None = None,
                         guidance_scale: float = 1.0):
    """``velocity_fn(z_t, sigma, cond)``: without CFG by default, as the self-confidence
    reward wants; with ``guidance_scale != 1`` (and the empty-prompt ``negative``) the CFG
    field, for the ablation that shows why not."""

    def velocity_fn(z_t: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return predict_velocity(transformer, z_t, sigma, cond, negative, guidance_scale)

    return velocity_fn


def denoise_step(
    transformer: torch.nn.Module,
    latents: torch.Tensor,
    step: int,
    sigmas: torch.Tensor,
    cond: Conditioning,
    negative: Conditioning | None,
    spec: SamplerSpec,
    *,
    prev_sample: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    detach_uncond: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step ``step`` of a trajectory, shared by sampling and training.

    Returns ``(next_latents, log_prob [B], mean, std [B])``; on an ODE step (outside the
    SDE window) the log-prob is 0, the mean is the Euler step and the std is 0.
    """
    batch = latents.shape[0]
    sigma = sigmas[step].expand(batch)
    sigma_next = sigmas[step + 1].expand(batch)
    v = predict_velocity(transformer, latents, sigma, cond, negative, spec.guidance_scale,
                         detach_uncond)
    start, stop = spec.window()
    if start <= step < stop:
        return sde_step_with_logprob(
            latents, v, sigma, sigma_next, spec.noise_level,
            prev_sample=prev_sample, noise=noise, sde_type=spec.sde_type,
        )
    mean = ode_step(latents, v, sigma, sigma_next)
    zeros = torch.zeros(batch, device=latents.device)
    return mean, zeros, mean, zeros


def latent_side(pipe, resolution: int | None = None) -> int:
    """The latent side for images of ``resolution`` pixels (None: the transformer's own).

    A resolution must be a multiple of the VAE's factor times the transformer's patch
    size, and fit its positional embedding (``pos_embed_max_size`` patches a side).
    """
    config = pipe.transformer.config
    if resolution is None:
        return int(config.sample_size)
    factor = int(pipe.vae_scale_factor)
    check_resolution(resolution, factor, int(config.patch_size),
                     getattr(config, "pos_embed_max_size", None))
    return resolution // factor


def check_resolution(resolution: int, factor: int, patch: int, most: int | None) -> None:
    """Refuse a resolution the model cannot take (``latent_side``'s rule, for preflight)."""
    if resolution < 1 or resolution % (factor * patch):
        raise ValueError(f"sampler.resolution {resolution} must be a positive multiple of "
                         f"{factor * patch} (the VAE's {factor}x times the transformer's patch "
                         f"size {patch})")
    if most is not None and resolution // (factor * patch) > most:
        raise ValueError(f"sampler.resolution {resolution} is past this model's largest, "
                         f"{most * factor * patch} px ({most} patches a side)")


@torch.no_grad()
def sample_rollout(
    pipe,
    prompts: Sequence[str],
    seeds: torch.Tensor,
    spec: SamplerSpec,
    *,
    prompt_ids: torch.Tensor | None = None,
    cond: Conditioning | None = None,
    negative: Conditioning | None = None,
    max_sequence_length: int = 256,
    weight_version: int = 0,
) -> Rollout:
    """Sample one trajectory per (prompt, seed) pair with the SDE sampler and CFG.

    ``cond``/``negative`` may be passed pre-encoded; otherwise they are encoded here
    (the negative is the empty prompt). Latents stay fp32 whatever the model dtype.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds: give one seed per sample")
    transformer = pipe.transformer
    device = transformer.device
    if cond is None:
        cond = encode_prompts(pipe, prompts, max_sequence_length)
    if negative is None and spec.guidance_scale != 1.0:
        negative = encode_prompts(pipe, [""], max_sequence_length)
    sigmas = sd3_sigmas(spec.num_steps, spec.shift).to(device)
    channels = transformer.config.in_channels
    side = latent_side(pipe, spec.resolution)
    # Noise for the initial latent and every step, from each sample's own seed.
    noise = sample_noise(seeds, (spec.num_steps + 1, channels, side, side)).to(device)

    x = noise[:, 0]
    latents, log_probs = [x], []
    for j in range(spec.num_steps):
        x, log_prob, _, _ = denoise_step(
            transformer, x, j, sigmas, cond, negative, spec, noise=noise[:, j + 1]
        )
        latents.append(x)
        log_probs.append(log_prob)
    ids = prompt_ids if prompt_ids is not None else torch.arange(len(prompts))
    return Rollout(
        latents=torch.stack(latents, dim=1),
        log_probs=torch.stack(log_probs, dim=1),
        sigmas=sigmas,
        seeds=torch.as_tensor(seeds, dtype=torch.int64),
        prompt_ids=torch.as_tensor(ids, dtype=torch.int64),
        prompts=list(prompts),
        spec=spec,
        weight_version=weight_version,
    )


@torch.no_grad()
def decode_images(pipe, latents: torch.Tensor, batch: int | None = None) -> np.ndarray:
    """Decode final latents ``[B, C, H, W]`` to ``uint8`` images ``[B, H', W', 3]``;
    ``batch``: at most that many at once (SD3.5-M's VAE needs ~0.37 GiB an image at 512 px
    in bf16, python -m bench memory), None: all at once."""
    return decode_latents(pipe.vae, latents, batch)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, batch: int | None = None) -> np.ndarray:
    """:func:`decode_images` with the VAE alone (an actor that holds nothing else)."""
    if batch is not None and batch < len(latents):  # images are decoded independently
        return np.concatenate([decode_latents(vae, part) for part in latents.split(batch)])
    z = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor
    z = z + (vae.config.shift_factor or 0.0)
    images = vae.decode(z, return_dict=False)[0]
    images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()
