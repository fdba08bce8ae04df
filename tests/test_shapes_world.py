"""The shapes world: prompt phrasing, renders that satisfy their metadata, splits."""

import collections

import numpy as np
import pytest

from shapes import world
from shapes.world import (
    CLASSES,
    HELD_OUT_PAIRS,
    PALETTE,
    TAGS,
    enumerate_prompts,
    load_split,
    make_splits,
    perturb,
    pretraining_metadata,
    relative_position,
    render,
    render_scene,
    uses_held_out,
)

# What the project's tokenizer knows; prompts may use nothing else.
VOCAB = {"a", "an", "photo", "of", "and", "left", "right", "above", "below", "one", "two",
         "three", "four", "red", "green", "blue", "yellow", "purple", "orange", "pink", "cyan",
         "white", "black", "gray", "brown"}
VOCAB |= {w for c in ("circle", "square", "triangle", "star", "hexagon", "diamond")
          for w in (c, c + "s")}


def all_split_prompts() -> list[dict]:
    """Every prompt of the three splits."""
    return [m for prompts in make_splits().values() for m in prompts]


def test_prompt_phrasing_matches_geneval():
    assert world.single_object("square") == {
        "tag": "single_object", "include": [{"class": "square", "count": 1}],
        "prompt": "a photo of a square"}
    assert world.two_object("circle", "star")["prompt"] == "a photo of a circle and a star"
    assert world.counting("triangle", 3) == {
        "tag": "counting", "include": [{"class": "triangle", "count": 3}],
        "exclude": [{"class": "triangle", "count": 4}], "prompt": "a photo of three triangles"}
    assert world.colors("red", "circle")["prompt"] == "a photo of a red circle"
    assert world.colors("orange", "star")["prompt"] == "a photo of an orange star"
    # GenEval: include[0] is the reference B, include[1] is A with position [relation, 0]
    assert world.position("circle", "left of", "square") == {
        "tag": "position",
        "include": [{"class": "square", "count": 1},
                    {"class": "circle", "count": 1, "position": ["left of", 0]}],
        "prompt": "a photo of a circle left of a square"}
    assert world.color_attr("red", "circle", "blue", "square") == {
        "tag": "color_attr",
        "include": [{"class": "circle", "count": 1, "color": "red"},
                    {"class": "square", "count": 1, "color": "blue"}],
        "prompt": "a photo of a red circle and a blue square"}
    assert world.color_attr("orange", "square", "purple", "star")["prompt"] == (
        "a photo of an orange square and a purple star")


def test_enumeration_sizes_vocabulary_and_uniqueness():
    sizes = {tag: len(enumerate_prompts(tag)) for tag in TAGS}
    assert sizes == {"single_object": 4, "two_object": 12, "counting": 12, "colors": 24,
                     "position": 48, "color_attr": 360}
    prompts = [m["prompt"] for tag in TAGS for m in enumerate_prompts(tag)]
    assert len(set(prompts)) == len(prompts)
    for p in prompts:
        assert set(p.split()) <= VOCAB, p
    with pytest.raises(ValueError, match="unknown tag"):
        enumerate_prompts("counting_v2")


def test_relative_position_hand_computed():
    a, b = (0, 0, 10, 10), (20, 0, 30, 10)  # A 20 px left of B, same row
    assert relative_position(a, b) == {"left of"}
    assert relative_position(b, a) == {"right of"}
    assert relative_position((0, 30, 10, 40), (0, 0, 10, 10)) == {"below"}
    assert relative_position((0, 0, 10, 10), (1, 1, 11, 11)) == set()  # within the margin
    # offset (-20, -20), margin 0.1 * 20 = 2 -> revised (-18, -18) / 28.3 = -0.64 on both axes
    assert relative_position((0, 0, 10, 10), (20, 20, 30, 30)) == {"left of", "above"}


