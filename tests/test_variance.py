"""studies.variance: the split of reward variance between initial noise and SDE noise."""

import numpy as np
import pytest

from learner.config import load_config
from studies.variance import decompose, main, within_share


def test_within_share_separates_init_from_path_variance():
    by_init = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])  # the initial noise decides
    by_path = np.array([[0.0, 1.0], [0.0, 1.0]])  # the SDE path decides
    assert within_share(by_init) == 0.0
    assert within_share(by_path) == pytest.approx(1.0)
    assert within_share(np.ones((2, 2))) is None


def test_decompose_runs_on_the_shipped_model():
    cfg = load_config("configs/repro_shapes.yaml", ["sampler.num_steps=3"])
    report = decompose(cfg, "train", per_tag=1, inits=2, paths=2, seed=0)
    assert len(report["prompts"]) == 6 and report["sampler"]["num_steps"] == 3
    for p in report["prompts"]:
        assert 0.0 <= p["partial"] <= 1.0
        assert p["share_within_partial"] is None or 0.0 <= p["share_within_partial"] <= 1.0


def test_one_path_per_init_is_refused():
    with pytest.raises(SystemExit, match="--paths >= 2"):
        main(["--paths", "1"])
