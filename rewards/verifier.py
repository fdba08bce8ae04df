"""Self-confidence as a verifier at inference: best-of-N, with optional early rejection.

    python -m actors.verify --model models/tiny-shapes-sd3 --n 8 \\
        --prompt "a photo of two circles" --prompt "a photo of a red star" --out best/

(``actors.verify`` runs it in this process, or spread over Ray actors with ``--actors``.)

For every prompt, :func:`best_of_n` samples ``n`` candidates, scores each with the
model's own self-confidence (the training reward of docs/design.md section 4: re-noise
the generated latent at the probe steps and measure, without CFG, how well the model
recovers the noise) and keeps the most confident one. No external model is needed: the
verifier is the generator.

**Early rejection** (``early_step=j``, ``keep=m``): every candidate is denoised to step
``j`` only; its predicted clean latent there, ``x0 = z_j - sigma_j v(z_j)``, is scored the
same way, and only the ``m`` most confident candidates are denoised to the end and scored
again; the best of those is kept. The ``n - m`` rejected candidates cost ``j`` sampling
steps instead of ``T``.

Compute is counted in transformer forwards of one image (:func:`forwards_per_image`): a
sampling step is 2 with CFG, a self-confidence score is ``K x P`` (probes x probe steps).
Whether picking by self-confidence helps is measured in docs/verifier.md
(``python -m studies.best_of_n``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from policy.sampler import (
    PROBE_STREAM,
    Conditioning,
    SamplerSpec,
    conditional_velocity,
    decode_images,
    denoise_step,
    derive_seed,
    encode_prompts,
    latent_side,
    predict_x0,
    sample_noise,
    sd3_sigmas,
    suffix_window,
)
from rewards.self_confidence import Aggregation, self_confidence

VERIFY_STREAM = 4  # seed stream of the candidates (0-3: sampling, probes, eval, shuffle)


@dataclass(frozen=True)
class VerifierSpec:
    """How candidates are scored: the self-confidence reward's own knobs."""

    num_probes: int = 8  # K, antithetic pairs
    probe_fraction: float = 0.5  # the suffix window of probe steps (rho)
    delta: float = 1e-6
    aggregation: Aggregation = "paper"

    def probe_steps(self, num_steps: int) -> int:
        start, stop = suffix_window(num_steps - 1, self.probe_fraction)
        return stop - start


@dataclass
class BestOfN:
    """The outcome for ``P`` prompts of ``n`` candidates each."""

    images: np.ndarray  # uint8 [P, H, W, 3]: the chosen candidate of each prompt
    chosen: np.ndarray  # int [P]: its index among the prompt's candidates
    scores: np.ndarray  # float [P, n]: final self-confidence (NaN: rejected early)
    early: np.ndarray | None  # float [P, n]: the score at early_step (None: no early rejection)
    seeds: np.ndarray  # int [P, n]: each candidate's seed
    forwards: float  # transformer forwards of one image spent per returned image
    candidates: np.ndarray | None = None  # uint8 [P, n, H, W, 3] with keep_all (no rejection)


def pick(scores: np.ndarray) -> np.ndarray:
    """The most confident candidate of each row of ``scores [P, n]`` (NaN never; the
    first on ties)."""
    return np.nanargmax(np.where(np.isnan(scores), -np.inf, scores), axis=1)


def candidate_seed(seed: int, prompt_index: int, candidate: int) -> int:
    """Candidate ``candidate`` of prompt ``prompt_index``: the same noise for every model
    verified with the same ``seed``, so verifiers pair candidate by candidate."""
    return derive_seed(seed, VERIFY_STREAM, prompt_index, candidate)


def forwards_per_image(n: int, spec: SamplerSpec, verifier: VerifierSpec,
                       early_step: int | None = None, keep: int | None = None) -> float:
    """Transformer forwards (of one image) spent on ``n`` candidates per returned image."""
    cfg = 2 if spec.guidance_scale != 1.0 else 1
    score = verifier.num_probes * verifier.probe_steps(spec.num_steps)
    if n == 1:
        return float(cfg * spec.num_steps)  # one sample: nothing to choose, nothing scored
    if early_step is None:
        return float(n * (cfg * spec.num_steps + score))
    m = n if keep is None else keep
    early = n * (cfg * early_step + cfg + score)  # to step j, x0 there, its score
    return float(early + m * (cfg * (spec.num_steps - early_step) + score))


def score_latents(transformer, z0: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning,
                  verifier: VerifierSpec, probe_seed: int) -> torch.Tensor:
    """Self-confidence ``[B]`` of ``z0`` (one prompt's candidates: one set of probes)."""
    window = suffix_window(len(sigmas) - 2, verifier.probe_fraction)
    out = self_confidence(
        conditional_velocity(transformer), z0, sigmas, cond, verifier.num_probes,
        probe_window=window, delta=verifier.delta, aggregation=verifier.aggregation,
        generator=torch.Generator().manual_seed(probe_seed))
    return out.reward.float()


