"""Prompt order (learner.prompts.PromptCursor): seeded, resumable, optionally tag-balanced."""

from collections import Counter

import numpy as np

from learner.prompts import PromptCursor, load_prompts

TRAIN = "shapes/data/train.jsonl"


def test_file_mix_walks_a_seeded_permutation_per_epoch():
    rows = load_prompts(TRAIN)
    got = [i for i, _ in PromptCursor(rows, seed=4).take(len(rows) + 3)]
    first = np.random.default_rng([4, 0]).permutation(len(rows)).tolist()
    second = np.random.default_rng([4, 1]).permutation(len(rows)).tolist()
    assert got == first + second[:3]


def test_balanced_mix_draws_every_tag_equally_whatever_the_file_holds():
    rows = load_prompts(TRAIN)
    assert Counter(r["tag"] for r in rows)["color_attr"] / len(rows) > 0.8  # the file's skew
    picks = PromptCursor(rows, seed=0, mix="balanced").take(6 * 50)
    counts = Counter(row["tag"] for _, row in picks)
    assert set(counts.values()) == {50} and len(counts) == 6
    # within a tag, every prompt once before any twice (single_object has 2 in train)
    single = [i for i, row in picks if row["tag"] == "single_object"][:4]
    assert len(set(single[:2])) == 2 and sorted(single[:2]) == sorted(single[2:])


def test_a_cursor_resumed_at_its_position_continues_the_same_order():
    rows = load_prompts(TRAIN)
    for mix in ("file", "balanced"):
        whole = PromptCursor(rows, seed=2, mix=mix).take(40)
        head = PromptCursor(rows, seed=2, mix=mix)
        head.take(17)
        rest = PromptCursor(rows, seed=2, position=head.position, mix=mix).take(23)
        assert [i for i, _ in whole[17:]] == [i for i, _ in rest]
