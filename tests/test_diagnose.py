"""The self-confidence vs ShapesEval diagnostic (studies/diagnose.py)."""

import numpy as np
import pytest

from learner.config import load_config
from studies.diagnose import auroc, diagnose, format_report


def test_auroc_counts_pairs_and_ties():
    y = np.array([True, True, False, False])
    assert auroc(np.array([3.0, 4.0, 1.0, 2.0]), y) == 1.0
    assert auroc(np.array([1.0, 2.0, 3.0, 4.0]), y) == 0.0
    assert auroc(np.array([1.0, 1.0, 1.0, 1.0]), y) == 0.5
    assert auroc(np.array([1.0, 3.0, 2.0, 4.0]), y) == pytest.approx(0.25)  # 1 of 4 pairs
    assert auroc(np.array([1.0, 2.0]), np.array([True, True])) is None


def test_within_prompt_auroc_ignores_pairs_across_prompts():
    # prompt 0 scores everything high, prompt 1 low: a correct image of prompt 1 loses to
    # an incorrect one of prompt 0 (pooled 3 of 4 pairs), but each prompt ranks perfectly
    scores = np.array([10.0, 9.0, 2.0, 1.0])
    correct = np.array([True, False, True, False])
    prompts = np.array([0, 0, 1, 1])
    assert auroc(scores, correct) == 0.75
    assert auroc(scores, correct, prompts) == 1.0


def test_diagnose_runs_end_to_end_on_a_tiny_model():
    cfg = load_config("configs/tiny_solace.yaml",
                      ["model.path=tiny-random", "sampler.num_steps=4", "self_confidence.num_probes=2"])
    report = diagnose(cfg, "test", per_prompt=2, limit=3)
    assert report["tags"]["all"]["images"] == 6
    assert "all" in format_report(report)
