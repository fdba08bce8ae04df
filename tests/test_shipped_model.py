"""The shipped tiny shapes models load offline and generate.

``tiny-shapes-sd3`` has no T5 (diffusers pads the T5 slot with zeros); ``tiny-shapes-sd3-t5``
is the same model trained on with a small T5, a complete SD3 pipeline."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from shapes.pretrain import load_pretrain_config

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"tiny-shapes-sd3": "pretrain_tiny_shapes.yaml",
          "tiny-shapes-sd3-t5": "pretrain_tiny_shapes_t5.yaml"}
PROMPTS = ["a photo of a red circle", "a photo of a blue square left of a green triangle"]


@pytest.mark.parametrize("name", MODELS)
def test_size_and_recipe(name, monkeypatch):
    model = ROOT / "models" / name
    size = sum(f.stat().st_size for f in model.rglob("*") if f.is_file())
    assert size <= 30 * 2**20, f"{size / 2**20:.1f} MB"
    # The committed recipe is the preset that reproduces it.
    monkeypatch.chdir(ROOT)  # a stage-2 recipe names the model it continues, relative to here
    shipped = load_pretrain_config(model / "pretrain_config.yaml")
    assert shipped == load_pretrain_config(ROOT / "configs" / MODELS[name])


def generate(pipe, **kwargs) -> np.ndarray:
    return pipe(prompt=PROMPTS, num_inference_steps=10, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0), **kwargs).images


def test_the_model_without_t5_generates_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # SD3 without T5, the way diffusers documents it: pass the absent encoder as None.
    pipe = StableDiffusion3Pipeline.from_pretrained(
        ROOT / "models" / "tiny-shapes-sd3", text_encoder_3=None, tokenizer_3=None)
    images = generate(pipe, max_sequence_length=8)
    assert images.shape == (2, 64, 64, 3) and np.isfinite(images).all()
    assert images.min() >= 0.0 and images.max() <= 1.0


def test_the_t5_model_loads_and_generates_with_diffusers_defaults(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = StableDiffusion3Pipeline.from_pretrained(ROOT / "models" / "tiny-shapes-sd3-t5")
    assert pipe.text_encoder_3 is not None and pipe.tokenizer_3 is not None
    images = generate(pipe)  # max_sequence_length: diffusers' 256
    assert images.shape == (2, 64, 64, 3) and np.isfinite(images).all()
    # 16 slots (what its presets use) holds every shapes prompt, so the images are close.
    short = generate(pipe, max_sequence_length=16)
    assert np.abs(images - short).mean() < 0.1


def test_the_prompt_encoder_loads_the_t5_model_without_transformer_or_vae():
    from actors.text import PromptEncoder

    encoder = PromptEncoder(str(ROOT / "models" / "tiny-shapes-sd3-t5"), "float32", "cpu", 1)
    assert encoder.pipe.transformer is None and encoder.pipe.vae is None
    table = encoder.build(PROMPTS, 16, max_gib=1.0)
    assert table.embeds.shape[:2] == (3, encoder.pipe.tokenizer.model_max_length + 16)
