"""Tests of the tiny offline SD3 pipeline and of LoRA handling in `policy.pipeline`."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from policy.pipeline import (
    LoraSpec,
    adapter_disabled,
    add_lora,
    load_fused_lora,
    load_lora_state_dict,
    load_pipeline,
    lora_state_dict,
    save_lora,
    t5_overflow,
)
from policy.tiny import DEFAULT_VOCABULARY, TINY_IMAGE_SIZE, build_t5_tokenizer, build_tiny_pipeline

PROMPT = "a photo of two red squares"
# Rank differs from alpha so a loader that drops alpha would scale the update wrongly.
SMALL_LORA = LoraSpec(rank=4, alpha=16)


def transformer_inputs(pipe: StableDiffusion3Pipeline, batch: int = 2) -> dict[str, torch.Tensor]:
    """Fixed random transformer inputs of the shapes the pipeline would pass."""
    generator = torch.Generator().manual_seed(123)
    config = pipe.transformer.config
    side = config.sample_size
    return {
        "hidden_states": torch.randn(batch, config.in_channels, side, side, generator=generator),
        "encoder_hidden_states": torch.randn(
            batch, 7, config.joint_attention_dim, generator=generator
        ),
        "pooled_projections": torch.randn(batch, config.pooled_projection_dim, generator=generator),
        "timestep": torch.tensor([250.0, 750.0][:batch]),
    }


@torch.no_grad()
def velocity(transformer: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return transformer(**inputs, return_dict=False)[0]


def perturb_lora_b(transformer: torch.nn.Module, seed: int = 7) -> None:
    """Give the zero-initialised B matrices random values so the adapter does something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))


def all_state(pipe: StableDiffusion3Pipeline) -> dict[str, torch.Tensor]:
    modules = ("transformer", "vae", "text_encoder", "text_encoder_2")
    return {f"{m}.{k}": v for m in modules for k, v in getattr(pipe, m).state_dict().items()}


def test_tiny_build_is_deterministic_per_seed_and_leaves_global_rng_alone():
    rng_before = torch.random.get_rng_state()
    first, second = all_state(build_tiny_pipeline(seed=0)), all_state(build_tiny_pipeline(seed=0))
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    other = all_state(build_tiny_pipeline(seed=1))
    assert not torch.equal(
        first["transformer.proj_out.weight"], other["transformer.proj_out.weight"]
    )
    assert not torch.equal(
        first["text_encoder.text_model.embeddings.token_embedding.weight"],
        other["text_encoder.text_model.embeddings.token_embedding.weight"],
    )


def test_tokenizer_gives_each_vocabulary_word_one_known_token():
    pipe = build_tiny_pipeline()
    for tokenizer in (pipe.tokenizer, pipe.tokenizer_2):
        for word in DEFAULT_VOCABULARY:
            ids = tokenizer(word, add_special_tokens=False).input_ids
            assert len(ids) == 1, (word, tokenizer.convert_ids_to_tokens(ids))
            assert ids[0] != tokenizer.unk_token_id, word
        # An unknown word falls back to byte symbols instead of the unknown token.
        ids = tokenizer("a zebra, 3!", add_special_tokens=False).input_ids
        assert len(ids) > 2 and tokenizer.unk_token_id not in ids


def test_text_encoder_pools_at_the_eos_token():
    pipe = build_tiny_pipeline()
    tokens = pipe.tokenizer([PROMPT], padding="max_length", max_length=20, return_tensors="pt")
    eos_position = PROMPT.count(" ") + 2  # BOS, six words, then EOS
    assert tokens.input_ids[0, eos_position] == pipe.tokenizer.eos_token_id
    assert pipe.text_encoder.config.eos_token_id == pipe.tokenizer.eos_token_id
    with torch.no_grad():
        out = pipe.text_encoder(tokens.input_ids, output_hidden_states=True)
        expected = pipe.text_encoder.text_projection(out.last_hidden_state[0, eos_position])
    assert len(out.hidden_states) == 3  # embeddings + 2 layers: hidden_states[-2] exists
    torch.testing.assert_close(out.text_embeds[0], expected)


def test_pipeline_generates_a_finite_image():
    pipe = build_tiny_pipeline()
    image = pipe(
        prompt=[PROMPT], num_inference_steps=2, height=64, width=64, output_type="np"
    ).images
    assert TINY_IMAGE_SIZE == 64
    assert image.shape == (1, 64, 64, 3)
    assert np.isfinite(image).all()
    assert image.min() >= 0.0 and image.max() <= 1.0


