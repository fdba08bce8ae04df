"""GenEval-style prompt sets over the 80 COCO classes: a training set and a held-out test set.

GenEval grades an image by detecting COCO objects in it and checking them against the
prompt's metadata row (``{"tag", "include", "exclude", "prompt"}``); RL post-training on
GenEval needs many such rows to train on and a test set that the training never saw.
This module writes both, from a seed, with GenEval's six tags and row schema:

* ``single_object``  "a photo of a dog"
* ``two_object``     "a photo of a cat and a bench"
* ``counting``       "a photo of two cats" (an exclude clause makes the count exact)
* ``colors``         "a photo of a red car"
* ``position``       "a photo of a bench left of a cat" (include[1] is <relation> include[0])
* ``color_attr``     "a photo of a blue chair and a red dog"

The class names are GenEval's spelling of the COCO classes (its detector's label order),
so the rows can be graded by GenEval's own evaluator. As in GenEval, "person" is never
given a colour. Unlike GenEval's naive plural ("sheeps", "persons"), plurals are English.

Fair test: no prompt is in both sets, and neither is any *combination* a test prompt is
about (:func:`combinations`): a test class pair (two_object, position, color_attr) never
appears together in a training prompt, a test (colour, class) binding is never trained,
nor a test (class, count), nor a test single_object class as a single_object prompt. So
the test measures composition, not recall of trained prompts.

``python -m learner.prompt_sets --out configs/prompts`` writes ``geneval_train.jsonl``
and ``geneval_test.jsonl``; the same seed writes the same bytes.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np

from shapes import prompts as shapes_rows
from shapes.prompts import with_article

# GenEval's names of the 80 COCO classes, in the COCO detector's label order.
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball",
    "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop",
    "computer mouse", "tv remote", "computer keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black",
          "white")  # the ten colours GenEval's colour classifier tells apart
UNCOLORED = ("person",)  # GenEval gives no "[colour] person" prompts
COLORABLE = tuple(c for c in COCO_CLASSES if c not in UNCOLORED)
RELATIONS = ("left of", "right of", "above", "below")
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
NUMBERS = {2: "two", 3: "three", 4: "four"}  # GenEval counts 2 to 4

PAIRED = ("skis", "scissors")  # plural-only nouns: "a pair of skis", "two pairs of skis"
IRREGULAR_PLURALS = {"person": "people", "sheep": "sheep", "knife": "knives",
                     "computer mouse": "computer mice", "broccoli": "broccoli"}

SEED = 43  # GenEval's default prompt seed; no other meaning
# Test: GenEval's 100 per tag, but single_object shares the 80 classes with training.
TEST_SIZES = {"single_object": 40, "two_object": 100, "counting": 100, "colors": 100,
              "position": 100, "color_attr": 100}
# Train: None = every row the held-out combinations leave (40 classes, 140 counts).
TRAIN_SIZES: dict[str, int | None] = {"single_object": None, "two_object": 800,
                                      "counting": None, "colors": 400, "position": 800,
                                      "color_attr": 800}
TRAIN_FILE, TEST_FILE = "geneval_train.jsonl", "geneval_test.jsonl"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "configs" / "prompts"


# -- wording ----------------------------------------------------------------------------


def noun(cls: str, color: str | None = None) -> str:
    """One object of ``cls``: 'a dog', 'a red dog', 'a pair of red skis'."""
    words = f"{color} {cls}" if color else cls
    return f"a pair of {words}" if cls in PAIRED else with_article(words)


def plural(cls: str) -> str:
    """'cats', 'buses', 'people', 'pairs of skis'."""
    if cls in PAIRED:
        return f"pairs of {cls}"
    if cls in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[cls]
    return f"{cls}es" if cls.endswith(("s", "sh", "ch", "x")) else f"{cls}s"


# -- rows (GenEval's metadata schema) ---------------------------------------------------


# shapes.prompts writes each tag's row; only the wording (noun, plural) is COCO's here
_WORDING = {"noun": noun, "plural": plural}
single_object = partial(shapes_rows.single_object, **_WORDING)
two_object = partial(shapes_rows.two_object, **_WORDING)
counting = partial(shapes_rows.counting, **_WORDING)
colors = partial(shapes_rows.colors, **_WORDING)
position = partial(shapes_rows.position, **_WORDING)
color_attr = partial(shapes_rows.color_attr, **_WORDING)


# Each tag's parameter space as axes of choices; a point of it is one row (or none, where
# GenEval's constraints rule it out: two distinct classes, two distinct colours).
AXES: dict[str, tuple[tuple, ...]] = {
    "single_object": (COCO_CLASSES,),
    "two_object": (COCO_CLASSES, COCO_CLASSES),
    "counting": (COCO_CLASSES, tuple(NUMBERS)),
    "colors": (COLORS, COLORABLE),
    "position": (COCO_CLASSES, RELATIONS, COCO_CLASSES),
    "color_attr": (COLORS, COLORABLE, COLORS, COLORABLE),
}


def make_row(tag: str, params: tuple) -> dict | None:
    """The row at one point of ``tag``'s parameter space, None where GenEval has none."""
    if tag == "single_object":
        return single_object(*params)
    if tag == "two_object":
        return two_object(*params) if params[0] != params[1] else None
    if tag == "counting":
        return counting(*params)
    if tag == "colors":
        return colors(*params)
    if tag == "position":
        return position(*params) if params[0] != params[2] else None
    if tag == "color_attr":
        ca, a, cb, b = params
        return color_attr(*params) if a != b and ca != cb else None
    raise ValueError(f"unknown tag {tag!r}; expected one of {TAGS}")


