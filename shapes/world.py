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
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("circle", "square", "triangle", "star")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
# Saturated and well apart: the closest pair (yellow, orange) is ~95 apart in RGB,
# far more than the colour jitter plus noise of `perturb` (~12 + 3 * 8 per channel).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 25),
    "green": (20, 150, 40),
    "blue": (25, 60, 215),
    "yellow": (245, 215, 0),
    "purple": (135, 35, 175),
    "orange": (245, 120, 0),
}
BACKGROUND = (255, 255, 255)
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
COUNTING_RANGE = (2, 4)  # GenEval: rng.integers(2, max_count=4, endpoint=True)

# One pair per class, four distinct colours: every class and colour still appears
# in pretraining, only these combinations do not.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("orange", "circle"),
    ("purple", "square"),
    ("yellow", "triangle"),
    ("blue", "star"),
)

SPLIT_SEED = 43  # GenEval's default prompt seed
TEST_PER_TAG = 50
UNSEEN_PER_TAG = 50
DATA_DIR = Path(__file__).parent / "data"

# Geometry, in pixels of a 64-px image (scaled for other sizes).
# Bounding-box width, uniform in [lo, hi]. Stars get 2 px more: their notches are
# ~3 px deep at 14 px and a 3x3 blur fills them at 12 px.
SHAPE_WIDTH = {"circle": (12.0, 18.0), "square": (12.0, 18.0), "triangle": (12.0, 18.0),
               "star": (14.0, 20.0)}
BORDER = 2.0  # empty margin at the image edge
GAP = 4.0  # empty margin between bounding boxes, so blur never merges two shapes
SUPERSAMPLE = 4  # draw at 4x and box-filter down: anti-aliased edges like a model's
STAR_INNER = 0.5  # inner/outer radius; fatter than the classic 0.38 to stay visible at 64 px

# GenEval's relation rule (evaluate_images.relative_position, position_threshold=0.1).
POSITION_THRESHOLD = 0.1
DIRECTION_CUT = 0.5
# The renderer asks for more, so a +-1 px detection error cannot flip a relation.
RENDER_POSITION_THRESHOLD = 0.25
RENDER_DIRECTION_CUT = 0.75


# ---------------------------------------------------------------- prompts


def with_article(word: str) -> str:
    """'a circle', 'an orange circle' (GenEval's rule: vowel -> 'an')."""
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def plural(name: str) -> str:
    """GenEval's plural: add 'es' after an 's', else 's'."""
    return f"{name}es" if name.endswith("s") else f"{name}s"


def single_object(cls: str) -> dict:
    """'a photo of a square'."""
    return {"tag": "single_object", "include": [{"class": cls, "count": 1}],
            "prompt": f"a photo of {with_article(cls)}"}


def two_object(cls_a: str, cls_b: str) -> dict:
    """'a photo of a circle and a star'."""
    return {"tag": "two_object",
            "include": [{"class": cls_a, "count": 1}, {"class": cls_b, "count": 1}],
            "prompt": f"a photo of {with_article(cls_a)} and {with_article(cls_b)}"}


def counting(cls: str, n: int) -> dict:
    """'a photo of three triangles'; the exclude clause makes the count exact."""
    return {"tag": "counting", "include": [{"class": cls, "count": n}],
            "exclude": [{"class": cls, "count": n + 1}],
            "prompt": f"a photo of {NUMBERS[n]} {plural(cls)}"}


def colors(color: str, cls: str) -> dict:
    """'a photo of a red circle'."""
    return {"tag": "colors", "include": [{"class": cls, "count": 1, "color": color}],
            "prompt": f"a photo of {with_article(color)} {cls}"}


def position(cls_a: str, relation: str, cls_b: str) -> dict:
    """'a photo of a circle left of a square': include[1] (A) is <relation> include[0] (B)."""
    return {"tag": "position",
            "include": [{"class": cls_b, "count": 1},
                        {"class": cls_a, "count": 1, "position": [relation, 0]}],
            "prompt": f"a photo of {with_article(cls_a)} {relation} {with_article(cls_b)}"}


def color_attr(color_a: str, cls_a: str, color_b: str, cls_b: str) -> dict:
    """'a photo of a red circle and a blue square'."""
    return {"tag": "color_attr",
            "include": [{"class": cls_a, "count": 1, "color": color_a},
                        {"class": cls_b, "count": 1, "color": color_b}],
            "prompt": f"a photo of {with_article(color_a)} {cls_a} and "
                      f"{with_article(color_b)} {cls_b}"}


