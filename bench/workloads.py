"""What the stage benchmarks run: each stage as its actor runs it, and its bare workload.

The *stage* is what an actor runs per call (prompt encoding, the sampler with CFG and the
SDE step, ``Rollout.numpy``; the reward's probes and aggregation; the Flow-GRPO update
with log-probs, KL, loss and AdamW, in torch or on a one-rank DeepSpeed ``LearnerRank``).
The *bare* workload is only the transformer calls of that stage on the same batch shapes.
The ``bare_*`` and ``stage_*`` functions return closures that :func:`bench.stages.interleave`
times.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import SimpleNamespace

import torch

from learner.config import Config
from learner.grpo import combine_advantages
from learner.sequential import Batch, update_step
from policy.sampler import Conditioning, Rollout, sample_rollout
from rewards.self_confidence import score_rollout


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


# -- the bare workloads: only the transformer calls of each stage --------------------------

def forward(transformer: torch.nn.Module, x: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    t = torch.full((x.shape[0],), 500.0, dtype=x.dtype, device=x.device)
    return transformer(hidden_states=x, timestep=t, encoder_hidden_states=cond.embeds,
                       pooled_projections=cond.pooled, return_dict=False)[0]


def bare_inputs(m: StageModel, batch: int) -> tuple[torch.Tensor, Conditioning]:
    """Random latents and the conditioning of one fixed prompt, for ``batch`` images."""
    cfg = m.transformer.config
    dtype = next(m.transformer.parameters()).dtype
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size,
                    device=m.device).to(dtype)
    c = m.encode(["a photo of a red circle"] * batch)
    return x, Conditioning(c.embeds.to(dtype), c.pooled.to(dtype))


def bare_sampling(m: StageModel, batch: int, steps: int) -> Callable[[], None]:
    x, c = bare_inputs(m, 2 * batch)  # CFG: one forward of [negative; cond]

    @torch.no_grad()
    def run():
        for _ in range(steps):
            forward(m.transformer, x, c)
    return run


def bare_scoring(m: StageModel, groups: int, group_size: int, probes: int,
                 probe_steps: int) -> Callable[[], None]:
    x, c = bare_inputs(m, probes * group_size)  # one K*G forward per group and probe step

    @torch.no_grad()
    def run():
        for _ in range(groups * probe_steps):
            forward(m.transformer, x, c)
    return run


def bare_update(m: StageModel, batch: int, micro_batch: int, steps: int,
                reference: bool) -> Callable[[], None]:
    chunks = [len(c) for c in torch.arange(batch).split(micro_batch)]
    inputs = {b: bare_inputs(m, 2 * b) for b in set(chunks)}  # CFG in the training forward too
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
