"""Drawing scenes: GenEval's relation rule, shape geometry, placement, the renderer,
`Distortion` and `perturb`.

A scene is drawn from GenEval metadata (`shapes.prompts`) at 4x and box-filtered down,
so edges are anti-aliased like a model's; the background is white (see `shapes.world`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from shapes.prompts import CLASSES, COLORS, RELATIONS, allowed_colors

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
