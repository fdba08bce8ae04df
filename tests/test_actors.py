"""The actor classes as plain objects (no Ray): rollout and reward workers on the tiny SD3."""

import dataclasses
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from actors.reward import ExternalRewardWorker, Scores, SelfConfidenceWorker
from actors.rollout import RolloutWorker
from policy.pipeline import LoraSpec, lora_state_dict
from policy.sampler import (
    PROBE_STREAM,
    SamplerSpec,
    conditional_velocity,
    derive_seed,
    encode_prompts,
    sample_seed,
    suffix_window,
)
from policy.weights import FlatWeights, flatten_weights
from rewards.self_confidence import self_confidence

LORA = LoraSpec(rank=4, alpha=8)
SPEC = SamplerSpec(num_steps=4)
MAX_SEQ = 8
RUN_SEED = 11
GROUPS = [(3, "a photo of a circle"), (7, "a photo of two red squares")]
G = 3


def policy_args() -> dict:
    return dict(model_path="tiny-random", dtype="float32", device="cpu", num_threads=1,
                lora=LORA, max_sequence_length=MAX_SEQ, run_seed=RUN_SEED)


def make_weights(worker, version: int, scale: float, seed: int = 0) -> FlatWeights:
    """The worker's adapter with its B matrices moved by ``scale`` noise, as version ``version``."""
    g = torch.Generator().manual_seed(seed)
    state = {
        k: v + torch.randn(v.shape, generator=g) * scale if "lora_B" in k else v
        for k, v in lora_state_dict(worker.policy.pipe.transformer).items()
    }
    return flatten_weights(state, version)


@pytest.fixture(scope="module")
def roller():
    return RolloutWorker(sampler=SPEC, **policy_args())


@pytest.fixture(scope="module")
def weights(roller):
    return {0: make_weights(roller, 0, 0.0), 1: make_weights(roller, 1, 0.2, seed=1)}


@pytest.fixture(scope="module")
def rollouts(roller, weights):
    """Rollouts of GROUPS at versions 0 and 1, and of the second group alone at version 0."""
    roller.set_weights(weights[1])
    r1 = roller.sample(GROUPS, step=2, group_size=G)
    roller.set_weights(weights[0])
    return {"v0": roller.sample(GROUPS, step=2, group_size=G), "v1": r1,
            "v0_second": roller.sample(GROUPS[1:], step=2, group_size=G)}


@pytest.fixture(scope="module")
def scorers():
    return [SelfConfidenceWorker(num_probes=4, **policy_args()) for _ in range(2)]


def test_rollout_worker_refuses_to_sample_before_it_has_weights():
    worker = RolloutWorker(sampler=SPEC, **policy_args())
    with pytest.raises(RuntimeError, match="set_weights"):
        worker.sample(GROUPS, step=0, group_size=2)


def test_rollout_worker_samples_whole_groups_with_derived_seeds(rollouts):
    r = rollouts["v0"]
    for name in ("latents", "log_probs", "sigmas", "seeds", "prompt_ids"):
        assert isinstance(getattr(r, name), np.ndarray), name
    assert r.latents.shape == (2 * G, SPEC.num_steps + 1, 4, 32, 32)
    assert r.latents.dtype == np.float32 and r.log_probs.shape == (2 * G, SPEC.num_steps)
    assert r.prompt_ids.tolist() == [3, 3, 3, 7, 7, 7]
    assert r.prompts == [GROUPS[0][1]] * G + [GROUPS[1][1]] * G
    assert r.seeds.tolist() == [sample_seed(RUN_SEED, 2, i, k) for i in (3, 7) for k in range(G)]
    assert r.weight_version == 0 and r.spec == SPEC
    assert np.isfinite(r.latents).all() and np.isfinite(r.log_probs).all()


