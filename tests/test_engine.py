"""The Flow-GRPO update split over shards, and the DeepSpeed learner ranks on Ray.

* Pure (no Ray, no DeepSpeed): gradients of shards sum to the full batch's gradient,
  and the shared update reproduces ``learner.sequential.update_step``.
* Ray + DeepSpeed on CPU (gloo): 1 rank (ZeRO-0) and 2 ranks (ZeRO-2, uneven shards,
  one padded micro-batch) end two optimizer steps with the same LoRA weights as the
  single-process update; the published flat weights are the rank's LoRA; a checkpoint
  resumes to the same weights.
"""

import subprocess
import sys

import numpy as np
import pytest
import torch

from learner.config import Config, GrpoConfig
from learner.grpo import Advantages
from learner.sequential import Batch, update_step
from learner.update import accumulate_grpo_gradients, merge_metrics
from policy.logprob import trained_steps
from policy.pipeline import (
    LoraSpec,
    add_lora,
    build_pipeline,
    load_lora_state_dict,
    lora_state_dict,
)
from policy.sampler import SamplerSpec, encode_prompts, sample_rollout, sample_seed
from policy.weights import unflatten_weights

PROMPTS = ["a photo of two red squares"] * 3 + ["a photo of a circle left of a blue star"] * 3
MAX_SEQ = 8
SPEC = SamplerSpec(num_steps=4, guidance_scale=4.5)
LORA = LoraSpec(rank=4, alpha=8, init_seed=3)
ADVANTAGES = torch.tensor([1.0, -0.5, -0.5, 0.3, -1.2, 0.9])