def enumerate_prompts(tag: str) -> list[dict]:
    """Every prompt of a tag, in a fixed order (GenEval's constraints: distinct classes
    in two-object tags, distinct colours in color_attr, counts 2-4)."""
    pairs = [(a, b) for a in CLASSES for b in CLASSES if a != b]
    if tag == "single_object":
        return [single_object(c) for c in CLASSES]
    if tag == "two_object":
        return [two_object(a, b) for a, b in pairs]
    if tag == "counting":
        lo, hi = COUNTING_RANGE
        return [counting(c, n) for c in CLASSES for n in range(lo, hi + 1)]
    if tag == "colors":
        return [colors(col, c) for c in CLASSES for col in COLORS]
    if tag == "position":
        return [position(a, rel, b) for a, b in pairs for rel in RELATIONS]
    if tag == "color_attr":
        return [color_attr(ca, a, cb, b) for a, b in pairs
                for ca in COLORS for cb in COLORS if ca != cb]
    raise ValueError(f"unknown tag {tag!r}; expected one of {TAGS}")


def color_class_pairs(metadata: dict) -> set[tuple[str, str]]:
    """The (colour, class) pairs a prompt names explicitly."""
    return {(c["color"], c["class"]) for c in metadata["include"] if "color" in c}


def uses_held_out(metadata: dict) -> bool:
    """True if the prompt names a (colour, class) pair never seen in pretraining."""
    return bool(color_class_pairs(metadata) & set(HELD_OUT_PAIRS))


def allowed_colors(cls: str) -> list[str]:
    """Colours the renderer may pick for an uncoloured `cls` (never a held-out pair)."""
    return [c for c in COLORS if (c, cls) not in HELD_OUT_PAIRS]


def pretraining_metadata(rng: np.random.Generator) -> dict:
    """A random scene for pretraining: uniform tag, then a uniform prompt of that tag
    that names no held-out pair (the renderer keeps uncoloured objects off them too)."""
    tag = TAGS[rng.integers(len(TAGS))]
    prompts = [m for m in enumerate_prompts(tag) if not uses_held_out(m)]
    return prompts[rng.integers(len(prompts))]


