"""The sampler, the training-time log-prob recompute and the KL, on the tiny random SD3."""

import pytest
import torch

from policy.logprob import reference_kl, step_log_prob, trained_steps
from policy.pipeline import LoraSpec, adapter_disabled, add_lora
from policy.sampler import (
    SamplerSpec,
    conditional_velocity,
    encode_prompts,
    sample_rollout,
    sample_seed,
)
from policy.tiny import build_tiny_pipeline
from rewards.self_confidence import self_confidence

PROMPTS = ["a photo of two red squares"] * 3 + ["a photo of a circle left of a blue star"] * 3
MAX_SEQ = 8


@pytest.fixture(scope="module")
def pipe():
    pipe = build_tiny_pipeline(seed=0)
    add_lora(pipe.transformer, LoraSpec(rank=4, alpha=8))
    # Move the adapter away from the identity so that policy != reference.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in pipe.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return pipe


def _seeds(step=0):
    return torch.tensor([sample_seed(7, step, i // 3, i % 3) for i in range(len(PROMPTS))])


def _rollout(pipe, spec):
    return sample_rollout(pipe, PROMPTS, _seeds(), spec, max_sequence_length=MAX_SEQ)


@pytest.mark.parametrize(
    "spec",
    [
        SamplerSpec(num_steps=6, guidance_scale=4.5, sde_window=(1, 4)),
        SamplerSpec(num_steps=6, guidance_scale=1.0),
        SamplerSpec(num_steps=6, guidance_scale=4.5, sde_type="cps"),
    ],
    ids=["cfg-window", "no-cfg", "cps"],
)
def test_on_policy_ratio_is_one(pipe, spec):
    rollout = _rollout(pipe, spec)
    cond = encode_prompts(pipe, PROMPTS, MAX_SEQ)
    negative = encode_prompts(pipe, [""], MAX_SEQ) if spec.guidance_scale != 1 else None
    start, stop = spec.window()
    assert torch.all(rollout.log_probs[:, :start] == 0) and torch.all(rollout.log_probs[:, stop:] == 0)
    worst = 0.0
    # Recompute in micro-batches of a different size than sampling used.
    for index in (torch.arange(0, 4), torch.arange(4, 6)):
        for j in range(start, stop):
            out = step_log_prob(pipe.transformer, rollout, j, cond.select(index), negative, index)
            ratio = torch.exp(out.log_prob - rollout.log_probs[index, j])
            worst = max(worst, (ratio - 1).abs().max().item())
    assert worst < 1e-5


def test_rollout_shapes_and_reproducibility(pipe):
    spec = SamplerSpec(num_steps=4, guidance_scale=4.5)
    a, b = _rollout(pipe, spec), _rollout(pipe, spec)
    assert a.latents.shape == (6, 5, 4, 32, 32) and a.latents.dtype == torch.float32
    assert a.log_probs.shape == (6, 4) and a.sigmas.shape == (5,)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)
    # A sample does not depend on its batch: sample 4 alone equals sample 4 in the batch.
    alone = sample_rollout(pipe, PROMPTS[4:5], _seeds()[4:5], spec, max_sequence_length=MAX_SEQ)
    torch.testing.assert_close(alone.latents[0], a.latents[4], atol=1e-5, rtol=0)
    other = sample_rollout(pipe, PROMPTS, _seeds(step=1), spec, max_sequence_length=MAX_SEQ)
    assert not torch.allclose(other.latents[:, -1], a.latents[:, -1])


def test_sample_seeds_are_distinct_and_stable():
    seeds = {sample_seed(0, s, p, i) for s in range(3) for p in range(4) for i in range(16)}
    assert len(seeds) == 3 * 4 * 16
    assert sample_seed(0, 1, 2, 3) == sample_seed(0, 1, 2, 3) != sample_seed(1, 1, 2, 3)


def test_trained_steps_are_the_window_suffix(pipe):
    rollout = _rollout(pipe, SamplerSpec(num_steps=10, guidance_scale=1.0))
    assert trained_steps(rollout, 0.5) == [4, 5, 6, 7, 8]
    assert trained_steps(rollout, 1.0) == list(range(9))


def test_kl_zero_for_reference_positive_for_policy(pipe):
    spec = SamplerSpec(num_steps=6, guidance_scale=4.5)
    rollout = _rollout(pipe, spec)
    cond = encode_prompts(pipe, PROMPTS, MAX_SEQ)
    negative = encode_prompts(pipe, [""], MAX_SEQ)
    policy = step_log_prob(pipe.transformer, rollout, 3, cond, negative)
    kl = reference_kl(pipe.transformer, rollout, 3, cond, negative, policy)
    assert kl.shape == (6,) and torch.all(kl > 0)
    # With the adapter disabled, the policy is the reference: KL is exactly 0.
    with adapter_disabled(pipe.transformer):
        base = step_log_prob(pipe.transformer, rollout, 3, cond, negative)
    assert torch.all(reference_kl(pipe.transformer, rollout, 3, cond, negative, base) == 0)


def test_kl_zero_for_a_fresh_adapter():
    fresh = build_tiny_pipeline(seed=0)
    add_lora(fresh.transformer, LoraSpec(rank=4, alpha=8))  # B = 0: the identity
    spec = SamplerSpec(num_steps=4, guidance_scale=4.5)
    rollout = _rollout(fresh, spec)
    cond = encode_prompts(fresh, PROMPTS, MAX_SEQ)
    negative = encode_prompts(fresh, [""], MAX_SEQ)
    policy = step_log_prob(fresh.transformer, rollout, 1, cond, negative)
    assert torch.all(reference_kl(fresh.transformer, rollout, 1, cond, negative, policy) == 0)


def test_self_confidence_on_the_pipeline_uses_no_cfg(pipe):
    spec = SamplerSpec(num_steps=6, guidance_scale=4.5)
    rollout = _rollout(pipe, spec)
    cond = encode_prompts(pipe, PROMPTS, MAX_SEQ)
    batches = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda mod, args, kwargs: batches.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
    )
    try:
        out = self_confidence(conditional_velocity(pipe.transformer), rollout.final, rollout.sigmas,
                              cond, num_probes=4, generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    # One forward of K*B per probe step, never the 2*K*B of a CFG batch.
    assert batches == [4 * 6] * len(out.probe_steps)
    assert out.reward.shape == (6,) and torch.isfinite(out.reward).all()


def test_rollout_numpy_round_trip_and_select(pipe):
    rollout = _rollout(pipe, SamplerSpec(num_steps=3, guidance_scale=4.5))
    as_numpy = rollout.numpy()
    assert type(as_numpy.latents).__module__ == "numpy" and as_numpy.prompts == rollout.prompts
    back = as_numpy.torch()
    for name in ("latents", "log_probs", "sigmas", "seeds", "prompt_ids"):
        assert torch.equal(getattr(back, name), getattr(rollout, name))
    part = rollout.select(torch.tensor([1, 4]))
    assert torch.equal(part.latents, rollout.latents[[1, 4]]) and part.prompts == [PROMPTS[1], PROMPTS[4]]


def test_detached_uncond_keeps_the_log_prob_and_changes_only_the_gradient(pipe):
    spec = SamplerSpec(num_steps=6, guidance_scale=4.5)
    rollout = _rollout(pipe, spec)
    cond = encode_prompts(pipe, PROMPTS, MAX_SEQ)
    negative = encode_prompts(pipe, [""], MAX_SEQ)
    lora = [p for n, p in pipe.transformer.named_parameters() if "lora_B" in n]
    grads, values = [], []
    for detach in (False, True):
        out = step_log_prob(pipe.transformer, rollout, 2, cond, negative, detach_uncond=detach)
        values.append(out.log_prob.detach())
        grads.append(torch.autograd.grad(out.log_prob.sum(), lora))
    assert torch.equal(values[0], values[1])  # same value: the ratio stays 1 on-policy
    assert any(not torch.allclose(a, b) for a, b in zip(*grads, strict=True))


def test_the_timestep_reaches_a_bf16_transformer_in_fp32():
    """bf16 has 8 bits of mantissa: 1000 sigma = 743.1 would arrive as 744."""
    from policy.pipeline import build_pipeline
    from policy.sampler import encode_prompts, predict_velocity

    pipe = build_pipeline("tiny-random", dtype="bfloat16")
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["timestep"]), with_kwargs=True)
    try:
        cond = encode_prompts(pipe, ["a photo of a star"], 8)
        v = predict_velocity(pipe.transformer, torch.randn(1, 4, 32, 32), torch.tensor([0.7431]),
                             cond)
    finally:
        hook.remove()
    assert seen[0].dtype == torch.float32 and seen[0].item() == pytest.approx(743.1)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
