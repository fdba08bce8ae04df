"""The rollout worker: a copy of the policy that samples whole GRPO groups.

A plain class (no Ray here): ``actors.pool``-style code applies ``ray.remote`` where
the actors are created, and the tests drive it directly.

A worker serves exactly one weight version at a time, loaded from the learner's flat
buffer (``policy.weights.FlatWeights``). It starts with none: a freshly started or
restarted actor refuses to sample until it has been given a version (docs/design.md
trap 7), so a rollout is never tagged with weights it was not made with. The service
passes the version's weights with every call (``weights=``), so that a call Ray retries
on a restarted actor samples with the same weights and seeds as the lost one.
"""

from __future__ import annotations

import numpy as np
import torch

from policy.pipeline import LoraSpec, add_lora, build_pipeline, load_lora_state_dict
from policy.prompt_table import PromptTable, text_source
from policy.sampler import (
    Rollout,
    SamplerSpec,
    decode_images,
    eval_seed,
    sample_rollout,
    sample_seed,
    sd3_sigmas,
)
from policy.weights import FlatWeights, unflatten_weights


class PolicyReplica:
    """A frozen pipeline plus one LoRA adapter at a known weight version.

    Shared by the rollout worker and the self-confidence worker: both must know
    exactly which version their transformer holds.
    """

    def __init__(self, model_path: str, dtype: str, device: str, num_threads: int,
                 lora: LoraSpec, text_encoders: bool = True) -> None:
        # num_threads > 0 sets torch's CPU threads: inside a Ray actor torch would
        # otherwise use the actor's num_cpus (docs/design.md section 6).
        self.pipe = build_pipeline(model_path, dtype, device, num_threads, text_encoders)
        add_lora(self.pipe.transformer, lora)
        self.device = device
        self.version: int | None = None  # none loaded yet: refuse to serve

    def load(self, flat: FlatWeights) -> int:
        """Load ``flat`` unless its version is already loaded (versions are immutable)."""
        if flat.version != self.version:
            load_lora_state_dict(self.pipe.transformer, unflatten_weights(flat, self.device))
            self.version = flat.version
        return self.version

    def require_version(self) -> int:
        if self.version is None:
            raise RuntimeError(
                "no weight version loaded: call set_weights (or pass the weights) before "
                "serving; a restarted actor starts without weights (docs/design.md trap 7)"
            )
        return self.version

    def resident(self) -> list[str]:
        """The pipeline components this replica holds (for checks and operators)."""
        return sorted(name for name, value in self.pipe.components.items() if value is not None)


def resolve_table(table):
    """A prompt table passed by reference inside a factory (Ray resolves only top-level
    arguments) is fetched here; a table or None passes through."""
    if table is None or isinstance(table, PromptTable):
        return table
    import ray

    return ray.get(table)