def test_save_pretrained_then_load_pipeline_round_trips(tmp_path):
    pipe = build_tiny_pipeline(seed=3)
    pipe.save_pretrained(tmp_path)
    loaded = load_pipeline(str(tmp_path))
    assert loaded.text_encoder_3 is None and loaded.tokenizer_3 is None
    assert loaded.tokenizer.model_max_length == pipe.tokenizer.model_max_length
    assert loaded.tokenizer(PROMPT).input_ids == pipe.tokenizer(PROMPT).input_ids
    inputs = transformer_inputs(pipe)
    assert torch.equal(velocity(loaded.transformer, inputs), velocity(pipe.transformer, inputs))
    with torch.no_grad():
        assert torch.equal(
            loaded.encode_prompt(PROMPT, None, None)[2], pipe.encode_prompt(PROMPT, None, None)[2]
        )
    # Loaded for inference and as the frozen base of a LoRA.
    assert not any(
        p.requires_grad for m in (loaded.transformer, loaded.vae) for p in m.parameters()
    )
    assert not loaded.vae.training and not loaded.text_encoder.training


def test_diffusers_from_pretrained_round_trips_with_t5_passed_as_none(tmp_path):
    pipe = build_tiny_pipeline()
    pipe.save_pretrained(tmp_path)
    loaded = StableDiffusion3Pipeline.from_pretrained(
        tmp_path, text_encoder_3=None, tokenizer_3=None
    )
    inputs = transformer_inputs(pipe)
    assert torch.equal(velocity(loaded.transformer, inputs), velocity(pipe.transformer, inputs))


def test_t5_tokenizer_keeps_each_word_whole_and_spells_unknown_words():
    tokenizer = build_t5_tokenizer(DEFAULT_VOCABULARY)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    for word in DEFAULT_VOCABULARY:
        ids = tokenizer(word).input_ids
        assert len(ids) == 2 and ids[-1] == tokenizer.eos_token_id, (word, ids)
    ids = tokenizer("a zebra, 3!").input_ids
    assert tokenizer.unk_token_id not in ids and len(ids) > 4
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a zebra, 3!"


def test_a_t5_leaves_the_other_weights_and_loads_with_plain_from_pretrained(tmp_path):
    without, with_t5 = all_state(build_tiny_pipeline(seed=2)), build_tiny_pipeline(seed=2, t5_layers=1)
    assert all(torch.equal(without[k], v) for k, v in all_state(with_t5).items())
    with_t5.save_pretrained(tmp_path)
    loaded = StableDiffusion3Pipeline.from_pretrained(tmp_path)  # nothing passed as None
    assert loaded.text_encoder_3.config.d_model == with_t5.transformer.config.joint_attention_dim
    long = "a photo of a red circle left of a blue square"
    with torch.no_grad():
        mine, theirs = (p.encode_prompt(long, None, None, max_sequence_length=16)[0]
                        for p in (with_t5, loaded))
    torch.testing.assert_close(mine, theirs)
    # The T5 half of the text sequence is the encoder's output, not zeros.
    assert mine[:, -16:].abs().sum() > 0
    images = loaded(prompt=[long], num_inference_steps=2, height=64, width=64,
                    output_type="np").images  # diffusers' default 256 T5 slots
    assert np.isfinite(images).all()


def test_t5_overflow_names_the_longest_prompt():
    tokenizer = build_t5_tokenizer(DEFAULT_VOCABULARY)
    prompts = ["a photo of a circle", "a photo of a red circle left of a blue square"]
    over = t5_overflow(tokenizer, prompts, 8)
    assert (over.count, over.longest, over.tokens) == (1, prompts[1], 12)
    assert t5_overflow(tokenizer, prompts, 12) is None
    assert t5_overflow(None, prompts, 1) is None  # no T5, nothing to cut