def make_splits(seed: int = SPLIT_SEED) -> dict[str, list[dict]]:
    """train / test / unseen prompt lists.

    Per tag, the prompts naming no held-out pair are shuffled; test takes
    min(TEST_PER_TAG, n // 2) and train the rest, so their prompt strings are
    disjoint. unseen takes up to UNSEEN_PER_TAG prompts naming a held-out pair
    (only colors and color_attr can).
    """
    rng = np.random.default_rng(seed)
    splits: dict[str, list[dict]] = {"train": [], "test": [], "unseen": []}
    for tag in TAGS:
        prompts = enumerate_prompts(tag)
        seen = [prompts[i] for i in rng.permutation(len(prompts)) if not uses_held_out(prompts[i])]
        held = [prompts[i] for i in rng.permutation(len(prompts)) if uses_held_out(prompts[i])]
        n_test = min(TEST_PER_TAG, len(seen) // 2)
        splits["test"] += seen[:n_test]
        splits["train"] += seen[n_test:]
        splits["unseen"] += held[:UNSEEN_PER_TAG]
    return splits


def write_splits(out_dir: Path = DATA_DIR, seed: int = SPLIT_SEED) -> dict[str, int]:
    """Write `{train,test,unseen}.jsonl` (one GenEval metadata dict per line)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name, prompts in make_splits(seed).items():
        lines = "".join(json.dumps(m) + "\n" for m in prompts)
        (out_dir / f"{name}.jsonl").write_text(lines)
        sizes[name] = len(prompts)
    return sizes


def load_split(name: str, data_dir: Path = DATA_DIR) -> list[dict]:
    """Read one split written by `write_splits`."""
    path = data_dir / f"{name}.jsonl"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} missing; run `python -m shapes.world --write-splits`")
    return [json.loads(line) for line in path.read_text().splitlines() if line]


# ---------------------------------------------------------------- geometry


Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels, x1/y1 exclusive


def relative_position(box_a: Box, box_b: Box, threshold: float = POSITION_THRESHOLD,
                      cut: float = DIRECTION_CUT) -> set[str]:
    """Relations of A to B, GenEval's rule: the centre offset, shrunk per axis by
    threshold * (sum of the two sizes), normalised by the raw offset length; a
    relation holds when its component passes `cut`. Image y grows downwards."""
    offset = [(box_a[i] + box_a[i + 2] - box_b[i] - box_b[i + 2]) / 2 for i in (0, 1)]
    dims = [(box_a[i + 2] - box_a[i]) + (box_b[i + 2] - box_b[i]) for i in (0, 1)]
    revised = [math.copysign(max(abs(o) - threshold * d, 0.0), o)
               for o, d in zip(offset, dims, strict=True)]
    if all(abs(r) < 1e-3 for r in revised):
        return set()
    norm = math.hypot(*offset)
    dx, dy = revised[0] / norm, revised[1] / norm
    rels = set()
    if dx < -cut:
        rels.add("left of")
    if dx > cut:
        rels.add("right of")
    if dy < -cut:
        rels.add("above")
    if dy > cut:
        rels.add("below")
    return rels


def shape_height(cls: str, width: float) -> float:
    """Bounding-box height of a shape drawn `width` wide."""
    if cls == "triangle":
        return width * math.sqrt(3) / 2  # equilateral
    if cls == "star":
        return width * (1 + math.cos(math.pi / 5)) / (2 * math.sin(2 * math.pi / 5))
    return width


def _star_outline() -> list[tuple[float, float]]:
    """A five-pointed star, point up, normalised to the unit box."""
    pts = []
    for k in range(10):
        r = 1.0 if k % 2 == 0 else STAR_INNER
        ang = -math.pi / 2 + k * math.pi / 5
        pts.append((r * math.cos(ang), r * math.sin(ang)))
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, y0, x1, y1 = min(xs), min(ys), max(xs), max(ys)
    return [((x - x0) / (x1 - x0), (y - y0) / (y1 - y0)) for x, y in pts]


OUTLINES = {
    "square": [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)],
    "triangle": [(0.5, 0.0), (1.0, 1.0), (0.0, 1.0)],
    "star": _star_outline(),
}


@dataclass(frozen=True)
class DrawnObject:
    """One shape the renderer drew, for checks by construction."""

    cls: str
    color: str
    box: Box
    clause: int  # index of the include clause it satisfies


# ---------------------------------------------------------------- rendering


def _overlaps(a: Box, b: Box, gap: float) -> bool:
    """True if the boxes come closer than `gap`."""
    apart_x = a[2] + gap <= b[0] or b[2] + gap <= a[0]
    apart_y = a[3] + gap <= b[1] or b[3] + gap <= a[1]
    return not (apart_x or apart_y)


def _place_scene(metadata: dict, rng: np.random.Generator, size: int) -> list[DrawnObject] | None:
    """One attempt at placing every object of `metadata`; None if one did not fit."""
    scale = size / 64
    objects: list[DrawnObject] = []
    for ci, clause in enumerate(metadata["include"]):
        cls = clause["class"]
        for _ in range(clause["count"]):
            choices = allowed_colors(cls)
            color = clause.get("color") or choices[rng.integers(len(choices))]
            w = rng.uniform(*SHAPE_WIDTH[cls]) * scale
            h = shape_height(cls, w)
            lo = BORDER * scale
            for _try in range(100):
                x0, y0 = rng.uniform(lo, size - lo - w), rng.uniform(lo, size - lo - h)
                box = (x0, y0, x0 + w, y0 + h)
                if any(_overlaps(box, o.box, GAP * scale) for o in objects):
                    continue
                if "position" in clause:
                    rel, target = clause["position"]
                    if not all(rel in relative_position(box, o.box, RENDER_POSITION_THRESHOLD,
                                                        RENDER_DIRECTION_CUT)
                               for o in objects if o.clause == target):
                        continue
                objects.append(DrawnObject(cls, color, box, ci))
                break
            else:
                return None
    return objects


def _check_metadata(metadata: dict) -> None:
    """Fail loudly on metadata the renderer cannot satisfy."""
    include = metadata.get("include")
    if not include:
        raise ValueError(f"metadata needs a non-empty 'include': {metadata}")
    totals: dict[str, int] = {}
    for i, c in enumerate(include):
        if c["class"] not in CLASSES or not 1 <= c["count"] <= 4:
            raise ValueError(f"include[{i}] needs a class in {CLASSES} and count 1-4: {c}")
        if c.get("color", "red") not in COLORS:
            raise ValueError(f"include[{i}] colour must be one of {COLORS}: {c}")
        if "position" in c and not (c["position"][0] in RELATIONS and 0 <= c["position"][1] < i):
            raise ValueError(f"include[{i}] position must be [relation, earlier index]: {c}")
        totals[c["class"]] = totals.get(c["class"], 0) + c["count"]
    for c in metadata.get("exclude", []):
        if totals.get(c["class"], 0) >= c["count"]:
            raise ValueError(f"include and exclude contradict each other: {metadata}")


@dataclass(frozen=True)
class Distortion:
    """How far a drawn shape may stray from its ideal outline, the way a generator's do:
    each object is stretched along x (or y) by a factor in [1, stretch], rotated by up to
    `rotation` degrees and has its corners rounded with a radius of up to `rounding` times
    its width. ShapesEval's tolerance is calibrated on such renders
    (`shapes.benchmark.measure_prototypes`); pretraining never uses them."""

    stretch: float = 1.4
    rotation: float = 10.0
    rounding: float = 0.06


def _draw_distorted(canvas: Image.Image, o: DrawnObject, d: Distortion,
                    rng: np.random.Generator) -> None:
    """Draw `o` on the supersampled `canvas` with a random distortion within `d`."""
    s = SUPERSAMPLE
    x0, y0, x1, y1 = (v * s for v in o.box)
    mask = Image.new("L", canvas.size, 0)
    draw = ImageDraw.Draw(mask)
    if o.cls == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=255)
    else:
        draw.polygon([(x0 + u * (x1 - x0), y0 + v * (y1 - y0)) for u, v in OUTLINES[o.cls]],
                     fill=255)
    if d.rounding > 0:  # blur and re-threshold: convex corners become arcs
        radius = rng.uniform(0, d.rounding) * (x1 - x0)
        mask = mask.filter(ImageFilter.GaussianBlur(radius)).point(lambda v: 255 * (v >= 128))
    # inverse affine map about the box centre: output (x, y) samples input A^-1 (x - c) + c
    a = math.exp(rng.uniform(-math.log(d.stretch), math.log(d.stretch)))  # aspect factor
    t = math.radians(rng.uniform(-d.rotation, d.rotation))
    sx, sy = math.sqrt(a), 1 / math.sqrt(a)
    cos, sin = math.cos(t), math.sin(t)
    inv = np.array([[cos / sx, sin / sx], [-sin / sy, cos / sy]])  # (R S)^-1 = S^-1 R^T
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    off = np.array([cx, cy]) - inv @ np.array([cx, cy])
    mask = mask.transform(mask.size, Image.AFFINE, (*inv[0], off[0], *inv[1], off[1]),
                          resample=Image.BILINEAR)
    canvas.paste(PALETTE[o.color], mask=mask.point(lambda v: 255 * (v >= 128)))


def render_scene(metadata: dict, rng: np.random.Generator, size: int = 64,
                 distortion: Distortion | None = None) -> tuple[np.ndarray, list[DrawnObject]]:
    """Draw exactly the objects `metadata` includes; returns (uint8 [size, size, 3], objects).

    Uncoloured objects get a uniform colour from `allowed_colors` (each object its own).
    Objects never touch; position clauses hold under the stricter render rule. With a
    `distortion` each object is drawn bent within it (and may then come closer than GAP).
    """
    _check_metadata(metadata)
    for _attempt in range(100):
        objects = _place_scene(metadata, rng, size)
        if objects is not None:
            break
    else:
        raise RuntimeError(f"could not place the objects of {metadata['prompt']!r} in {size} px")
    s = SUPERSAMPLE
    canvas = Image.new("RGB", (size * s, size * s), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for o in objects:
        if distortion is not None:
            _draw_distorted(canvas, o, distortion, rng)
            continue
        x0, y0, x1, y1 = (v * s for v in o.box)
        if o.cls == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=PALETTE[o.color])
        else:
            pts = [(x0 + u * (x1 - x0), y0 + v * (y1 - y0)) for u, v in OUTLINES[o.cls]]
            draw.polygon(pts, fill=PALETTE[o.color])
    return np.asarray(canvas.reduce(s)), objects


def render(metadata: dict, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """An image (uint8 [size, size, 3]) satisfying GenEval metadata; deterministic given rng."""
    return render_scene(metadata, rng, size)[0]


# Magnitudes for `perturb`, in 0-255 units: a generative model's output is soft-edged
# and slightly off-palette; these stay well inside the detector's colour margins.
NOISE_SIGMA = 8.0
COLOR_JITTER = 12.0


def perturb(image: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Blur with a 3x3 binomial kernel, shift each channel by U(-12, 12) for the whole
    image, add N(0, 8^2) pixel noise, clip to uint8. `strength` scales jitter and noise."""
    x = image.astype(np.float32)
    p = np.pad(x, ((1, 1), (0, 0), (0, 0)), mode="edge")
    x = 0.25 * p[:-2] + 0.5 * p[1:-1] + 0.25 * p[2:]
    p = np.pad(x, ((0, 0), (1, 1), (0, 0)), mode="edge")
    x = 0.25 * p[:, :-2] + 0.5 * p[:, 1:-1] + 0.25 * p[:, 2:]
    x = x + strength * rng.uniform(-COLOR_JITTER, COLOR_JITTER, size=3).astype(np.float32)
    x = x + strength * rng.normal(0.0, NOISE_SIGMA, size=x.shape).astype(np.float32)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


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