class RolloutWorker:
    """Samples ``group_size`` SDE trajectories per prompt with the loaded weight version."""

    def __init__(
        self,
        model_path: str,
        dtype: str,
        device: str,
        num_threads: int,
        lora: LoraSpec,
        sampler: SamplerSpec,
        max_sequence_length: int,
        run_seed: int,
        eval_sampler: SamplerSpec | None = None,
        micro_batch: int | None = None,
        prompt_table: PromptTable | None = None,
        decode_batch: int | None = None,
    ) -> None:
        # With a prompt table the text encoders stay unloaded: prompts are looked up.
        prompt_table = resolve_table(prompt_table)
        self.policy = PolicyReplica(model_path, dtype, device, num_threads, lora,
                                    text_encoders=prompt_table is None)
        self.text = text_source(self.policy.pipe, max_sequence_length, prompt_table)
        self.micro_batch = micro_batch  # trajectories denoised at once (None: a whole call)
        self.decode_batch = decode_batch  # images decoded at once (None: all of a call)
        self.spec = sampler
        self.eval_spec = eval_sampler
        self.max_sequence_length = max_sequence_length
        self.run_seed = run_seed
        # The CFG negative (the empty prompt) is the same for every call.
        self.negative = self.text.encode([""], device)

    def resident(self) -> list[str]:
        return self.policy.resident()

    def set_weights(self, flat: FlatWeights) -> int:
        """Load weight version ``flat.version`` (skipped if loaded); returns the loaded version."""
        return self.policy.load(flat)

    @torch.no_grad()
    def sample(self, groups: list[tuple[int, str]], step: int, group_size: int,
               weights: FlatWeights | None = None) -> Rollout:
        """Sample whole groups: ``group_size`` trajectories per ``(prompt_index, prompt)``.

        ``weights``: load that version first (skipped if loaded); None: the loaded one.

        Sample ``i`` of prompt ``index`` uses ``sample_seed(run_seed, step, index, i)``, so
        it does not depend on which worker ran it or what else was in the call. Every
        sample of the call is made with the one loaded version, recorded in the rollout.
        Returns numpy arrays (zero-copy through Ray's object store).
        """
        if weights is not None:
            self.policy.load(weights)
        version = self.policy.require_version()
        if not groups or group_size < 1:
            raise ValueError(f"need at least one group and group_size >= 1, got "
                             f"{len(groups)} groups of {group_size}")
        prompts = [prompt for _, prompt in groups for _ in range(group_size)]
        ids = torch.tensor([index for index, _ in groups for _ in range(group_size)])
        seeds = torch.tensor([sample_seed(self.run_seed, step, index, i)
                              for index, _ in groups for i in range(group_size)])
        cond = self.text.encode(prompts, self.policy.device)
        # Chunks of at most micro_batch trajectories: each sample's noise is its own seed's,
        # so the chunking changes how many are denoised at once, not what is sampled.
        size = self.micro_batch or len(prompts)
        parts = [
            sample_rollout(
                self.policy.pipe, prompts[start:start + size], seeds[start:start + size],
                self.spec, prompt_ids=ids[start:start + size],
                cond=cond.select(slice(start, start + size)), negative=self.negative,
                max_sequence_length=self.max_sequence_length, weight_version=version)
            for start in range(0, len(prompts), size)
        ]
        return Rollout.concat(parts).numpy()

    @torch.no_grad()
    def decode(self, rollout: Rollout) -> np.ndarray:
        """The rollout's final images, uint8 ``[B, H, W, 3]`` (for sample grids)."""
        final = torch.tensor(np.asarray(rollout.latents)[:, -1])  # a copy: object-store arrays are read-only
        return decode_images(self.policy.pipe, final, self.decode_batch)

    @torch.no_grad()
    def evaluate(self, jobs: list[tuple[int, str, int]], seed: int, offset: int = 0,
                 batch: int | None = None, weights: FlatWeights | None = None
                 ) -> tuple[Rollout, np.ndarray]:
        """Evaluation samples of the loaded version: ``(final-latent rollout, images)``.

        ``jobs`` are ``(prompt_id, prompt, sample_index)``, the prompt ids ``offset`` past
        the training prompts; each image starts from the noise of ``eval_seed(seed,
        prompt_id - offset, sample_index)`` (the noise ``shapes.eval_model`` gives image
        ``sample_index`` of the split's prompt) and is denoised by the deterministic
        sampler of ``eval_sampler``, so every version (and every run) is evaluated on the
        same noise. The rollout holds only the final latents (``latents [B, 1, C, H, W]``,
        no log-probs) and carries the *training* spec and sigmas, so that the reward pools
        score it exactly as they score training samples (self-confidence probes its noise
        levels from them). Images are uint8 ``[B, H, W, 3]``. Call with ``num_returns=2``.
        ``weights``: as in :meth:`sample`. ``batch``: images denoised at once (default
        the worker's ``micro_batch``, else 32).
        """
        if weights is not None:
            self.policy.load(weights)
        version = self.policy.require_version()
        if self.eval_spec is None:
            raise RuntimeError("this rollout worker was built without an eval_sampler")
        pipe, finals, images = self.policy.pipe, [], []
        batch = batch or self.micro_batch or 32
        seeds = torch.tensor([eval_seed(seed, pid - offset, i) for pid, _, i in jobs])
        for start in range(0, len(jobs), batch):
            prompts = [prompt for _, prompt, _ in jobs[start:start + batch]]
            out = sample_rollout(pipe, prompts, seeds[start:start + batch], self.eval_spec,
                                 cond=self.text.encode(prompts, self.policy.device),
                                 negative=self.negative,
                                 max_sequence_length=self.max_sequence_length)
            finals.append(out.final)
            images.append(decode_images(pipe, out.final, self.decode_batch))
        final = torch.cat(finals)
        rollout = Rollout(
            latents=final[:, None], log_probs=torch.zeros(len(jobs), 0),
            sigmas=sd3_sigmas(self.spec.num_steps, self.spec.shift),
            seeds=seeds,
            prompt_ids=torch.tensor([pid for pid, _, _ in jobs]),
            prompts=[prompt for _, prompt, _ in jobs], spec=self.spec, weight_version=version,
        )
        return rollout.numpy(), np.concatenate(images)
