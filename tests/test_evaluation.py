"""Held-out evaluation bookkeeping (learner.evaluation): selection, grading, pairing."""

import numpy as np
import pytest

from learner import evaluation
from shapes.world import load_split, render


def test_eval_rows_takes_the_first_prompts_of_each_tag_and_jobs_follow_the_training_ids():
    rows = load_split("test")
    picked = evaluation.eval_rows(rows, 2)
    tags = [r["tag"] for r in picked]
    assert all(tags.count(t) == 2 for t in set(tags)) and len(set(tags)) == 6
    assert evaluation.eval_rows(rows, None) == rows
    jobs = evaluation.eval_jobs(picked[:2], per_prompt=3, offset=250)
    assert jobs[:4] == [(250, picked[0]["prompt"], 0), (250, picked[0]["prompt"], 1),
                        (250, picked[0]["prompt"], 2), (251, picked[1]["prompt"], 0)]


def test_grade_gives_full_marks_to_renders_and_zero_to_blank_images():
    rows = evaluation.eval_rows(load_split("test"), 1)
    rng = np.random.default_rng(0)
    good = np.stack([render(r, rng) for r in rows])  # one image per prompt
    blank = np.full_like(good, 255)
    res = evaluation.grade(3, 3, rows, 1, good, {"r": np.arange(len(rows), dtype=float)})
    assert res.summary["eval/shapes/strict"] == 1.0 and res.summary["eval/version"] == 3
    assert res.summary["eval/r/mean"] == pytest.approx(np.arange(len(rows)).mean())
    assert [r["reward/r"] for r in res.rows] == list(range(len(rows)))
    zero = evaluation.grade(3, 3, rows, 1, blank, {})
    assert zero.summary["eval/shapes/strict"] == 0.0
    # no shapes-world metadata: no ShapesEval, the rewards still summarised
    plain = evaluation.grade(0, 0, [{"prompt": "a cat"}], 1, good[:1], {"r": np.array([0.5])})
    assert "eval/shapes/strict" not in plain.summary and plain.summary["eval/r/mean"] == 0.5


def _rows(values, tags):
    return [{"prompt_id": i, "sample": 0, "tag": t, "x": v, "s/strict": v > 0.5}
            for i, (v, t) in enumerate(zip(values, tags, strict=True))]


def test_paired_gain_is_the_mean_difference_image_by_image_with_its_standard_error():
    a = _rows([1.0, 2.0, 4.0], ["p", "p", "q"])
    b = _rows([0.0, 1.0, 1.0], ["p", "p", "q"])
    gain, se, n = evaluation.paired_gain(a, b, "x")
    d = np.array([1.0, 1.0, 3.0])
    assert (gain, n) == (pytest.approx(d.mean()), 3)
    assert se == pytest.approx(d.std(ddof=1) / np.sqrt(3))
    # strict: the mean over tags of per-tag gains (GenEval's overall)
    a = _rows([1.0, 1.0, 1.0], ["p", "p", "q"])
    b = _rows([0.0, 1.0, 0.0], ["p", "p", "q"])
    gain, _, _ = evaluation.paired_gain(a, b, "s/strict")
    assert gain == pytest.approx((0.5 + 1.0) / 2)
    # images only one side has do not pair
    assert evaluation.paired_gain(a, [], "x")[2] == 0


def test_written_evaluations_read_back_and_report_start_to_end(tmp_path):
    rows = evaluation.eval_rows(load_split("test"), 1)
    rng = np.random.default_rng(0)
    good = np.stack([render(r, rng) for r in rows])
    evaluation.write(tmp_path, evaluation.grade(0, 0, rows, 1, np.full_like(good, 255),
                                                {"r": np.zeros(len(rows))}))
    evaluation.write(tmp_path, evaluation.grade(4, 4, rows, 1, good, {"r": np.ones(len(rows))}))
    assert sorted(evaluation.read_evals(tmp_path)) == [0, 4]
    lines = evaluation.report(tmp_path)
    assert "version 0 -> 4" in lines[0]
    strict = next(line for line in lines if "shapes/strict" in line)
    assert "0.0000 -> 1.0000" in strict and "+1.0000" in strict
    assert evaluation.plot(tmp_path).is_file()
