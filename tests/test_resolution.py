"""sampler.resolution and learner.gradient_checkpointing, on the tiny models."""

import pytest
import torch

from learner.config import GrpoConfig, load_config
from learner.preflight import PreflightError, preflight
from learner.update import accumulate_grpo_gradients
from policy.logprob import trained_steps
from policy.pipeline import LoraSpec, add_lora, build_pipeline
from policy.sampler import SamplerSpec, decode_images, encode_prompts, sample_rollout


@pytest.fixture(scope="module")
def pipe():
    return build_pipeline("tiny-random", num_threads=1)  # 2x VAE, patch 2, 32 latents


def test_a_resolution_sets_the_latent_and_image_size(pipe):
    spec = SamplerSpec(num_steps=3, resolution=32)
    rollout = sample_rollout(pipe, ["a photo of a star"], torch.tensor([1]), spec,
                             max_sequence_length=8)
    assert rollout.latents.shape[-2:] == (16, 16)
    assert decode_images(pipe, rollout.final).shape == (1, 32, 32, 3)
    native = sample_rollout(pipe, ["a photo of a star"], torch.tensor([1]),
                            SamplerSpec(num_steps=3), max_sequence_length=8)
    assert native.latents.shape[-2:] == (32, 32)  # none set: the transformer's sample_size


@pytest.mark.parametrize("resolution, message", [(30, "multiple of 4"), (128, "largest, 64 px")])
def test_a_resolution_the_model_cannot_take_is_refused(pipe, resolution, message):
    with pytest.raises(ValueError, match=message):
        sample_rollout(pipe, ["a photo of a star"], torch.tensor([1]),
                       SamplerSpec(num_steps=3, resolution=resolution), max_sequence_length=8)


def test_preflight_checks_a_local_model_s_resolution():
    base = ["model.path=models/tiny-shapes-sd3", "metrics.port=0"]  # 4x VAE, patch 2, 8 patches
    preflight(load_config(None, base + ["sampler.resolution=32"]))
    for bad, message in (("36", "multiple of 8"), ("128", "largest, 64 px")):
        with pytest.raises(PreflightError, match=message):
            preflight(load_config(None, base + [f"sampler.resolution={bad}"]))


def test_gradient_checkpointing_gives_the_same_gradients(pipe):
    torch.manual_seed(0)
    names = add_lora(pipe.transformer, LoraSpec(rank=4, alpha=8, init_seed=2))
    named = dict(pipe.transformer.named_parameters())
    params = [named[n] for n in names]
    with torch.no_grad():
        for n in names:
            if "lora_B" in n:
                named[n].normal_(0, 0.05)
    prompts = ["a photo of a red circle"] * 2 + ["a photo of two stars"] * 2
    cond, negative = encode_prompts(pipe, prompts, 8), encode_prompts(pipe, [""], 8)
    spec = SamplerSpec(num_steps=4, guidance_scale=4.5)
    rollout = sample_rollout(pipe, prompts, torch.tensor([1, 2, 3, 4]), spec, cond=cond,
                             negative=negative)
    adv, cfg = torch.tensor([1.0, -1.0, 0.5, -0.5]), GrpoConfig(micro_batch=2, beta=0.0)

    def grads():
        for p in params:
            p.grad = None
        accumulate_grpo_gradients(pipe.transformer, rollout, cond, negative, adv,
                                  torch.arange(4), trained_steps(rollout, 1.0), cfg,
                                  torch.Tensor.backward, 4)
        return [p.grad.clone() for p in params]

    plain = grads()
    pipe.transformer.enable_gradient_checkpointing()
    try:
        assert pipe.transformer.is_gradient_checkpointing
        again = grads()
    finally:
        pipe.transformer.disable_gradient_checkpointing()
    for a, b in zip(plain, again, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-8)