def denoise(transformer, x: torch.Tensor, steps: range, sigmas: torch.Tensor,
            cond: Conditioning, negative: Conditioning | None, spec: SamplerSpec,
            noise: torch.Tensor) -> torch.Tensor:
    """Sampling steps ``steps`` from ``x``, each with its sample's own step noise."""
    for j in steps:
        x = denoise_step(transformer, x, j, sigmas, cond, negative, spec, noise=noise[:, j + 1])[0]
    return x


def check_settings(n: int, spec: SamplerSpec, early_step: int | None = None,
                   keep: int | None = None) -> None:
    """Refuse settings :func:`best_of_n` cannot run, naming the one that is wrong."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if early_step is None:
        if keep is not None:
            raise ValueError(f"keep ({keep}) is the number kept past early_step: give "
                             "early_step too, or leave keep out")
        return
    if not 0 < early_step < spec.num_steps:
        raise ValueError(f"early_step must lie in [1, {spec.num_steps - 1}] (the sampler "
                         f"has {spec.num_steps} steps), got {early_step}")
    if keep is None or not 1 <= keep <= n:
        raise ValueError(f"early rejection keeps 1..n candidates: give keep in [1, {n}], "
                         f"got {keep}")


@torch.no_grad()
def best_of_n(pipe, prompts: list[str], n: int, spec: SamplerSpec,
              verifier: VerifierSpec = VerifierSpec(), *, seed: int = 0,
              prompt_ids: list[int] | None = None, max_sequence_length: int = 8,
              early_step: int | None = None, keep: int | None = None,
              keep_all: bool = False) -> BestOfN:
    """Sample ``n`` candidates of each prompt, keep the most self-confident one.

    ``prompt_ids`` (default ``0..P-1``) seed the candidates: candidate ``i`` of prompt id
    ``p`` starts from :func:`candidate_seed` ``(seed, p, i)``. With ``early_step``, only
    the ``keep`` candidates most confident at that step are denoised to the end.
    ``keep_all`` also returns every candidate's image (for a study that grades them all;
    it needs every candidate finished, so no early rejection: ``keep`` = ``n``).
    """
    check_settings(n, spec, early_step, keep)
    if keep_all and early_step is not None and keep != n:
        raise ValueError("keep_all returns every candidate's image: it needs keep = n")
    ids = list(range(len(prompts))) if prompt_ids is None else list(prompt_ids)
    transformer = pipe.transformer
    device = transformer.device
    sigmas = sd3_sigmas(spec.num_steps, spec.shift).to(device)
    negative = (encode_prompts(pipe, [""], max_sequence_length)
                if spec.guidance_scale != 1.0 else None)
    channels, side = transformer.config.in_channels, latent_side(pipe, spec.resolution)
    images, chosen, all_scores, all_early, all_seeds, every = [], [], [], [], [], []
    for prompt, pid in zip(prompts, ids, strict=True):
        seeds = torch.tensor([candidate_seed(seed, pid, i) for i in range(n)])
        noise = sample_noise(seeds, (spec.num_steps + 1, channels, side, side)).to(device)
        cond = encode_prompts(pipe, [prompt] * n, max_sequence_length)
        probe_seed = derive_seed(seed, VERIFY_STREAM, PROBE_STREAM, pid)
        rows = torch.arange(n)
        x = noise[:, 0]
        early = None
        if early_step is not None:
            x = denoise(transformer, x, range(early_step), sigmas, cond, negative, spec, noise)
            x0 = predict_x0(transformer, x, sigmas[early_step], cond, negative, spec)
            early = score_latents(transformer, x0, sigmas, cond, verifier, probe_seed)
            rows = torch.sort(torch.argsort(early, descending=True, stable=True)[:keep]).values
            x = x[rows]
        final = denoise(transformer, x, range(early_step or 0, spec.num_steps), sigmas,
                        cond.select(rows), negative, spec, noise[rows])  # [len(rows), C, H, W]
        scores = torch.full((n,), math.nan)
        if n > 1:  # one candidate: nothing to choose between, nothing to score
            scores[rows] = score_latents(transformer, final, sigmas, cond.select(rows),
                                         verifier, probe_seed)
            best = int(pick(scores[None].numpy())[0])
        else:
            best = 0
        if keep_all:
            every.append(decode_images(pipe, final))
            images.append(every[-1][best][None])
        else:
            images.append(decode_images(pipe, final[rows == best]))
        chosen.append(best)
        all_scores.append(scores.numpy())
        all_early.append(None if early is None else early.numpy())
        all_seeds.append(seeds.numpy())
    return BestOfN(
        images=np.concatenate(images), chosen=np.array(chosen), scores=np.stack(all_scores),
        early=None if early_step is None else np.stack(all_early), seeds=np.stack(all_seeds),
        forwards=forwards_per_image(n, spec, verifier, early_step, keep),
        candidates=np.stack(every) if keep_all else None)