def test_rollout_worker_is_deterministic_and_batch_independent(roller, weights, rollouts):
    roller.set_weights(weights[0])
    again = roller.sample(GROUPS, step=2, group_size=G)
    np.testing.assert_array_equal(again.latents, rollouts["v0"].latents)
    np.testing.assert_array_equal(again.log_probs, rollouts["v0"].log_probs)
    # The second group sampled on its own equals its rows of the two-group call (up to
    # float rounding: CPU matmul kernels sum in a batch-size-dependent order).
    np.testing.assert_allclose(rollouts["v0_second"].latents, rollouts["v0"].latents[G:],
                               rtol=0, atol=1e-5)
    np.testing.assert_array_equal(rollouts["v0_second"].seeds, rollouts["v0"].seeds[G:])
    other_step = roller.sample(GROUPS, step=3, group_size=G)
    assert not np.array_equal(other_step.latents, again.latents)


def test_set_weights_changes_outputs_and_skips_a_loaded_version(roller, weights, rollouts):
    assert roller.set_weights(weights[1]) == 1
    out = roller.sample(GROUPS, step=2, group_size=G)
    assert out.weight_version == 1
    np.testing.assert_array_equal(out.latents, rollouts["v1"].latents)
    assert not np.allclose(out.latents[:, -1], rollouts["v0"].latents[:, -1])
    # Versions are immutable: a buffer claiming a loaded version is not loaded again.
    impostor = dataclasses.replace(weights[1], buffer=np.zeros_like(weights[1].buffer))
    assert roller.set_weights(impostor) == 1
    np.testing.assert_array_equal(roller.sample(GROUPS, step=2, group_size=G).latents,
                                  out.latents)
    assert roller.set_weights(weights[0]) == 0