def test_load_pipeline_names_a_missing_or_incomplete_directory(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        load_pipeline(str(tmp_path / "no_such_model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_pipeline(str(tmp_path / "empty"))
    # A relative "org/name" whose first folder exists here is a local path, not a hub id.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="empty/missing"):
        load_pipeline("empty/missing")


def test_add_lora_trains_only_lora_and_starts_as_the_base_model():
    transformer = build_tiny_pipeline().transformer
    transformer.requires_grad_(False)
    inputs = transformer_inputs(build_tiny_pipeline())
    before = velocity(transformer, inputs)
    trainable = add_lora(transformer, SMALL_LORA)
    assert torch.equal(velocity(transformer, inputs), before)
    requiring_grad = [n for n, p in transformer.named_parameters() if p.requires_grad]
    assert trainable == requiring_grad
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    for target in SMALL_LORA.target_modules:
        assert any(f".{target}.lora_A." in n for n in trainable), target
    # The last block is context_pre_only: it has no to_add_out, the first one does.
    assert not any(n.startswith("transformer_blocks.1.attn.to_add_out") for n in trainable)


def test_add_lora_init_is_seeded():
    first, second = build_tiny_pipeline().transformer, build_tiny_pipeline().transformer
    add_lora(first, SMALL_LORA)
    add_lora(second, SMALL_LORA)
    one, two = lora_state_dict(first), lora_state_dict(second)
    assert all(torch.equal(one[key], two[key]) for key in one)


def test_add_lora_rejects_a_target_that_matches_nothing():
    transformer = build_tiny_pipeline().transformer
    spec = LoraSpec(target_modules=("attn.to_q", "attn.to_qq"))
    with pytest.raises(ValueError, match=r"'attn\.to_qq'.*attn\.to_q"):
        add_lora(transformer, spec)


def test_adapter_disabled_runs_the_base_model_and_restores_the_adapter():
    pipe = build_tiny_pipeline()
    inputs = transformer_inputs(pipe)
    base = velocity(pipe.transformer, inputs)
    add_lora(pipe.transformer, SMALL_LORA)
    perturb_lora_b(pipe.transformer)
    adapted = velocity(pipe.transformer, inputs)
    assert not torch.allclose(adapted, base)

    with adapter_disabled(pipe.transformer):
        assert torch.equal(velocity(pipe.transformer, inputs), base)
    assert torch.equal(velocity(pipe.transformer, inputs), adapted)

    # A rollout worker keeps the LoRA frozen; peft's re-enable would unfreeze it.
    pipe.transformer.requires_grad_(False)
    with pytest.raises(RuntimeError, match="boom"), adapter_disabled(pipe.transformer):
        raise RuntimeError("boom")
    assert torch.equal(velocity(pipe.transformer, inputs), adapted)
    assert not any(p.requires_grad for p in pipe.transformer.parameters())


def test_adapter_disabled_is_a_no_op_without_an_adapter():
    pipe = build_tiny_pipeline()
    inputs = transformer_inputs(pipe)
    base = velocity(pipe.transformer, inputs)
    with adapter_disabled(pipe.transformer):
        assert torch.equal(velocity(pipe.transformer, inputs), base)


def test_lora_state_dict_loads_exactly_and_strictly():
    source, target = build_tiny_pipeline(), build_tiny_pipeline()
    inputs = transformer_inputs(source)
    add_lora(source.transformer, SMALL_LORA)
    add_lora(target.transformer, SMALL_LORA)
    perturb_lora_b(source.transformer)
    state = lora_state_dict(source.transformer)
    load_lora_state_dict(target.transformer, state)
    assert torch.equal(velocity(target.transformer, inputs), velocity(source.transformer, inputs))

    dropped = next(iter(state))
    with pytest.raises(ValueError, match="missing.*" + dropped.replace(".", r"\.")):
        load_lora_state_dict(target.transformer, {k: v for k, v in state.items() if k != dropped})
    with pytest.raises(ValueError, match="unexpected.*extra.lora_A.weight"):
        load_lora_state_dict(target.transformer, {**state, "extra.lora_A.weight": torch.zeros(1)})


def saved_adapter(directory: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Save a perturbed adapter to ``directory``; return the inputs and its velocity on them."""
    pipe = build_tiny_pipeline()
    inputs = transformer_inputs(pipe)
    add_lora(pipe.transformer, SMALL_LORA)
    perturb_lora_b(pipe.transformer)
    save_lora(pipe, directory)
    return inputs, velocity(pipe.transformer, inputs)


def test_save_lora_loads_into_a_fresh_pipeline_with_load_lora_weights(tmp_path):
    inputs, adapted = saved_adapter(tmp_path)
    fresh = build_tiny_pipeline()
    base = velocity(fresh.transformer, inputs)
    fresh.load_lora_weights(tmp_path)
    torch.testing.assert_close(velocity(fresh.transformer, inputs), adapted)
    assert not torch.allclose(adapted, base)
    # The loaded adapter is ours to manage too: the KL reference still works.
    with adapter_disabled(fresh.transformer):
        assert torch.equal(velocity(fresh.transformer, inputs), base)


def test_load_fused_lora_gives_the_adapted_velocity_without_lora_layers(tmp_path):
    inputs, adapted = saved_adapter(tmp_path)
    fresh = build_tiny_pipeline()
    load_fused_lora(fresh, tmp_path)
    torch.testing.assert_close(velocity(fresh.transformer, inputs), adapted, rtol=1e-4, atol=1e-5)
    assert not any("lora_" in name for name, _ in fresh.transformer.named_parameters())


def test_policy_modules_do_not_import_ray_or_deepspeed():
    code = (
        "import sys, policy.pipeline as p, policy.tiny as t\n"
        "p.add_lora(t.build_tiny_pipeline().transformer, p.LoraSpec(rank=2))\n"
        "print(sorted(m for m in ('ray', 'deepspeed') if m in sys.modules))\n"
    )
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_lora_init_is_the_references_gaussian_by_default_and_b_starts_at_zero():
    from policy.pipeline import LoraSpec, add_lora

    stds = {}
    for init in ("gaussian", "kaiming"):
        transformer = build_tiny_pipeline(seed=0).transformer
        add_lora(transformer, LoraSpec(rank=4, alpha=8, init=init))
        a = torch.cat([p.flatten() for n, p in transformer.named_parameters() if "lora_A" in n])
        b = torch.cat([p.flatten() for n, p in transformer.named_parameters() if "lora_B" in n])
        assert torch.all(b == 0)
        stds[init] = float(a.detach().std())
    assert stds["gaussian"] == pytest.approx(1 / 4, rel=0.1)  # peft's "gaussian": std 1/r
    assert abs(stds["kaiming"] - 1 / 4) > 0.05  # the other init is another distribution
    assert LoraSpec().init == "gaussian"
