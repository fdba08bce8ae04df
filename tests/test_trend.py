"""studies.trend: per-block reward means from samples.jsonl."""

import json

import pytest

from studies.trend import blocks, load_rewards, main


def write_samples(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_blocks_mean_and_share_at_max(tmp_path):
    rows = [{"step": s, "seed": 10 * s + i, "reward/shapes": v}
            for s, vals in enumerate([[0.5, 1.0], [0.0, 0.5], [1.0, 1.0]]) for i, v in enumerate(vals)]
    rows.append({"step": 2, "seed": 99, "reward/shapes": None})  # a dropped reward is skipped
    write_samples(tmp_path / "samples.jsonl", rows)
    key, steps = load_rewards(tmp_path, None)
    assert key == "reward/shapes" and steps == {0: [0.5, 1.0], 1: [0.0, 0.5], 2: [1.0, 1.0]}
    first, second = blocks(steps, 2)
    assert first["samples"] == 4 and first["mean"] == pytest.approx(0.5)
    assert first["at_max"] == pytest.approx(0.25) and second["at_max"] == 1.0


def test_resumed_steps_count_once(tmp_path):
    rows = [{"step": 0, "seed": 1, "reward/a": 0.1}, {"step": 0, "seed": 1, "reward/a": 0.3}]
    write_samples(tmp_path / "samples.jsonl", rows)
    assert load_rewards(tmp_path, "a")[1] == {0: [0.3]}


def test_unknown_reward_names_the_ones_there(tmp_path, capsys):
    write_samples(tmp_path / "samples.jsonl", [{"step": 0, "seed": 1, "reward/a": 0.1}])
    with pytest.raises(SystemExit, match=r"no reward 'b'.*\['a'\]"):
        main([str(tmp_path), "--reward", "b"])
    with pytest.raises(SystemExit, match="does not exist"):
        main([str(tmp_path / "missing")])
