"""The shapes world: vocabulary, GenEval-format prompts, a renderer and the splits.

Images are 64x64 (any size works) pictures of 1-4 coloured shapes on a white
background. Prompts and metadata follow GenEval's `prompts/create_prompts.py`
(tags, phrasing, "a"/"an", `include`/`exclude` clauses, position as
`[relation, index]` meaning "this object is <relation> the object(s) of
include[index]").

Deviations from GenEval:
* 4 classes (circle, square, triangle, star) and 6 colours instead of 80 COCO
  classes and 10 colours, so every tag has far fewer distinct prompts (single_object
  has 4). The test split therefore takes half of a small tag, at most 50 prompts.
* GenEval samples prompts with replacement and de-duplicates; we enumerate every
  prompt of a tag and split a seeded shuffle of that list.
* GenEval's colors tag never colours a person; we have no person, so any pair goes.
* Four (colour, class) pairs (`HELD_OUT_PAIRS`) never appear in pretraining images;
  the `unseen` split is made of prompts that name at least one of them.
* The background is white rather than a photo: it is the colour farthest from every
  saturated palette colour, so foreground/background separation needs one threshold.

Where it lives: `shapes.prompts` (vocabulary, prompts, splits) and `shapes.draw` (the
renderer, distortions, `perturb`); this module gathers their names and holds the CLI.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from shapes.draw import (
    BACKGROUND,
    BORDER,
    COLOR_JITTER,
    DIRECTION_CUT,
    GAP,
    NOISE_SIGMA,
    OUTLINES,
    PALETTE,
    POSITION_THRESHOLD,
    RENDER_DIRECTION_CUT,
    RENDER_POSITION_THRESHOLD,
    SHAPE_WIDTH,
    STAR_INNER,
    SUPERSAMPLE,
    Box,
    Distortion,
    DrawnObject,
    _overlaps,
    perturb,
    relative_position,
    render,
    render_scene,
    shape_height,
)
from shapes.prompts import (
    CLASSES,
    COLORS,
    COUNTING_RANGE,
    DATA_DIR,
    HELD_OUT_PAIRS,
    NUMBERS,
    RELATIONS,
    SPLIT_SEED,
    TAGS,
    TEST_PER_TAG,
    UNSEEN_PER_TAG,
    allowed_colors,
    color_attr,
    color_class_pairs,
    colors,
    counting,
    enumerate_prompts,
    load_split,
    make_splits,
    plural,
    position,
    pretraining_metadata,
    single_object,
    two_object,
    uses_held_out,
    with_article,
    write_splits,
)

__all__ = [  # the shapes world's names, from where they are defined
    # shapes.prompts
    "CLASSES", "COLORS", "COUNTING_RANGE", "DATA_DIR", "HELD_OUT_PAIRS", "NUMBERS", "RELATIONS",
    "SPLIT_SEED", "TAGS", "TEST_PER_TAG", "UNSEEN_PER_TAG", "allowed_colors", "color_attr",
    "color_class_pairs", "colors", "counting", "enumerate_prompts", "load_split", "make_splits",
    "plural", "position", "pretraining_metadata", "single_object", "two_object",
    "uses_held_out", "with_article", "write_splits",
    # shapes.draw (`_overlaps` too: the tests check placement with it)
    "BACKGROUND", "BORDER", "COLOR_JITTER", "DIRECTION_CUT", "GAP", "NOISE_SIGMA", "OUTLINES",
    "PALETTE", "POSITION_THRESHOLD", "RENDER_DIRECTION_CUT", "RENDER_POSITION_THRESHOLD",
    "SHAPE_WIDTH", "STAR_INNER", "SUPERSAMPLE", "Box", "Distortion", "DrawnObject",
    "_overlaps", "perturb", "relative_position", "render", "render_scene", "shape_height",
]


def _preview(path: Path, n: int = 8, seed: int = 0) -> None:
    """Save an n x n grid of pretraining renders with their prompts printed."""
    rng = np.random.default_rng(seed)
    tiles = []
    for _ in range(n * n):
        m = pretraining_metadata(rng)
        print(m["prompt"])
        tiles.append(render(m, rng))
    rows = [np.concatenate(tiles[r * n:(r + 1) * n], axis=1) for r in range(n)]
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    grid.resize((n * 128, n * 128), Image.NEAREST).save(path)


def main() -> None:
    """CLI: `--write-splits` regenerates data/*.jsonl; `--preview PATH` saves a grid."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-splits", action="store_true",
                        help="write data/{train,test,unseen}.jsonl")
    parser.add_argument("--seed", type=int, default=SPLIT_SEED, help="split seed")
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="output folder for the splits")
    parser.add_argument("--preview", type=Path, default=None,
                        help="save a grid of pretraining renders")
    args = parser.parse_args()
    if args.write_splits:
        print(write_splits(args.out, args.seed))
    if args.preview:
        _preview(args.preview)
    if not (args.write_splits or args.preview):
        parser.print_help()


if __name__ == "__main__":
    main()
