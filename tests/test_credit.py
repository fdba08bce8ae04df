"""Per-step credit (grpo.credit per_step): the step advantages, the scores along the
trajectory they come from, and the update that takes one advantage per trained step."""

import pytest
import torch

from learner.config import ConfigError, GrpoConfig, load_config
from learner.grpo import step_advantages
from learner.update import accumulate_grpo_gradients
from policy.logprob import trained_steps
from policy.pipeline import LoraSpec, add_lora, build_pipeline
from policy.sampler import SamplerSpec, encode_prompts, sample_rollout, sample_seed
from rewards.self_confidence import score_rollout, score_steps

EPS = 1e-4
PROMPTS = ["a photo of two red squares"] * 3 + ["a photo of a blue star"] * 3
SPEC = SamplerSpec(num_steps=6, guidance_scale=4.5)


def test_step_advantages_sum_to_zero_per_step_and_the_gains_telescope():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(8, 4, generator=g)  # 3 trained steps + the final latent
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    adv = step_advantages(scores, groups, clip=100.0, eps=EPS)
    assert adv.values.shape == (8, 3) and adv.keep.all()
    for grp in (0, 1):
        rows = groups == grp
        torch.testing.assert_close(adv.values[rows].sum(dim=0), torch.zeros(3), atol=1e-5, rtol=0)
        gains = scores[rows].diff(dim=1)
        # the rewards of a trajectory's steps add up to its final score less the first
        torch.testing.assert_close(gains.sum(dim=1), scores[rows, -1] - scores[rows, 0])
        expected = (gains - gains.mean(0)) / (gains.std(0, unbiased=False) + EPS)
        torch.testing.assert_close(adv.values[rows], expected)


def test_flat_steps_get_nothing_and_a_flat_group_is_dropped():
    scores = torch.tensor([[0.0, 1.0, 2.0], [0.0, 1.0, 3.0],   # step 0 flat, step 1 not
                           [5.0, 5.0, 5.0], [1.0, 1.0, 1.0]])  # every gain 0: no signal
    adv = step_advantages(scores, torch.tensor([0, 0, 1, 1]))
    assert adv.keep.tolist() == [True, True, False, False] and adv.num_dropped_groups == 1
    assert adv.values[:, 0].tolist() == [0.0] * 4
    assert adv.values[0, 1] < 0 < adv.values[1, 1]
    with pytest.raises(ValueError, match=r"\[N, S\+1\]"):
        step_advantages(torch.zeros(4), torch.tensor([0, 0, 1, 1]))


def test_per_step_credit_needs_self_confidence_as_the_only_trained_reward():
    shapes = '[{name: shapes, target: "rewards.shapes:ShapesReward", weight: 1.0}]'
    with pytest.raises(ConfigError, match="only trained reward"):
        load_config(None, ["grpo.credit=per_step", f"external_rewards={shapes}"])
    with pytest.raises(ConfigError, match="only trained reward"):
        load_config(None, ["grpo.credit=per_step", "self_confidence.enabled=false",
                           f"external_rewards={shapes}"])
    watched = shapes.replace("weight: 1.0", "weight: 0")
    assert load_config(None, ["grpo.credit=per_step", f"external_rewards={watched}"])


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    pipe = build_pipeline("tiny-random", num_threads=1)
    names = add_lora(pipe.transformer, LoraSpec(rank=4, alpha=8, init_seed=3))
    named = dict(pipe.transformer.named_parameters())
    params = [named[n] for n in names]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B off zero, so that the adapter changes the velocity
        for n in names:
            if "lora_B" in n:
                named[n].copy_(torch.randn(named[n].shape, generator=g) * 0.05)
    seeds = torch.tensor([sample_seed(5, 0, i // 3, i % 3) for i in range(len(PROMPTS))])
    cond = encode_prompts(pipe, PROMPTS, 8)
    negative = encode_prompts(pipe, [""], 8)
    rollout = sample_rollout(pipe, PROMPTS, seeds, SPEC, cond=cond, negative=negative,
                             prompt_ids=torch.tensor([0, 0, 0, 1, 1, 1]))
    return pipe, params, rollout, cond, negative


def test_scores_along_the_trajectory_end_with_the_reward(setup):
    pipe, _, rollout, cond, negative = setup
    steps = trained_steps(rollout, 0.5)
    along = score_steps(pipe.transformer, rollout, cond, 7, steps, negative, num_probes=4)
    reward, _ = score_rollout(pipe.transformer, rollout, cond, 7, num_probes=4)
    assert along.shape == (6, len(steps) + 1)
    torch.testing.assert_close(along[:, -1], reward)  # the same probes, the same latent
    assert torch.isfinite(along).all() and not torch.allclose(along[:, 0], along[:, -1])


def _grads(setup, advantages, cfg, steps):
    pipe, params, rollout, cond, negative = setup
    for p in params:
        p.grad = None
    m = accumulate_grpo_gradients(pipe.transformer, rollout, cond, negative, advantages,
                                  torch.arange(6), steps, cfg, torch.Tensor.backward, 6)
    return [p.grad.clone() for p in params], m


def test_one_advantage_per_step_trains_each_step_on_its_own(setup):
    """Equal columns are the trajectory-level update exactly; a column of zeros takes its
    step out of the gradient; on-policy the first ratio is still exactly 1."""
    _, _, rollout, _, _ = setup
    cfg = GrpoConfig(micro_batch=3, beta=0.0, clip_range=0.2)
    steps = trained_steps(rollout, 1.0)
    adv = torch.tensor([1.0, -0.5, -0.5, 0.3, -1.2, 0.9])
    flat, m_flat = _grads(setup, adv, cfg, steps)
    per_step, m_step = _grads(setup, adv[:, None].repeat(1, len(steps)), cfg, steps)
    for a, b in zip(flat, per_step, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    assert m_step["loss/first_ratio_max_dev"] < 1e-5
    # only the last step's column: the gradient of the last step alone (weighted by 1/|steps|)
    last_only = torch.zeros(6, len(steps))
    last_only[:, -1] = adv
    masked, _ = _grads(setup, last_only, cfg, steps)
    alone, _ = _grads(setup, adv, cfg, steps[-1:])
    for a, b in zip(masked, alone, strict=True):
        torch.testing.assert_close(a * len(steps), b, rtol=1e-5, atol=1e-4 * b.abs().max().item())
    with pytest.raises(ValueError, match="one column per trained step"):
        _grads(setup, torch.zeros(6, len(steps) + 1), cfg, steps)
