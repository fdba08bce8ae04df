"""The standard scorers (rewards.clip, .aesthetic, .compress, .colorful) on a tiny offline CLIP.

The CLIP is built from a config with random weights, with the project's offline BPE
tokenizer (``policy.tiny.build_tokenizer``) and a ``CLIPImageProcessor`` built from
arguments, and saved to a temporary directory: nothing is downloaded.
"""

import io
import subprocess
import sys

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
)

from actors.reward import import_scorer, reward_array
from policy.tiny import DEFAULT_VOCABULARY, build_tokenizer
from rewards.aesthetic import AestheticMLP, LaionAesthetic
from rewards.clip import CLIPScore, PickScore
from rewards.colorful import Colorfulness
from rewards.compress import JpegCompressibility, JpegIncompressibility

PROMPTS = ["a photo of a red circle", "a photo of two blue squares",
           "a photo of a red circle", "three green stars"]
OTHER_PROMPTS = ["a yellow triangle below a star"] * 4
D = 16  # projection_dim of the tiny CLIP


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny CLIP (hidden 32, 2 layers, 32 px, patch 8, projection 16) with its processors."""
    path = tmp_path_factory.mktemp("tiny-clip")
    tokenizer = build_tokenizer(DEFAULT_VOCABULARY, model_max_length=20)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=20,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=32, patch_size=8),
        projection_dim=D,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        CLIPModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
                          ).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def images():
    """Four distinct 48 px images (resized to 32 px by the processor)."""
    rng = np.random.default_rng(0)
    out = rng.integers(0, 256, (4, 48, 48, 3), dtype=np.uint8)
    out[1] = [200, 30, 30]  # flat red
    out[2, :, :24] = [0, 0, 255]  # half blue
    return out


def manual_cosine(path, images, prompts) -> torch.Tensor:
    """cos(E_image, E_text) straight from transformers, independent of rewards.clip."""
    model = CLIPModel.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    processor = AutoImageProcessor.from_pretrained(path, backend="pil")
    with torch.no_grad():
        pixels = processor(images=[Image.fromarray(i) for i in images],
                           return_tensors="pt")["pixel_values"]
        tokens = tokenizer(prompts, padding=True, return_tensors="pt")
        e_img = model.get_image_features(pixel_values=pixels).pooler_output
        e_txt = model.get_text_features(**tokens).pooler_output
    return torch.nn.functional.cosine_similarity(e_img, e_txt, dim=-1), model


def test_clip_score_is_w_times_clamped_cosine(clip_dir, images):
    cos, _ = manual_cosine(clip_dir, images, PROMPTS)
    assert (cos > 0).any() and (cos < 0).any(), "fixture should exercise the clamp both ways"
    scores = CLIPScore(model=str(clip_dir), batch_size=3)(images, PROMPTS, [{}] * 4)
    assert scores.dtype == np.float32 and scores.shape == (4,) and np.isfinite(scores).all()
    np.testing.assert_allclose(scores, 2.5 * cos.clamp(min=0).numpy(), rtol=1e-5, atol=1e-6)
    w1 = CLIPScore(model=str(clip_dir), w=1.0)(images, PROMPTS, [{}] * 4)
    np.testing.assert_allclose(w1, scores / 2.5, rtol=1e-5, atol=1e-7)


def test_clip_score_depends_on_the_prompt_deterministically(clip_dir, images):
    w = 100.0  # a large w makes small cosine differences visible
    scorer = CLIPScore(model=str(clip_dir), w=w)
    first = scorer(images, PROMPTS, [{}] * 4)
    np.testing.assert_array_equal(first, scorer(images, PROMPTS, [{}] * 4))
    cos_other, _ = manual_cosine(clip_dir, images, OTHER_PROMPTS)
    other = scorer(images, OTHER_PROMPTS, [{}] * 4)
    np.testing.assert_allclose(other, w * cos_other.clamp(min=0).numpy(), rtol=1e-5, atol=1e-5)
    assert not np.allclose(first, other)


def test_pickscore_is_logit_scale_times_cosine(clip_dir, images):
    cos, model = manual_cosine(clip_dir, images, PROMPTS)
    scorer = PickScore(model=str(clip_dir), processor=str(clip_dir), batch_size=2)
    scores = scorer(images, PROMPTS, [{}] * 4)
    expected = model.logit_scale.exp().item() * cos.numpy()
    assert scores.dtype == np.float32 and scores.shape == (4,) and np.isfinite(scores).all()
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)
    assert (scores < 0).any(), "raw, not clamped"


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_laion_aesthetic_head_math(clip_dir, images, tmp_path, suffix):
    # The original v2 layout and key names, at tiny widths (input = projection_dim).
    torch.manual_seed(1)
    head = AestheticMLP([D, 24, 12, 8, 4, 1])
    state = head.state_dict()
    assert sorted(state) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7)
                                   for p in ("weight", "bias"))
    path = tmp_path / f"head{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file(state, path)
    scores = LaionAesthetic(head=str(path), clip_model=str(clip_dir))(images, PROMPTS, [{}] * 4)

    model = CLIPModel.from_pretrained(clip_dir).eval()
    processor = AutoImageProcessor.from_pretrained(clip_dir, backend="pil")
    with torch.no_grad():
        pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
        x = model.get_image_features(pixel_values=pixels).pooler_output
        x = x / x.norm(dim=-1, keepdim=True)
        for i in (0, 2, 4, 6, 7):  # no activations in the original head
            x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    assert scores.dtype == np.float32 and scores.shape == (4,)
    np.testing.assert_allclose(scores, x.squeeze(-1).numpy(), rtol=1e-5, atol=1e-6)


def test_laion_aesthetic_linear_head_and_bad_heads(clip_dir, images, tmp_path):
    weight, bias = torch.randn(1, D), torch.tensor([5.0])
    torch.save({"weight": weight, "bias": bias}, tmp_path / "linear.pth")
    scorer = LaionAesthetic(head=str(tmp_path / "linear.pth"), clip_model=str(clip_dir))
    e = scorer.clip.images(images)  # [4, D], unit norm
    np.testing.assert_allclose(e.norm(dim=-1).numpy(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(scorer(images, PROMPTS, [{}] * 4),
                               (e @ weight.T + bias).squeeze(-1).numpy(), rtol=1e-5)

    torch.save({"fc.weight": weight}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match=r"fc\.weight.*layers\.0\.weight"):
        LaionAesthetic(head=str(tmp_path / "odd.pth"), clip_model=str(clip_dir))
    torch.save({"weight": torch.randn(1, 768), "bias": bias}, tmp_path / "wide.pth")
    with pytest.raises(ValueError, match="768-d embeddings but CLIP"):
        LaionAesthetic(head=str(tmp_path / "wide.pth"), clip_model=str(clip_dir))
    with pytest.raises(FileNotFoundError, match="no-head.pth.*local path"):
        LaionAesthetic(head=str(tmp_path / "no-head.pth"), clip_model=str(clip_dir))


def test_missing_weights_fail_with_a_clear_message(clip_dir, tmp_path, monkeypatch):
    missing = str(tmp_path / "no-clip-here")
    with pytest.raises(FileNotFoundError, match=r"model='.*no-clip-here'.*cannot be downloaded"
                       r".*pass the local directory"):
        CLIPScore(model=missing)
    with pytest.raises(FileNotFoundError, match=r"processor='.*no-clip-here'"):
        PickScore(model=str(clip_dir), processor=missing)
    # A hub id with no hub: offline mode fails at once instead of retrying for a minute.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match=r"'solace-rl-test/no-such-clip' is not a local directory"
                       r".*cannot be downloaded"):
        CLIPScore(model="solace-rl-test/no-such-clip")


def jpeg_kb(image: np.ndarray, quality: int) -> float:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return len(buffer.getvalue()) / 1000


def test_jpeg_rewards_equal_pil_sizes(images):
    flat = np.full((1, 48, 48, 3), 128, np.uint8)
    batch = np.concatenate([flat, images])
    comp = JpegCompressibility()(batch, [""] * 5, [{}] * 5)
    incomp = JpegIncompressibility(quality=80)(batch, [""] * 5, [{}] * 5)
    assert comp.dtype == np.float32 and comp.shape == (5,)
    np.testing.assert_allclose(comp, [-jpeg_kb(i, 95) for i in batch], rtol=1e-6)
    np.testing.assert_allclose(incomp, [jpeg_kb(i, 80) for i in batch], rtol=1e-6)
    assert comp[0] > comp[1]  # flat gray compresses better than noise
    np.testing.assert_array_equal(comp, JpegCompressibility()(batch, [""] * 5, [{}] * 5))
    with pytest.raises(ValueError, match="quality"):
        JpegCompressibility(quality=0)


def test_colorfulness_by_hand():
    gray = np.zeros((2, 8, 8, 3), np.uint8)
    gray[0] = 128
    gray[1] = np.arange(64, dtype=np.uint8).reshape(8, 8, 1) * 4  # R = G = B, varying
    red_green = np.zeros((1, 8, 8, 3), np.uint8)
    red_green[0, :, :4, 0] = 255
    red_green[0, :, 4:, 1] = 255
    # rg = +-255: std 255, mean 0; yb = 127.5 everywhere: std 0, mean 127.5.
    # M = sqrt(255^2 + 0) + 0.3 * sqrt(0 + 127.5^2) = 255 + 38.25 = 293.25
    scores = Colorfulness()(np.concatenate([gray, red_green]), [""] * 3, [{}] * 3)
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, [0.0, 0.0, 2.9325], atol=1e-6)
    np.testing.assert_allclose(Colorfulness(scale=1.0)(red_green, [""], [{}]), [293.25])
    with pytest.raises(ValueError, match=r"uint8 \[N, H, W, 3\]"):
        Colorfulness()(red_green.astype(np.float32), [""], [{}])


def test_every_scorer_through_import_scorer(clip_dir, images, tmp_path):
    torch.save(AestheticMLP([D, 24, 12, 8, 4, 1]).state_dict(), tmp_path / "head.pth")
    targets = {
        "rewards.clip:CLIPScore": {"model": str(clip_dir)},
        "rewards.clip:PickScore": {"model": str(clip_dir), "processor": str(clip_dir)},
        "rewards.aesthetic:LaionAesthetic": {"head": str(tmp_path / "head.pth"),
                                             "clip_model": str(clip_dir)},
        "rewards.compress:JpegCompressibility": {},
        "rewards.compress:JpegIncompressibility": {"quality": 90},
        "rewards.colorful:Colorfulness": {},
    }
    metadata = [{"prompt": p} for p in PROMPTS]
    for target, kwargs in targets.items():
        scorer = import_scorer(target, kwargs)
        assert isinstance(type(scorer).name, str) and isinstance(type(scorer).version, str)
        reward = reward_array(scorer(images, PROMPTS, metadata), len(images), target)
        assert reward.dtype == np.float32 and reward.shape == (4,)


def test_scorers_import_neither_ray_nor_deepspeed():
    code = ("import sys, rewards.clip, rewards.aesthetic, rewards.compress, rewards.colorful; "
            "print(sorted({'ray', 'deepspeed'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