def combinations(row: dict) -> set[tuple]:
    """What a row tests, as keys shared across tags: ("object", class) for single_object,
    ("count", class, n), ("binding", colour, class) for each coloured object, and
    ("pair", class, class) (sorted) for the two classes of a two-object prompt."""
    tag, include = row["tag"], row["include"]
    if tag == "single_object":
        return {("object", include[0]["class"])}
    if tag == "counting":
        return {("count", include[0]["class"], include[0]["count"])}
    keys = {("binding", c["color"], c["class"]) for c in include if "color" in c}
    if len(include) == 2:
        keys.add(("pair", *sorted(c["class"] for c in include)))
    return keys


# -- sets -------------------------------------------------------------------------------


def _walk(tag: str, rng: np.random.Generator) -> Iterator[dict]:
    """Every row of ``tag`` once, in a seeded order: a permutation of the flat index of
    the parameter space (uniform and exhaustive, so "all that remain" is well defined)."""
    axes = AXES[tag]
    shape = tuple(len(axis) for axis in axes)
    for flat in rng.permutation(int(np.prod(shape))):
        point = np.unravel_index(flat, shape)
        row = make_row(tag, tuple(axis[int(i)] for axis, i in zip(axes, point, strict=True)))
        if row is not None:
            yield row


def _take(tag: str, rng: np.random.Generator, size: int | None,
          held_out: set[tuple]) -> list[dict]:
    """Up to ``size`` rows of ``tag`` (None: all) sharing no combination with ``held_out``."""
    rows = []
    for row in _walk(tag, rng):
        if size is not None and len(rows) == size:
            break
        if not combinations(row) & held_out:
            rows.append(row)
    if size is not None and len(rows) < size:
        raise ValueError(f"{tag}: only {len(rows)} rows avoid the held-out combinations, "
                         f"{size} asked for; lower its size")
    return rows


def make_sets(seed: int = SEED) -> dict[str, list[dict]]:
    """``{"train": rows, "test": rows}``, grouped by tag in TAGS order.

    The test set is drawn first; training rows sharing any of its combinations are
    skipped. Each (set, tag) draws from its own generator, ``[seed, set, tag]``, so that
    resizing one tag leaves every other tag's rows as they were.
    """
    test = [row for t, tag in enumerate(TAGS)
            for row in _take(tag, np.random.default_rng([seed, 1, t]), TEST_SIZES[tag], set())]
    held_out = set().union(*(combinations(row) for row in test))
    train = [row for t, tag in enumerate(TAGS)
             for row in _take(tag, np.random.default_rng([seed, 0, t]), TRAIN_SIZES[tag],
                              held_out)]
    return {"train": train, "test": test}


def to_jsonl(rows: list[dict]) -> str:
    """One JSON object per line, as GenEval's evaluation_metadata.jsonl is written."""
    return "".join(json.dumps(row) + "\n" for row in rows)


def write_sets(out_dir: Path = DEFAULT_OUT, seed: int = SEED) -> dict[str, int]:
    """Write ``geneval_train.jsonl`` and ``geneval_test.jsonl`` -> {file name: rows}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sets = make_sets(seed)
    sizes = {}
    for name, rows in ((TRAIN_FILE, sets["train"]), (TEST_FILE, sets["test"])):
        (out_dir / name).write_text(to_jsonl(rows), encoding="utf-8")
        sizes[name] = len(rows)
    return sizes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m learner.prompt_sets",
        description="Write GenEval-style train/test prompt metadata over the COCO classes.")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="directory for geneval_train.jsonl and geneval_test.jsonl "
                             "(default: configs/prompts)")
    parser.add_argument("--seed", type=int, default=SEED, help=f"generator seed (default {SEED})")
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    for name, n in write_sets(args.out, args.seed).items():
        print(f"{args.out / name}: {n} rows")


if __name__ == "__main__":
    main()