def test_self_confidence_is_the_same_whatever_worker_or_batch(scorers, weights, rollouts):
    a, b = scorers
    both = a.score(rollouts["v0"], weights[0])
    alone = b.score(rollouts["v0_second"], weights[0])
    assert isinstance(both, Scores) and both.reward_name == "self_confidence"
    assert both.reward.dtype == np.float32 and both.reward.shape == (2 * G,)
    num_probe_steps = len(range(*suffix_window(SPEC.num_steps - 1, 0.5)))
    assert both.per_step.shape == (2 * G, num_probe_steps) and np.isfinite(both.reward).all()
    assert both.sample_keys == tuple(zip(rollouts["v0"].prompt_ids.tolist(),
                                         rollouts["v0"].seeds.tolist(), strict=True))
    assert both.weight_version == 0
    # Same probes, same model; only float rounding of the batch size differs.
    np.testing.assert_allclose(alone.reward, both.reward[G:], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(alone.per_step, both.per_step[G:], rtol=1e-5, atol=1e-6)
    assert alone.sample_keys == both.sample_keys[G:]


def test_self_confidence_probes_are_seeded_by_run_version_and_group(scorers, weights, rollouts):
    worker = scorers[0]
    r = rollouts["v0"]
    got = worker.score(r, weights[0])
    pipe = worker.policy.pipe
    rt = r.torch()
    rows = slice(G, 2 * G)
    seed = derive_seed(RUN_SEED, PROBE_STREAM, 0, 7, int(r.seeds[G]))
    expected = self_confidence(
        conditional_velocity(pipe.transformer), rt.final[rows], rt.sigmas,
        encode_prompts(pipe, r.prompts[rows], MAX_SEQ), num_probes=4,
        probe_window=suffix_window(SPEC.num_steps - 1, 0.5),
        generator=torch.Generator().manual_seed(seed),
    )
    # Equal up to the float rounding of the batch size (on some CPUs it differs by 1 ulp).
    np.testing.assert_allclose(got.reward[rows], expected.reward.numpy(), rtol=1e-5, atol=1e-6)


def test_self_confidence_loads_the_rollouts_version(scorers, weights, rollouts):
    a, b = scorers
    b.score(rollouts["v0"], weights[0])
    assert b.version == 0
    s1 = b.score(rollouts["v1"], weights[1])
    assert b.version == 1 and s1.weight_version == 1
    np.testing.assert_array_equal(a.score(rollouts["v1"], weights[1]).reward, s1.reward)
    # The same latents scored as if version 0 had made them: different weights, other reward.
    as_v0 = dataclasses.replace(rollouts["v1"], weight_version=0)
    assert not np.allclose(b.score(as_v0, weights[0]).reward, s1.reward)


def test_offline_scoring_uses_the_frozen_base_model(scorers, weights, rollouts):
    """policy 'base' (an ablation) ignores the pushed LoRA: it scores like the base model,
    i.e. like the initial adapter (LoRA B = 0) handed in under the rollout's version."""
    offline = SelfConfidenceWorker(num_probes=4, scoring_policy="base", **policy_args())
    online = SelfConfidenceWorker(num_probes=4, **policy_args())
    base_as_v1 = dataclasses.replace(weights[0], version=1)
    got = offline.score(rollouts["v1"], weights[1]).reward
    np.testing.assert_array_equal(got, online.score(rollouts["v1"], base_as_v1).reward)
    assert not np.allclose(got, scorers[0].score(rollouts["v1"], weights[1]).reward)


def test_scoring_with_cfg_changes_the_reward(scorers, weights, rollouts):
    with_cfg = SelfConfidenceWorker(num_probes=4, guidance_scale=4.5, **policy_args())
    plain = scorers[0].score(rollouts["v0"], weights[0]).reward
    guided = with_cfg.score(rollouts["v0"], weights[0]).reward
    assert np.isfinite(guided).all() and not np.allclose(guided, plain)


def test_self_confidence_refuses_weights_of_another_version(scorers, weights, rollouts):
    with pytest.raises(ValueError, match="version 0 .* version 1"):
        scorers[0].score(rollouts["v0"], weights[1])


@dataclass
class Graded:
    partial: np.ndarray


class MeanBrightness:
    """A fake external scorer: mean pixel value / 255, times ``scale``; records its inputs."""

    def __init__(self, scale: float = 1.0, wrap: bool = False) -> None:
        self.scale, self.wrap, self.calls = scale, wrap, []

    def __call__(self, images: np.ndarray, prompts: list[str], metadata: list[dict]):
        self.calls.append((images, prompts, metadata))
        reward = images.reshape(len(images), -1).mean(axis=1) / 255.0 * self.scale
        return Graded(reward) if self.wrap else reward


@pytest.mark.parametrize("wrap", [False, True])
def test_external_reward_worker_decodes_and_scores(rollouts, wrap):
    table = [{"prompt": f"row {i}", "tag": "single_object"} for i in range(8)]
    worker = ExternalRewardWorker(
        f"{__name__}:MeanBrightness", "brightness", "tiny-random", num_threads=1,
        scorer_kwargs={"scale": 2.0, "wrap": wrap}, metadata=table,
    )
    r = rollouts["v1"]
    scores = worker.score(r)
    images, prompts, metadata = worker.scorer.calls[-1]
    assert images.dtype == np.uint8 and images.shape == (2 * G, 64, 64, 3)
    assert prompts == r.prompts and metadata == [table[3]] * G + [table[7]] * G
    expected = images.reshape(2 * G, -1).mean(axis=1) / 255.0 * 2.0
    np.testing.assert_allclose(scores.reward, expected, rtol=1e-6)
    assert scores.reward.dtype == np.float32 and scores.per_step is None
    assert scores.reward_name == "brightness" and scores.weight_version == 1
    assert len(scores) == 2 * G


def test_external_reward_worker_names_a_bad_scorer_path():
    with pytest.raises(ValueError, match="module:Class"):
        ExternalRewardWorker("no_colon_here", "x", "tiny-random")


def test_worker_modules_do_not_import_ray():
    code = ("import sys, actors.rollout, actors.reward\n"
            "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] == 'ray')))")
    # A fresh interpreter: this test process may have imported ray elsewhere.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"ray modules imported: {out.stdout.strip()}"


def test_rollouts_and_scores_in_chunks_are_those_of_one_batch(weights, rollouts):
    """rollout.micro_batch and self_confidence.micro_batch bound what is denoised or
    probed at once; the samples and the rewards stay those of one batch."""
    chunked = RolloutWorker(sampler=SPEC, micro_batch=4, **policy_args())  # 6 samples: 4 + 2
    r = chunked.sample(GROUPS, step=2, group_size=G, weights=weights[0])
    whole = rollouts["v0"]
    np.testing.assert_allclose(r.latents, whole.latents, rtol=0, atol=1e-5)
    np.testing.assert_allclose(r.log_probs, whole.log_probs, rtol=0, atol=1e-5)
    assert np.array_equal(r.seeds, whole.seeds) and np.array_equal(r.prompt_ids, whole.prompt_ids)
    args = policy_args()
    one = SelfConfidenceWorker(**args, num_probes=4)
    pieces = SelfConfidenceWorker(**args, num_probes=4, micro_batch=5)  # 4 x 3 = 12 a group
    a, b = one.score(whole, weights[0]), pieces.score(whole, weights[0])
    np.testing.assert_allclose(b.reward, a.reward, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b.per_step, a.per_step, rtol=1e-5, atol=1e-6)


def test_an_external_reward_actor_holds_the_vae_alone_and_decodes_as_the_pipeline(rollouts):
    from policy.pipeline import build_pipeline
    from policy.sampler import decode_images

    for path in ("tiny-random", "models/tiny-shapes-sd3"):
        worker = ExternalRewardWorker(f"{__name__}:MeanBrightness", "b", path, num_threads=1)
        assert not hasattr(worker, "pipe")  # no transformer or text encoders resident
        pipe = build_pipeline(path)
        latents = torch.randn(2, pipe.transformer.config.in_channels, 8, 8,
                              generator=torch.Generator().manual_seed(0))
        worker.score(dataclasses.replace(rollouts["v0"], latents=latents[:, None].numpy(),
                                         prompt_ids=np.array([3, 7]), seeds=np.array([1, 2]),
                                         prompts=["a", "b"]))
        images = worker.scorer.calls[-1][0]
        assert np.array_equal(images, decode_images(pipe, latents))


def test_with_a_prompt_table_workers_hold_no_text_encoder_and_give_the_same_results(
        roller, weights, rollouts, scorers):
    """model.prompt_table: the conditioning comes from a table built once by the
    PromptEncoder (no transformer, no VAE), and the workers load no text encoder."""
    from actors.text import PromptEncoder

    encoder = PromptEncoder("tiny-random", "float32", "cpu", 1)
    assert encoder.pipe.vae is None  # (tiny-random has no T5: its transformer stays)
    table = encoder.build([p for _, p in GROUPS], MAX_SEQ, max_gib=1.0)
    assert table.prompts == ("", *(p for _, p in GROUPS))
    roller_t = RolloutWorker(sampler=SPEC, prompt_table=table, **policy_args())
    scorer_t = SelfConfidenceWorker(num_probes=4, prompt_table=table, **policy_args())
    for worker in (roller_t, scorer_t):
        held = worker.resident()
        assert "transformer" in held and not any(n.startswith(("text_encoder", "tokenizer"))
                                                 for n in held), held
    assert any(n.startswith("text_encoder") for n in roller.resident())
    r = roller_t.sample(GROUPS, step=2, group_size=G, weights=weights[0])
    np.testing.assert_allclose(r.latents, rollouts["v0"].latents, atol=1e-5)
    np.testing.assert_allclose(r.log_probs, rollouts["v0"].log_probs, atol=1e-4)
    np.testing.assert_allclose(scorer_t.score(rollouts["v0"], weights[0]).reward,
                               scorers[0].score(rollouts["v0"], weights[0]).reward, atol=1e-4)
    with pytest.raises(KeyError, match="not in the prompt table of 3 prompts"):
        roller_t.sample([(9, "a photo of a star")], step=0, group_size=1)
    with pytest.raises(ValueError, match="prompt_table_max_gib"):
        encoder.build([f"a photo of {i} circles" for i in range(50)], MAX_SEQ, max_gib=1e-6)
