"""learner.console (the closing summary) and learner.ema (the weights' moving average)."""

import json

import numpy as np
import pytest

from learner.console import summary
from learner.ema import WeightsEMA, ema_version
from policy.weights import FlatWeights


def _flat(version: int, values) -> FlatWeights:
    return FlatWeights(version, np.asarray(values, np.float32), ("a", "b"), ((1,), (1,)))


def test_the_ema_averages_with_its_decay_and_travels_under_its_own_id():
    ema = WeightsEMA(0.5, _flat(0, [0.0, 2.0]))
    ema.update(_flat(1, [2.0, 2.0]))
    ema.update(_flat(2, [4.0, 2.0]))
    np.testing.assert_allclose(ema.flat().buffer, [2.5, 2.0])  # 0.5*(0.5*0 + 0.5*2) + 0.5*4
    assert ema.flat().version == ema_version(2) > 2**40
    restored = WeightsEMA(0.5, _flat(0, [0.0, 0.0]))
    restored.load_state_dict(ema.state_dict())
    np.testing.assert_allclose(restored.flat().buffer, ema.flat().buffer)
    with pytest.raises(ValueError, match="decay"):
        WeightsEMA(1.0, _flat(0, [0.0, 0.0]))


def test_the_summary_names_what_ran_what_it_scored_and_where_it_is(tmp_path):
    rows = [{"step": 0, "rollout/samples": 16, "reward/self_confidence/mean": -0.5},
            {"step": 1, "rollout/samples": 16, "reward/self_confidence/mean": -0.4}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows)
                                            + '{"step": 2, "cut')  # a line a kill cut short
    (tmp_path / "evals.jsonl").write_text(json.dumps(
        {"version": 2, "eval/shapes/strict": 0.3, "eval/shapes/strict/colors": 0.5}) + "\n")
    (tmp_path / "lora").mkdir()
    lines = summary(tmp_path, total_steps=2)
    text = "\n".join(lines)
    assert "steps: 2 of 2, 32 samples" in text
    assert "step 0 -0.5000 -> step 1 -0.4000" in text
    assert "last evaluation (version 2): shapes/strict 0.3000" in text and "colors" not in text
    assert f"LoRA: {tmp_path / 'lora'}" in text and "EMA" not in text
    assert lines[-1] == f"continue: python -m learner.main --resume {tmp_path} --set train.steps=3"
