"""ShapesEval: grading of rendered, perturbed and hand-built images."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

from shapes import world
from shapes.detect import label_components
from shapes.evaluate import (
    ShapesEval,
    ShapesScores,
    detect,
    grade,
    summarize,
)
from shapes.world import PALETTE, make_splits, perturb, render


def scene(*shapes: tuple[str, str | tuple[int, int, int], tuple[int, int, int, int]],
          size: int = 64) -> np.ndarray:
    """Hand-drawn image, anti-aliased by 4x supersampling: (class, colour name or RGB,
    box x0, y0, x1, y1 in pixels) per shape. Uses no renderer code but the outlines."""
    s = 4
    img = Image.new("RGB", (size * s, size * s), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for cls, color, box in shapes:
        fill = PALETTE.get(color, color)
        x0, y0, x1, y1 = (v * s for v in box)
        if cls == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif cls == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        else:
            pts = [(x0 + u * (x1 - x0), y0 + v * (y1 - y0)) for u, v in world.OUTLINES[cls]]
            draw.polygon(pts, fill=fill)
    return np.asarray(img.reduce(s))


def renders(metadata: list[dict], seed: int, repeats: int = 1) -> tuple[np.ndarray, list[dict]]:
    """`repeats` renders of every prompt, and the matching metadata list."""
    rng = np.random.default_rng(seed)
    metas = [m for m in metadata for _ in range(repeats)]
    return np.stack([render(m, rng) for m in metas]), metas


def test_every_clean_test_and_unseen_render_is_correct():
    splits = make_splits()
    images, metas = renders(splits["test"] + splits["unseen"], seed=0, repeats=2)
    scores = grade(images, metas)
    failed = [(metas[i]["prompt"], scores.details[i].failures)
              for i in np.flatnonzero(~scores.strict)]
    assert not failed
    assert (scores.partial == 1.0).all()
    assert summarize(scores, metas)["overall"] == 1.0


def test_perturbed_test_renders_are_at_least_97_percent_correct():
    images, metas = renders(make_splits()["test"], seed=1, repeats=3)
    rng = np.random.default_rng(2)
    scores = grade(np.stack([perturb(im, rng) for im in images]), metas)
    assert scores.strict.mean() >= 0.97
    assert summarize(scores, metas)["overall"] >= 0.97


def test_detections_of_a_hand_drawn_scene():
    img = scene(("square", "red", (4, 4, 20, 20)), ("circle", "blue", (40, 6, 56, 22)),
                ("triangle", "yellow", (6, 40, 24, 56)), ("star", "green", (38, 38, 58, 57)),
                ("square", (90, 90, 90), (26, 26, 36, 36)),  # dark gray: a shape, but no colour
                ("square", "purple", (60, 60, 62, 62)))  # 4 px: noise, ignored
    objects = sorted(detect(img[None])[0], key=lambda d: d.box)
    got = [(d.shape, d.color, d.box) for d in objects]
    # the apexes of the triangle and the star cover under half a pixel: boxes start 1 px lower
    assert got == [("square", "red", (4, 4, 20, 20)), ("triangle", "yellow", (6, 41, 24, 56)),
                   ("square", None, (26, 26, 36, 36)), ("star", "green", (38, 39, 58, 57)),
                   ("circle", "blue", (40, 6, 56, 22))]


def test_label_components_is_8_connected():
    fg = np.zeros((2, 6, 7), dtype=bool)
    fg[0, 0, 0] = fg[0, 1, 1] = fg[0, 2, 2] = True  # a diagonal: one component
    fg[0, 4:, 4:] = True
    fg[0, 0, 6] = True
    fg[1, 0, 0:7] = fg[1, 1:6, 0] = fg[1, 1:6, 6] = True  # a U, closed at the top
    fg[1, 3, 3] = True
    lab = label_components(fg)
    assert (lab[~fg] == -1).all()
    assert [len(np.unique(lab[i][fg[i]])) for i in range(2)] == [3, 2]
    assert lab[0, 0, 0] == lab[0, 2, 2] == 0  # the smallest flat index in the component
    assert lab[1, 5, 0] == lab[1, 5, 6]


def test_wrong_count_is_incorrect():
    img = scene(*[("triangle", "red", (4 + 20 * i, 20, 18 + 20 * i, 32)) for i in range(3)])
    scores = grade(np.stack([img] * 3), [world.counting("triangle", n) for n in (3, 4, 2)])
    assert scores.strict.tolist() == [True, False, False]
    assert scores.partial.tolist() == pytest.approx([1.0, 3 / 4, 2 / 3])  # 3 of 4; exclude (3-1)/3
    assert scores.details[1].failures == ["expected triangle>=4, found 3"]
    assert scores.details[2].failures == ["expected triangle<3, found 3"]


def test_wrong_colour_class_and_position_are_incorrect():
    left_of = scene(("circle", "red", (4, 24, 18, 38)), ("square", "blue", (40, 24, 54, 38)))
    metas = [
        world.color_attr("red", "circle", "blue", "square"),  # right
        world.color_attr("red", "circle", "green", "square"),  # square has the wrong colour
        world.colors("blue", "circle"),  # circle has the wrong colour
        world.position("circle", "left of", "square"),  # right
        world.position("circle", "right of", "square"),  # wrong relation
        world.position("square", "left of", "circle"),  # roles swapped
        world.two_object("circle", "star"),  # no star
    ]
    scores = grade(np.stack([left_of] * len(metas)), metas)
    assert scores.strict.tolist() == [True, False, False, True, False, False, False]
    assert scores.partial[[0, 3]].tolist() == [1.0, 1.0]
    assert scores.partial[1] == pytest.approx(0.75)  # clause 2: count 1, colour 0
    assert scores.partial[6] == pytest.approx(0.5)
    assert ((scores.partial >= 0) & (scores.partial < 1))[[1, 2, 4, 5, 6]].all()
    assert "expected green square" in scores.details[1].failures[0]
    assert scores.details[4].failures[0].startswith("expected circle right of target")


def test_include_counts_are_at_least_as_in_geneval():
    # GenEval's include clause asks for >= count; only counting prompts exclude extras.
    img = scene(("circle", "red", (4, 4, 18, 18)), ("circle", "red", (4, 40, 18, 54)),
                ("star", "green", (40, 20, 58, 38)))
    scores = grade(img[None], [world.two_object("circle", "star")])
    assert scores.strict.tolist() == [True]


def test_excluded_objects_fail_counting():
    rng = np.random.default_rng(3)
    images = np.stack([render(world.counting(cls, 4), rng) for cls in world.CLASSES])
    scores = grade(images, [world.counting(cls, 3) for cls in world.CLASSES])
    assert not scores.strict.any()
    assert scores.partial.tolist() == pytest.approx([3 / 4] * 4)  # exclude factor (4 - 1) / 4
    assert all(d.failures == [f"expected {cls}<4, found 4"]
               for d, cls in zip(scores.details, world.CLASSES, strict=True))


def test_blank_image_fails_everything():
    metas = make_splits()["test"]
    blank = np.full((len(metas), 64, 64, 3), 255, dtype=np.uint8)
    scores = grade(blank, metas)
    assert not scores.strict.any()
    assert (scores.partial == 0).all()
    assert all(d.objects == [] for d in scores.details)
    assert summarize(scores, metas)["overall"] == 0.0


def test_summarize_averages_over_tags_like_geneval():
    metas = [{"tag": "colors"}] * 3 + [{"tag": "position"}]
    scores = ShapesScores(np.array([True, True, False, False]), np.array([1, 1, 0.5, 0.0]), [])
    summary = summarize(scores, metas)
    assert summary == pytest.approx({"colors": 2 / 3, "position": 0.0, "overall": 1 / 3,
                                     "partial": 0.625})


def test_input_checks_and_other_formats():
    meta = world.single_object("square")
    img = scene(("square", "orange", (20, 20, 36, 36)))
    as_list = ShapesEval()([Image.fromarray(img), img], [meta, meta])
    assert as_list.strict.tolist() == [True, True]
    big = np.asarray(Image.fromarray(img).resize((128, 128), Image.NEAREST))
    assert grade(big[None], [meta]).strict.tolist() == [True]
    with pytest.raises(ValueError, match="uint8"):
        grade(img[None].astype(np.float32) / 255, [meta])
    with pytest.raises(ValueError, match="metadata"):
        grade(img[None], [meta, meta])


def test_prototypes_match_the_renderer():
    # If the renderer's shapes change, re-run `python -m shapes.benchmark --prototypes`.
    from shapes.benchmark import measure_prototypes
    from shapes.detect import CLASS_STD, PROTOTYPES, STD_FLOOR

    means, _ = measure_prototypes(n_scenes=40, seed=1)
    assert np.abs((means - PROTOTYPES) / np.maximum(CLASS_STD, STD_FLOOR)).max() < 0.5


def test_bent_renders_still_count():
    """A generator's shapes are stretched, tilted and rounded: within `Distortion` they
    are still their class (what a human would call them)."""
    metadata = make_splits()["test"]
    rng = np.random.default_rng(3)
    images = np.stack([world.render_scene(m, rng, distortion=world.Distortion())[0]
                       for m in metadata])
    assert grade(images, metadata).strict.mean() >= 0.98


def blob(points: list[tuple[float, float]], color: str = "green", round_px: float = 2.0
         ) -> np.ndarray:
    """A filled polygon with corners rounded by blurring and re-thresholding at 4x."""
    from PIL import ImageFilter

    s = 4
    mask = Image.new("L", (64 * s, 64 * s), 0)
    ImageDraw.Draw(mask).polygon([(x * s, y * s) for x, y in points], fill=255)
    mask = mask.filter(ImageFilter.GaussianBlur(round_px * s)).point(lambda v: 255 * (v >= 128))
    img = Image.new("RGB", mask.size, (255, 255, 255))
    img.paste(PALETTE[color], mask=mask)
    return np.asarray(img.reduce(s))


def test_shapes_too_far_from_every_class_are_not_objects():
    pentagon = [(32 + 8 * np.cos(a), 32 + 8 * np.sin(a))
                for a in -np.pi / 2 + np.arange(5) * 2 * np.pi / 5]
    wide = scene(("square", "red", (10, 26, 54, 40)))  # 3.1x wider than tall
    ellipse = scene(("circle", "blue", (8, 24, 56, 40)))  # 3x
    images = np.stack([blob(pentagon), wide, ellipse])
    found = [[d.shape for d in dets] for dets in detect(images)]
    assert found[0] != ["star"]  # a rounded pentagon has no points
    assert found[1] == [None] and found[2] == [None]  # too stretched for any class


def _degenerate_images(rng):
    """Collapsed images of the kinds seen when a policy hacks ShapesEval."""
    size = 64
    fill = np.full((size, size, 3), world.PALETTE["red"], np.uint8)  # a full-frame fill
    grid = np.full((size, size, 3), 255, np.uint8)  # a full-frame blue grid
    grid[::8, :] = grid[:, ::8] = world.PALETTE["blue"]
    grid[1::8, :] = grid[:, 1::8] = world.PALETTE["blue"]
    dots = np.full((size, size, 3), 255, np.uint8)  # a dotted texture of object-sized dots
    for y in range(2, size - 7, 12):
        for x in range(2, size - 7, 12):
            dots[y:y + 7, x:x + 7] = world.PALETTE[world.COLORS[(x + y) % len(world.COLORS)]]
    return {"fill": fill, "grid": grid, "dots": dots}


def test_degenerate_images_get_no_credit_whatever_blobs_they_match():
    rng = np.random.default_rng(0)
    meta = {"tag": "two_object", "prompt": "a photo of a triangle and a square",
            "include": [{"class": "triangle", "count": 1}, {"class": "square", "count": 1}]}
    images = _degenerate_images(rng)
    scores = ShapesEval()(np.stack(list(images.values())), [meta] * len(images))
    assert not scores.strict.any() and np.all(scores.partial == 0)
    for name, details in zip(images, scores.details, strict=True):
        assert details.failures[0].startswith("degenerate"), (name, details.failures)
    # a correct render keeps full credit; the same render with three stray dots does not
    good = world.render(meta, rng)
    stray = good.copy()
    for x in (1, 28, 56):
        stray[57:64, x:x + 7] = world.PALETTE["green"]
    scores = ShapesEval()(np.stack([good, stray]), [meta, meta])
    assert scores.strict.tolist() == [True, False] and scores.partial[1] == 0


# -- metadata ShapesEval cannot grade -------------------------------------------------------


def test_an_unknown_class_is_refused_naming_it_and_the_known_ones():
    from learner.prompt_sets import position

    img = scene(("square", "orange", (20, 20, 36, 36)))
    coco = position("bench", "left of", "cat")
    with pytest.raises(ValueError) as e:
        grade(np.stack([img, img]), [world.single_object("square"), coco])
    message = str(e.value)
    assert "metadata[1]" in message and "'a photo of a bench left of a cat'" in message
    assert "unknown class 'cat'" in message  # include[0], the target, comes first
    assert "circle, square, triangle, star" in message


def test_an_unknown_tag_colour_or_relation_is_refused():
    img = scene(("square", "orange", (20, 20, 36, 36)))[None]
    bad = {
        "tag 'spatial'": {**world.single_object("square"), "tag": "spatial"},
        "color 'pink'": {**world.colors("red", "square"),
                         "include": [{"class": "square", "count": 1, "color": "pink"}]},
        "relation 'behind'": {**world.position("circle", "left of", "square"),
                              "include": [{"class": "square", "count": 1},
                                          {"class": "circle", "count": 1,
                                           "position": ["behind", 0]}]},
        "class 'hexagon'": {**world.counting("square", 2),
                            "exclude": [{"class": "hexagon", "count": 1}]},
        "'include'": {"tag": "single_object", "prompt": "a photo of a square"},
    }
    for what, meta in bad.items():
        with pytest.raises(ValueError, match=f"ShapesEval cannot grade metadata\\[0\\].*{what}"):
            ShapesEval()(img, [meta])
    with pytest.raises(ValueError, match="known.*single_object, two_object"):
        grade(img, [bad["tag 'spatial'"]])


def test_the_shapes_reward_refuses_coco_metadata_too():
    from learner.prompt_sets import colors
    from rewards.shapes import ShapesReward

    meta = colors("red", "car")
    img = scene(("square", "red", (20, 20, 36, 36)))[None]
    with pytest.raises(ValueError, match="unknown class 'car'"):
        ShapesReward()(img, [meta["prompt"]], [meta])


def test_paired_gain_of_two_model_reports_by_tag_and_overall():
    from shapes.eval_model import paired_gain

    def report(strict):
        tags = ["colors", "colors", "counting", "counting"]
        return {"split": "test", "per_prompt": 2, "steps": 40, "cfg": 4.5, "seed": 0,
                "images": [{"prompt": f"p{i // 2}", "tag": t, "strict": s}
                           for i, (t, s) in enumerate(zip(tags, strict, strict=True))]}

    gain = paired_gain(report([1, 1, 0, 1]), report([0, 1, 0, 0]))
    assert gain["colors"] == pytest.approx((0.5, 0.5)) and gain["counting"] == pytest.approx((0.5, 0.5))
    assert gain["overall"] == pytest.approx((0.5, (0.5 ** 2 * 2) ** 0.5 / 2))
    other = report([0, 0, 0, 0]) | {"seed": 1}
    with pytest.raises(ValueError, match="must share"):
        paired_gain(report([1, 1, 1, 1]), other)


def test_soft_credit_is_near_one_for_renders_and_rises_as_a_blob_nears_its_class():
    images, metas = renders(make_splits()["test"], seed=3)
    scores = grade(images, metas)
    assert scores.soft.min() > 0.9 and np.median(scores.soft) > 0.98 and scores.soft.max() <= 1.0
    meta = {"prompt": "a photo of a circle", "tag": "single_object",
            "include": [{"class": "circle", "count": 1}]}
    # a circle pushed out of round: a rounded pentagon, then a square with cut corners
    shapes = [scene(("circle", "red", (24, 24, 40, 40)))]
    for sides in (8, 5, 4):
        pts = [(32 + 9 * np.cos(a), 32 + 9 * np.sin(a))
               for a in -np.pi / 2 + np.arange(sides) * 2 * np.pi / sides]
        shapes.append(blob(pts))
    scores = grade(np.stack(shapes), [meta] * len(shapes))
    assert scores.soft[0] > 0.95 and list(scores.soft) == sorted(scores.soft, reverse=True)
    assert scores.soft[1] > scores.soft[3] + 0.2  # an octagon is far more circle than a diamond
    assert not scores.strict[3] and scores.partial[3] == 0.0 < scores.soft[3]  # dense below


def test_soft_credit_counts_objects_softly_against_an_exclude_clause():
    star = [("star", "red", (4 + 15 * i, 24, 18 + 15 * i, 38)) for i in range(4)]
    meta = {"prompt": "a photo of three stars", "tag": "counting",
            "include": [{"class": "star", "count": 3}], "exclude": [{"class": "star", "count": 4}]}
    scores = grade(np.stack([scene(*star[:3]), scene(*star)]), [meta, meta])
    assert scores.strict.tolist() == [True, False]
    assert scores.soft[0] > 0.95 and 0.6 < scores.soft[1] < 0.8  # ~3 / 4 stars, as partial


def test_the_shapes_reward_gives_partial_or_soft_credit():
    from rewards.shapes import ShapesReward

    meta = {"prompt": "a photo of a circle", "tag": "single_object",
            "include": [{"class": "circle", "count": 1}]}
    pts = [(32 + 9 * np.cos(a), 32 + 9 * np.sin(a)) for a in np.arange(5) * 2 * np.pi / 5]
    images = np.stack([blob(pts)])
    partial = ShapesReward()(images, [meta["prompt"]], [meta])
    soft = ShapesReward(credit="soft")(images, [meta["prompt"]], [meta])
    assert partial.tolist() == grade(images, [meta]).partial.tolist()
    assert soft.tolist() == pytest.approx(grade(images, [meta]).soft.tolist())
    with pytest.raises(ValueError, match="credit must be 'partial' or 'soft'"):
        ShapesReward(credit="strict")
