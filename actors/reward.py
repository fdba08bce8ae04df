"""Reward workers: plain classes that score one rollout (whole GRPO groups) per call.

No Ray here: ``actors.pool.RewardPool`` wraps them in actors where it creates them.
Every worker has the same call, ``score(rollout, weights) -> Scores``, so one pool
drives any of them.

* :class:`SelfConfidenceWorker`: SOLACE's self-confidence with its own copy of the
  policy, at the weight version that generated the rollout (docs/design.md section 4).
* :class:`ExternalRewardWorker`: any scorer class named ``"module:Class"``, on images
  decoded by its own copy of the VAE; ``rewards.http:HttpScorer`` makes it the client of
  a remote reward server (``rewards.serve``).

Probe seeding: see ``rewards.self_confidence.score_rollout`` (per group, from the run
seed, the weight version and the group's first sample), so a group's score depends
neither on the actor that ran it nor on the other groups of its call.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from actors.rollout import PolicyReplica, resolve_table
from policy.merged import merged_lora
from policy.pipeline import LoraSpec, adapter_disabled, build_vae
from policy.prompt_table import PromptTable, text_source
from policy.sampler import (
    Rollout,
    decode_latents,
)
from policy.weights import FlatWeights
from rewards.self_confidence import Aggregation, score_rollout, score_steps
from rewards.wire import import_scorer, reward_array  # the scorer contract (re-exported here)


@dataclass
class Scores:
    """One reward for each sample of a rollout, in the rollout's sample order."""

    sample_keys: tuple[tuple[int, int], ...]  # (prompt_id, seed) of each sample
    reward: np.ndarray  # [B] float32
    per_step: np.ndarray | None  # [B, P] float32 S_t per probe step; None for external rewards
    weight_version: int  # the policy version that made (and, for self-confidence, scored) them
    reward_name: str
    # [B, S+1] self-confidence along the trajectory (grpo.credit per_step); else None
    step_scores: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.sample_keys)


def sample_keys(rollout: Rollout) -> tuple[tuple[int, int], ...]:
    """``(prompt_id, seed)`` per sample: the seed alone is unique within a step."""
    ids = np.asarray(rollout.prompt_ids).tolist()
    seeds = np.asarray(rollout.seeds).tolist()
    return tuple(zip(ids, seeds, strict=True))


