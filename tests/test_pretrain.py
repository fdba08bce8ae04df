"""The pretraining entry point in a few-step mode, and the evaluation CLI."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from policy.pipeline import load_pipeline
from shapes import eval_model
from shapes.pretrain import load_pretrain_config, main, pretrain, sequence_length
from shapes.prompts import pretraining_metadata

ROOT = Path(__file__).resolve().parents[1]
STAGE_2 = ROOT / "configs" / "pretrain_tiny_shapes_t5.yaml"
FEW = ["vae_steps=2", "vae_batch=4", "steps=3", "batch=4", "warmup=1", "log_every=1",
       "transformer_layers=1", "head_dim=8", "vae_channels=[8, 8, 8]"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain") / "model"
    main(["--out", str(out), "--config", "configs/pretrain_tiny_shapes.yaml"]
         + [x for f in FEW for x in ("--set", f)])
    return out


def test_few_steps_save_a_loadable_pipeline(tiny_run):
    log = [json.loads(line) for line in (tiny_run / "pretrain_log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log].count("transformer") == 3 and log[-1]["stage"] == "done"
    assert all(np.isfinite(r.get("loss", 0.0)) for r in log)
    pipe = load_pipeline(str(tiny_run))
    images = pipe(prompt=["a photo of a red circle"], num_inference_steps=2, height=64, width=64,
                  output_type="np", max_sequence_length=8).images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
    # The latent statistics were measured, not SD3's defaults.
    assert pipe.vae.config.scaling_factor != 1.5305


def test_same_seed_same_weights(tiny_run, tmp_path):
    cfg = load_pretrain_config("configs/pretrain_tiny_shapes.yaml", FEW)
    again = pretrain(cfg, tmp_path / "again")
    a = load_pipeline(str(tiny_run)).transformer.state_dict()
    b = load_pipeline(str(again)).transformer.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_eval_cli_writes_report_and_grid(tiny_run, tmp_path, capsys):
    eval_model.main(["--model", str(tiny_run), "--split", "test", "--per-prompt", "1",
                     "--steps", "2", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["summary"]) >= {"single_object", "position", "overall", "partial"}
    assert len(report["images"]) == len(eval_model.load_split("test"))
    assert (tmp_path / "grid.png").stat().st_size > 0
    assert "overall" in capsys.readouterr().out


def test_preset_is_the_default_recipe():
    # The shipped model's recipe: the preset and the built-in defaults agree.
    assert load_pretrain_config(Path("configs/pretrain_tiny_shapes.yaml")) == load_pretrain_config(None)


def test_a_second_stage_keeps_the_vae_and_clip_encoders_and_adds_a_t5(tiny_run, tmp_path):
    cfg = load_pretrain_config(STAGE_2, FEW + [f"init_from={tiny_run}", "t5_layers=1",
                                               "long_sequence_max=40", "long_sequence_share=0.5"])
    out = pretrain(cfg, tmp_path / "stage2")
    log = [json.loads(line) for line in (out / "pretrain_log.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in log} == {"transformer", "done"}  # no VAE stage
    first, second = load_pipeline(str(tiny_run)), load_pipeline(str(out))
    for name in ("vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(first, name).state_dict(), getattr(second, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert second.vae.config.scaling_factor == first.vae.config.scaling_factor
    a, b = first.transformer.state_dict(), second.transformer.state_dict()
    assert not all(torch.equal(a[k], b[k]) for k in a)  # it trained on
    assert second.text_encoder_3 is not None and second.tokenizer_3 is not None
    images = second(prompt=["a photo of a red circle left of a blue square"], num_inference_steps=2,
                    height=64, width=64, output_type="np", max_sequence_length=16).images
    assert np.isfinite(images).all()


@pytest.mark.parametrize("override, expected", [
    (["tag_weights={nope: 1.0}"], "tags must be among"),
    (["tag_weights={position: -1.0, colors: 1.0}"], "must be >= 0"),
    (["tag_weights={position: 0.0}"], "positive weight"),
    (["long_sequence_share=0.5", "long_sequence_max=8"], "long_sequence_max must exceed"),
    (["init_from=/nonexistent/model"], "holds no model_index.json"),
])
def test_a_bad_second_stage_config_is_named(override, expected):
    with pytest.raises(ValueError, match=expected):
        load_pretrain_config(None, override)


def test_init_from_a_model_of_other_shapes_is_named(tiny_run, tmp_path):
    cfg = load_pretrain_config(None, [f"init_from={tiny_run}", "steps=1"])  # default widths
    with pytest.raises(ValueError, match="does not have the shapes this config builds"):
        pretrain(cfg, tmp_path / "out")


def test_tag_weights_and_long_sequences_are_drawn_as_asked():
    rng = np.random.default_rng(0)
    tags = [pretraining_metadata(rng, {"position": 3.0, "colors": 1.0})["tag"] for _ in range(400)]
    assert set(tags) == {"position", "colors"} and 0.65 < tags.count("position") / 400 < 0.85
    cfg = load_pretrain_config(None, ["long_sequence_share=0.25", "long_sequence_max=256"])
    gen = torch.Generator().manual_seed(0)
    lengths = [sequence_length(cfg, gen) for _ in range(400)]
    long = [n for n in lengths if n != cfg.max_sequence_length]
    assert 0.15 < len(long) / 400 < 0.35 and min(long) > 8 and max(long) <= 256
    assert cfg.max_sequence_length == 8 and sequence_length(load_pretrain_config(None), gen) == 8