def test_renders_satisfy_metadata_by_construction():
    rng = np.random.default_rng(0)
    for meta in all_split_prompts():
        image, objects = render_scene(meta, rng)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        for ci, clause in enumerate(meta["include"]):
            drawn = [o for o in objects if o.clause == ci]
            assert len(drawn) == clause["count"] and all(o.cls == clause["class"] for o in drawn)
            if "color" in clause:
                assert all(o.color == clause["color"] for o in drawn)
            else:
                assert all((o.color, o.cls) not in HELD_OUT_PAIRS for o in drawn)
            if "position" in clause:
                rel, target = clause["position"]
                for o in drawn:
                    for t in (t for t in objects if t.clause == target):
                        assert rel in relative_position(o.box, t.box, 0.25, 0.75), meta["prompt"]
        counts = collections.Counter(o.cls for o in objects)
        for clause in meta.get("exclude", []):
            assert counts[clause["class"]] < clause["count"]
        for i, o in enumerate(objects):
            assert o.box[0] >= 0 and o.box[2] <= 64 and o.box[1] >= 0 and o.box[3] <= 64
            for p in objects[i + 1:]:
                assert world._overlaps(o.box, p.box, 0.0) is False
            # the box centre is inside every shape: it must carry the exact palette colour
            cx, cy = int((o.box[0] + o.box[2]) / 2), int((o.box[1] + o.box[3]) / 2)
            assert tuple(image[cy, cx]) == PALETTE[o.color], (meta["prompt"], o)
        # and nothing else was drawn: the corners stay background
        assert (image[[0, 0, -1, -1], [0, -1, 0, -1]] == 255).all()


def test_render_is_deterministic_given_the_seed():
    meta = world.position("star", "above", "circle")
    a = render(meta, np.random.default_rng(7))
    b = render(meta, np.random.default_rng(7))
    c = render(meta, np.random.default_rng(8))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_render_rejects_impossible_metadata():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="class"):
        render({"tag": "single_object", "include": [{"class": "hexagon", "count": 1}],
                "prompt": "a photo of a hexagon"}, rng)
    bad = world.counting("star", 3) | {"exclude": [{"class": "star", "count": 2}]}
    with pytest.raises(ValueError, match="contradict"):
        render(bad, rng)


def test_splits_are_disjoint_and_cover_every_tag():
    splits = make_splits()
    train = {m["prompt"] for m in splits["train"]}
    test = {m["prompt"] for m in splits["test"]}
    unseen = {m["prompt"] for m in splits["unseen"]}
    assert not train & test and not train & unseen and not test & unseen
    per_tag = collections.Counter(m["tag"] for m in splits["test"])
    for tag in TAGS:
        n_seen = sum(not uses_held_out(m) for m in enumerate_prompts(tag))
        # half of a small tag, at most 50: as balanced as 4 single-object prompts allow
        assert per_tag[tag] == min(world.TEST_PER_TAG, n_seen // 2) >= 2
    assert not any(uses_held_out(m) for m in splits["train"] + splits["test"])
    assert splits == make_splits()  # deterministic
    assert splits != make_splits(seed=1)


def test_unseen_prompts_name_held_out_pairs():
    unseen = make_splits()["unseen"]
    assert {m["tag"] for m in unseen} == {"colors", "color_attr"}
    assert all(uses_held_out(m) for m in unseen)
    # every held-out pair is asked for at least once
    named = set().union(*(world.color_class_pairs(m) for m in unseen))
    assert set(HELD_OUT_PAIRS) <= named
    assert len(HELD_OUT_PAIRS) == 4 and {cls for _, cls in HELD_OUT_PAIRS} == set(CLASSES)


def test_pretraining_never_produces_held_out_pairs():
    rng = np.random.default_rng(0)
    metas = [pretraining_metadata(rng) for _ in range(3000)]
    assert not any(uses_held_out(m) for m in metas)
    assert collections.Counter(m["tag"] for m in metas).keys() == set(TAGS)
    for meta in metas[:300]:  # and the renderer keeps uncoloured objects off them too
        _, objects = render_scene(meta, rng)
        assert all((o.color, o.cls) not in HELD_OUT_PAIRS for o in objects)


def test_split_files_equal_regeneration():
    for name, prompts in make_splits(world.SPLIT_SEED).items():
        assert load_split(name) == prompts, (
            f"{name} is stale: run `python -m shapes.world --write-splits`")


def test_perturb_is_mild_and_deterministic():
    image = render(world.two_object("square", "star"), np.random.default_rng(0))
    a = perturb(image, np.random.default_rng(1))
    assert a.dtype == np.uint8 and a.shape == image.shape
    assert np.array_equal(a, perturb(image, np.random.default_rng(1)))
    diff = np.abs(a.astype(int) - image.astype(int))
    assert 3 < diff.mean() < 20  # noise sigma 8, jitter <= 12, blur on edges only