class SelfConfidenceWorker:
    """Scores rollouts by SOLACE self-confidence with the version that generated them."""

    reward_name = "self_confidence"

    def __init__(
        self,
        model_path: str,
        dtype: str,
        device: str,
        num_threads: int,
        lora: LoraSpec,
        max_sequence_length: int,
        run_seed: int,
        num_probes: int = 8,
        probe_fraction: float = 0.5,
        delta: float = 1e-6,
        aggregation: Aggregation = "paper",
        guidance_scale: float = 1.0,
        scoring_policy: Literal["current", "base"] = "current",
        credit_steps: Sequence[int] | None = None,
        micro_batch: int | None = None,
        prompt_table: PromptTable | None = None,
        merge_lora: bool = False,
    ) -> None:
        prompt_table = resolve_table(prompt_table)  # (a ref, from the pool's factory)
        self.merge_lora = merge_lora  # score with the adapter merged (policy.merged)
        self.policy = PolicyReplica(model_path, dtype, device, num_threads, lora,
                                    text_encoders=prompt_table is None)
        self.text = text_source(self.policy.pipe, max_sequence_length, prompt_table)
        self.max_sequence_length = max_sequence_length
        self.run_seed = run_seed
        self.num_probes, self.probe_fraction = num_probes, probe_fraction
        self.delta, self.aggregation = delta, aggregation
        # Ablations of SOLACE's choices: CFG in the scoring velocity, the frozen base model.
        self.guidance_scale, self.scoring_policy = guidance_scale, scoring_policy
        self.negative = self.text.encode([""], device) if guidance_scale != 1.0 else None
        # Per-step credit (grpo.credit per_step): also score the predicted clean latent at
        # each trained step, with the sampler's CFG velocity (its empty-prompt negative).
        self.micro_batch = micro_batch  # probe latents per forward (None: all at once)
        self.credit_steps = list(credit_steps) if credit_steps else None
        self.sampling_negative = self.text.encode([""], device) if self.credit_steps else None

    @property
    def version(self) -> int | None:
        return self.policy.version

    def resident(self) -> list[str]:
        return self.policy.resident()

    @torch.no_grad()
    def score(self, rollout: Rollout, weights: FlatWeights) -> Scores:
        """Self-confidence of every sample; ``weights`` must be the rollout's own version.

        The version is loaded here when it is not the loaded one, so a restarted actor
        scores with the right weights (docs/design.md trap 7). Groups are runs of equal
        prompt ids; each is scored with its own seeded probes (module docstring).
        """
        if weights.version != rollout.weight_version:
            raise ValueError(
                f"rollout was generated by weight version {rollout.weight_version} but "
                f"weights of version {weights.version} were passed; score with the "
                "version that generated it (SOLACE scores with the sampling policy)"
            )
        version = self.policy.load(weights)
        r = rollout.torch(self.policy.device)
        cond = self.text.encode(r.prompts, self.policy.device)
        transformer = self.policy.pipe.transformer
        if self.scoring_policy == "base":
            context = adapter_disabled(transformer)
        else:  # the reward is not in the ratio: merged forwards are safe (policy.merged)
            context = merged_lora(transformer) if self.merge_lora else nullcontext()
        with context:
            reward, per_step = score_rollout(
                transformer, r, cond, self.run_seed, self.num_probes, self.probe_fraction,
                self.delta, self.aggregation, self.guidance_scale, self.negative,
                self.micro_batch)
            steps = None
            # an evaluation rollout holds final latents only: scored, but no trajectory
            if self.credit_steps and r.latents.shape[1] == len(r.sigmas):
                steps = score_steps(
                    transformer, r, cond, self.run_seed, self.credit_steps,
                    self.sampling_negative, self.num_probes, self.probe_fraction, self.delta,
                    self.aggregation, self.guidance_scale, self.negative,
                    self.micro_batch, final_reward=reward).float().cpu().numpy()
        return Scores(
            sample_keys=sample_keys(rollout),
            reward=reward.float().cpu().numpy(),
            per_step=per_step.float().cpu().numpy(),
            weight_version=version,
            reward_name=self.reward_name,
            step_scores=steps,
        )


class ExternalRewardWorker:
    """Any image scorer, on the rollout's final latents decoded by its own VAE.

    ``scorer`` names a class ``"module:Class"`` built with ``scorer_kwargs``; an instance
    is called as ``scorer(images uint8 [N,H,W,3], prompts, metadata) -> [N]`` (or an
    object with ``.reward`` or ``.partial``). ``metadata[prompt_id]`` is the prompt's
    row in the prompt file (GenEval format); without it each sample gets ``{"prompt"}``.
    """

    def __init__(
        self,
        scorer: str,
        reward_name: str,
        model_path: str,
        dtype: str = "float32",
        device: str = "cpu",
        num_threads: int = 0,
        scorer_kwargs: dict[str, Any] | None = None,
        metadata: Sequence[dict] | None = None,
        decode_batch: int | None = None,
    ) -> None:
        self.scorer = import_scorer(scorer, scorer_kwargs)
        self.decode_batch = decode_batch  # images decoded at once (None: all of a call)
        self.reward_name = reward_name
        # The VAE alone (its latent scaling config included): no transformer or text
        # encoders resident in an actor that only decodes.
        self.vae = build_vae(model_path, dtype, device, num_threads)
        self.metadata = list(metadata) if metadata is not None else None

    def score(self, rollout: Rollout, weights: FlatWeights | None = None) -> Scores:
        """Decode and score; ``weights`` is accepted for a uniform call and not used."""
        ids = np.asarray(rollout.prompt_ids).tolist()
        if self.metadata is None:
            metadata = [{"prompt": p} for p in rollout.prompts]
        else:
            metadata = [self.metadata[i] for i in ids]
        final = torch.tensor(np.asarray(rollout.latents)[:, -1])  # [B, C, H, W], a copy
        images = decode_latents(self.vae, final, self.decode_batch)
        out = self.scorer(images, list(rollout.prompts), metadata)
        return Scores(
            sample_keys=sample_keys(rollout),
            reward=reward_array(out, len(ids), self.reward_name),
            per_step=None,
            weight_version=rollout.weight_version,
            reward_name=self.reward_name,
        )
