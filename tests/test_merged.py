"""``self_confidence.merge_lora``: the reward's forwards with the LoRA merged (policy.merged)."""

import torch

from actors.reward import SelfConfidenceWorker
from policy.merged import merged_lora
from policy.pipeline import (
    LoraSpec,
    add_lora,
    build_pipeline,
    load_lora_state_dict,
    lora_state_dict,
)
from policy.sampler import SamplerSpec, encode_prompts, sample_rollout
from policy.weights import flatten_weights, unflatten_weights
from rewards.self_confidence import score_rollout

LORA = LoraSpec(rank=4, alpha=8, init_seed=3)
PROMPTS = ["a red circle"] * 2 + ["a blue square"] * 2


def moved_lora(transformer, seed: int, version: int):
    """The adapter's weights with B off zero (so the adapter matters), as a weight version."""
    g = torch.Generator().manual_seed(seed)
    state = {k: (torch.randn(v.shape, generator=g) * 0.05 if "lora_B" in k else v.detach())
             for k, v in lora_state_dict(transformer).items()}
    return flatten_weights(state, version)


def base_weights(transformer):
    return {n: p.detach().clone() for n, p in transformer.named_parameters() if "lora_" not in n}


def test_merged_scores_equal_unmerged_and_the_base_weights_come_back_exactly():
    torch.set_num_threads(1)
    pipe = build_pipeline("tiny-random", num_threads=1)
    add_lora(pipe.transformer, LORA)
    before = base_weights(pipe.transformer)
    cond = encode_prompts(pipe, PROMPTS, 8)
    rollout = sample_rollout(pipe, PROMPTS, torch.arange(4), SamplerSpec(num_steps=4),
                             cond=cond, negative=encode_prompts(pipe, [""], 8))
    for seed, version in ((1, 1), (2, 2)):  # a second version merges again after the first
        load_lora_state_dict(pipe.transformer, unflatten_weights(moved_lora(pipe.transformer,
                                                                            seed, version)))
        plain, _ = score_rollout(pipe.transformer, rollout, cond, 0, 4, 0.5, 1e-6, "paper")
        with merged_lora(pipe.transformer):
            merged, _ = score_rollout(pipe.transformer, rollout, cond, 0, 4, 0.5, 1e-6, "paper")
        torch.testing.assert_close(merged, plain, rtol=0, atol=1e-5)
        after = base_weights(pipe.transformer)
        assert all(torch.equal(after[n], before[n]) for n in before)  # bit for bit
        assert not any(m.merged for m in pipe.transformer.modules() if hasattr(m, "merged"))


def test_the_reward_worker_merges_on_request():
    torch.set_num_threads(1)
    kwargs = dict(model_path="tiny-random", dtype="float32", device="cpu", num_threads=1,
                  lora=LORA, max_sequence_length=8, run_seed=0, num_probes=4)
    plain = SelfConfidenceWorker(**kwargs)
    merged = SelfConfidenceWorker(**kwargs, merge_lora=True)
    weights = moved_lora(plain.policy.pipe.transformer, 1, 0)
    pipe = plain.policy.pipe
    plain.policy.load(weights)
    rollout = sample_rollout(pipe, PROMPTS, torch.arange(4), SamplerSpec(num_steps=4),
                             cond=encode_prompts(pipe, PROMPTS, 8),
                             negative=encode_prompts(pipe, [""], 8)).numpy()
    a, b = plain.score(rollout, weights), merged.score(rollout, weights)
    assert abs(a.reward - b.reward).max() < 1e-5 and a.weight_version == b.weight_version == 0
