"""The pretraining entry point in a few-step mode, and the evaluation CLI."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from policy.pipeline import load_pipeline
from shapes import eval_model
from shapes.pretrain import load_pretrain_config, main, pretrain

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