@pytest.fixture(scope="module")
def setup():
    """The tiny pipeline with LoRA, its initial adapter, and one rollout sampled from it."""
    torch.set_num_threads(1)
    pipe = build_pipeline("tiny-random", num_threads=1)
    names = add_lora(pipe.transformer, LORA)
    named = dict(pipe.transformer.named_parameters())
    params = [named[n] for n in names]
    init = {k: v.clone() for k, v in lora_state_dict(pipe.transformer).items()}
    seeds = torch.tensor([sample_seed(5, 0, i // 3, i % 3) for i in range(len(PROMPTS))])
    cond = encode_prompts(pipe, PROMPTS, MAX_SEQ)
    negative = encode_prompts(pipe, [""], MAX_SEQ)
    rollout = sample_rollout(pipe, PROMPTS, seeds, SPEC, cond=cond, negative=negative)
    return pipe, params, init, rollout, cond, negative


def _reset(pipe, init, perturb=False):
    """Back to the initial adapter; ``perturb`` moves B off zero so that A gets gradients too."""
    state = {k: v.clone() for k, v in init.items()}
    if perturb:
        g = torch.Generator().manual_seed(1)
        for k, v in state.items():
            if "lora_B" in k:
                v.copy_(torch.randn(v.shape, generator=g) * 0.05)
    load_lora_state_dict(pipe.transformer, state)


def _grads(params):
    return [p.grad.clone() for p in params]


def test_update_module_imports_neither_ray_nor_deepspeed():
    code = ("import sys, learner.update, learner.engine\n"
            "heavy = [m for m in sys.modules if m.split('.')[0] in ('ray', 'deepspeed')]\n"
            "print(','.join(sorted(heavy)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"heavy modules imported: {out.stdout.strip()}"


def test_shard_gradients_sum_to_the_full_batch_gradient(setup):
    pipe, params, init, rollout, cond, negative = setup
    _reset(pipe, init, perturb=True)
    cfg = GrpoConfig(micro_batch=2, beta=0.04, clip_range=0.2)
    steps = trained_steps(rollout, 0.5)

    def run(index):
        for p in params:
            p.grad = None
        m = accumulate_grpo_gradients(pipe.transformer, rollout, cond, negative, ADVANTAGES,
                                      index, steps, cfg, torch.Tensor.backward, global_count=6)
        return _grads(params), m

    full, m_full = run(torch.arange(6))
    # Shards aligned with micro-batches, so each forward sees the same batch as in `full`.
    a, m_a = run(torch.arange(0, 4))
    b, m_b = run(torch.arange(4, 6))
    assert any(g.abs().max() > 0 for g in full[: len(full) // 2])
    for f, x, y in zip(full, a, b, strict=True):
        torch.testing.assert_close(x + y, f, rtol=1e-6, atol=1e-6 * f.abs().max().item())
    merged = merge_metrics([m_a, m_b])
    for k in ("loss/total", "loss/kl", "loss/ratio_mean", "loss/ratio_min", "loss/ratio_max"):
        assert merged[k] == pytest.approx(m_full[k], rel=1e-6, abs=1e-9), k
    assert merged["loss/samples"] == 6


def test_matches_sequential_update_step(setup):
    pipe, params, init, rollout, cond, negative = setup
    gr = GrpoConfig(micro_batch=4, beta=0.04, clip_range=0.2, lr=1e-3, train_fraction=0.5)
    keep = torch.tensor([True, True, True, False, True, True])
    values = torch.where(keep, ADVANTAGES, torch.zeros(()))
    adv = Advantages(values, keep, num_groups=2, num_dropped_groups=0)
    group_ids = torch.arange(2).repeat_interleave(3)

    _reset(pipe, init, perturb=True)
    optimizer = torch.optim.AdamW(params, lr=gr.lr, weight_decay=gr.weight_decay)
    batch = Batch(rollout, cond, group_ids)
    update_step(pipe, Config(grpo=gr), batch, adv, negative, optimizer, params)
    seq_grads, seq_weights = _grads(params), [p.detach().clone() for p in params]

    _reset(pipe, init, perturb=True)
    optimizer = torch.optim.AdamW(params, lr=gr.lr, weight_decay=gr.weight_decay)
    optimizer.zero_grad(set_to_none=True)
    index = keep.nonzero().flatten()
    accumulate_grpo_gradients(pipe.transformer, rollout, cond, negative, values, index,
                              trained_steps(rollout, gr.train_fraction), gr, torch.Tensor.backward,
                              global_count=len(index))
    torch.nn.utils.clip_grad_norm_(params, gr.max_grad_norm)
    optimizer.step()
    for g_seq, g in zip(seq_grads, _grads(params), strict=True):
        torch.testing.assert_close(g, g_seq, rtol=1e-6, atol=0)
    for w_seq, p in zip(seq_weights, params, strict=True):
        torch.testing.assert_close(p.detach(), w_seq, rtol=1e-6, atol=0)


# --- Ray + DeepSpeed -------------------------------------------------------------------------

KEEP = np.array([True, True, True, True, True, False])  # 5 kept: shards of 3 and 2 on 2 ranks
# micro_batch 1: every forward is one sample whatever the sharding, so 1 and 2 ranks differ
# only in summation order; with 2 ranks, rank 1 pads its third micro-batch (lockstep).
RAY_GRPO = GrpoConfig(micro_batch=1, beta=0.04, clip_range=0.2, lr=1e-3, train_fraction=0.5)


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _reference_weights(setup, num_steps):
    """The single-process update (torch AdamW + clipping) for ``num_steps`` steps."""
    pipe, params, init, rollout, cond, negative = setup
    _reset(pipe, init)
    optimizer = torch.optim.AdamW(params, lr=RAY_GRPO.lr, weight_decay=RAY_GRPO.weight_decay)
    index = torch.from_numpy(np.flatnonzero(KEEP))
    for _ in range(num_steps):
        optimizer.zero_grad(set_to_none=True)
        accumulate_grpo_gradients(pipe.transformer, rollout, cond, negative, ADVANTAGES, index,
                                  trained_steps(rollout, 0.5), RAY_GRPO, torch.Tensor.backward,
                                  global_count=len(index))
        torch.nn.utils.clip_grad_norm_(params, RAY_GRPO.max_grad_norm)
        optimizer.step()
    return lora_state_dict(pipe.transformer)


def test_one_and_two_deepspeed_ranks_train_the_same_weights(setup, ray_cluster):
    from learner.engine import LearnerGroup

    ray = ray_cluster
    driver_had_deepspeed = "deepspeed" in sys.modules
    rollout = setup[3]
    ref = ray.put(rollout.numpy())
    steps = trained_steps(rollout, RAY_GRPO.train_fraction)
    advantages = ADVANTAGES.numpy()
    kwargs = {"lora": LORA, "grpo": RAY_GRPO, "max_sequence_length": MAX_SEQ}
    groups = {
        "zero0x1": LearnerGroup(1, zero_stage=0, **kwargs),
        "zero2x2": LearnerGroup(2, zero_stage=2, **kwargs),
    }
    # The two ranks get the rollout as three calls of 2 samples, each rank only the calls
    # its shard (samples 0-2, 3-4) draws from; the weights must come out the same.
    parts = [ray.put(rollout.select(slice(i, i + 2)).numpy()) for i in (0, 2, 4)]

    def step(name, group):
        if name == "zero2x2":
            return group.finish_train_step(
                group.submit_train_step(parts, advantages, KEEP, steps, sizes=[2, 2, 2]))
        return group.train_step(ref, advantages, KEEP, steps)

    weights, checkpoints = {}, {}
    for name, group in groups.items():
        first = step(name, group)
        # On-policy: nothing has changed since sampling, so every first-step ratio is 1.
        assert first["loss/first_ratio_max_dev"] < 1e-5, name
        assert first["loss/samples"] == KEEP.sum() and first["loss/grad_norm"] > 0
        checkpoints[name] = group.state_dict()
        second = step(name, group)
        assert np.isfinite(second["loss/total"]) and second["loss/ratio_max"] > 1.0
        flat = ray.get(group.publish(2))
        assert flat.version == 2
        weights[name] = flat

    one, two = weights["zero0x1"], weights["zero2x2"]
    assert one.names == two.names
    diff = float(np.abs(one.buffer - two.buffer).max())
    print(f"max |w_1rank - w_2ranks| = {diff:.3g}")
    assert diff < 1e-6
    reference = _reference_weights(setup, 2)
    for name, flat in weights.items():
        got = unflatten_weights(flat)
        for k, v in reference.items():
            torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6, msg=f"{name} {k}")
        assert any(not torch.equal(got[k], setup[2][k]) for k in got)  # the weights did move

    for name, group in groups.items():
        # The published buffer unflattens to the rank's LoRA state dict, exactly.
        state = group.state_dict()
        got = unflatten_weights(weights[name])
        assert got.keys() == state["lora"].keys()
        assert all(torch.equal(got[k], state["lora"][k]) for k in got)
        # Resume from the checkpoint after step 1 and redo step 2: same weights.
        group.load_state_dict(checkpoints[name])
        group.train_step(ref, advantages, KEEP, steps)
        again = ray.get(group.publish(2))
        np.testing.assert_array_equal(again.buffer, weights[name].buffer, err_msg=name)
        group.shutdown()
    # Checkpoints travel as bytes: the driver never loads deepspeed.
    assert driver_had_deepspeed or "deepspeed" not in sys.modules


def test_each_rank_is_sent_only_the_rollouts_its_shard_draws_from():
    from learner.engine import rollout_span

    sizes = [4, 4, 2, 6]  # samples 0-3, 4-7, 8-9, 10-15
    assert rollout_span(np.array([0, 1, 3]), sizes) == (0, 0, 0)
    assert rollout_span(np.array([3, 4, 9]), sizes) == (0, 2, 0)
    assert rollout_span(np.array([8, 9, 10, 15]), sizes) == (2, 3, 8)
    assert rollout_span(np.array([], dtype=np.int64), sizes) == (0, 0, 0)
    with pytest.raises(ValueError, match="outside the 16 samples"):
        rollout_span(np.array([15, 16]), sizes)


def test_learner_ranks_are_placed_as_one_gang_or_not_at_all(ray_cluster):
    """Two ranks of 3 CPUs on a 4-CPU instance: neither starts, and the message says why
    (a rank placed alone would wait for the other forever in init_distributed)."""
    from ray.util import placement_group_table

    from learner.engine import LearnerGroup, PlacementTimeout

    before = set(placement_group_table())
    with pytest.raises(PlacementTimeout, match=r"2 ranks \(\{'CPU': 3\} each\).*placement_timeout_s"):
        LearnerGroup(2, lora=LORA, grpo=RAY_GRPO, num_cpus=3, placement_timeout_s=2)
    added = {k: v for k, v in placement_group_table().items() if k not in before}
    assert added and all(v["state"] == "REMOVED" for v in added.values())
