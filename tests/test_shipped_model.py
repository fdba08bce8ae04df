"""The shipped tiny shapes model loads offline and generates."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from shapes.pretrain import load_pretrain_config

MODEL = Path(__file__).resolve().parents[1] / "models" / "tiny-shapes-sd3"


def test_size_and_recipe():
    size = sum(f.stat().st_size for f in MODEL.rglob("*") if f.is_file())
    assert size <= 30 * 2**20, f"{size / 2**20:.1f} MB"
    # The committed recipe is the preset that reproduces it.
    shipped = load_pretrain_config(MODEL / "pretrain_config.yaml")
    assert shipped == load_pretrain_config(MODEL.parents[1] / "configs" / "pretrain_tiny_shapes.yaml")


@pytest.fixture(scope="module")
def pipe():
    # SD3 without T5, the way diffusers documents it: pass the absent encoder as None.
    return StableDiffusion3Pipeline.from_pretrained(MODEL, text_encoder_3=None, tokenizer_3=None)


def test_generates_a_batch_offline(pipe, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    images = pipe(prompt=["a photo of a red circle", "a photo of two blue squares"],
                  num_inference_steps=10, height=64, width=64, output_type="np",
                  max_sequence_length=8, generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 64, 64, 3) and np.isfinite(images).all()
    assert images.min() >= 0.0 and images.max() <= 1.0
