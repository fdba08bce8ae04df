"""ShapesEval's detector: palette pixel model, batched blob labelling, shape features
and the per-class prototype classifier (pure numpy).

The deviations from GenEval's Mask2Former + CLIP detection are listed in `shapes.evaluate`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shapes.draw import PALETTE
from shapes.prompts import CLASSES, COLORS

# Pixel model: every pixel is alpha * c + (1 - alpha) * white for the palette colour
# c that fits it best. c is the pixel's colour and alpha its coverage, so
# anti-aliased fringes keep their colour and every colour gets the same threshold.
FG_ALPHA = 0.5  # foreground for labelling
SOLID_ALPHA = 0.75  # the pixels trusted for the colour vote
NOISE_ALPHA = 0.2  # coverage below this is background noise in the soft shape features
OFF_PALETTE_DIST = 60.0  # RGB distance from the best mix above which a pixel has no colour
OFF_PALETTE = len(COLORS) + 1  # colour code 7; codes 1-6 are COLORS, 0 is background
MIN_AREA_64 = 20  # smaller components (pixels at 64x64) are noise; the smallest shape has ~60

# Shape features from the component's coverage map (soft, so a half-covered edge row
# counts half instead of flipping with the noise): fill of the box, of its top and
# bottom thirds, log aspect w/h, fill of the top and bottom corner cells (a quarter
# of the box each way), and the 3rd, 4th and 5th harmonics of the outline's radius
# around the centroid (relative to the mean radius). Corners tell squares from circles
# (~0.85 vs ~0.3) and triangles from stars (bottom corners ~0.85 vs ~0.3); the 5th
# harmonic tells a five-pointed star (~0.13) from a blob or a rounded pentagon (< 0.05).
FEATURE_NAMES = ("fill", "top_third", "bottom_third", "log_aspect", "top_corners",
                 "bottom_corners", "harmonic3", "harmonic4", "harmonic5")
RADIAL_BINS = 32  # angular bins of the outline radius
# Per class: mean and std of each feature over clean, perturbed and `Distortion`-bent
# renders (stretched up to 1.4x, rotated up to 10 degrees, corners rounded), measured by
# `python -m shapes.benchmark --prototypes`. A shape is matched to the class
# with the smallest distance in that class's std units, so the tolerance is "as bent as
# a Distortion", not "as exact as the renderer".
PROTOTYPES = np.array([
    [0.774, 0.676, 0.676, -0.002, 0.312, 0.312, 0.006, 0.006, 0.006],  # circle
    [0.924, 0.905, 0.904, 0.000, 0.844, 0.843, 0.006, 0.069, 0.006],  # square
    [0.578, 0.265, 0.861, 0.097, 0.005, 0.840, 0.168, 0.027, 0.028],  # triangle
    [0.541, 0.304, 0.515, 0.024, 0.012, 0.298, 0.025, 0.021, 0.141],  # star
], dtype=np.float32)
CLASS_STD = np.array([
    [0.008, 0.012, 0.012, 0.131, 0.020, 0.020, 0.004, 0.004, 0.004],  # circle
    [0.068, 0.087, 0.087, 0.120, 0.145, 0.145, 0.004, 0.008, 0.004],  # square
    [0.031, 0.041, 0.061, 0.130, 0.013, 0.087, 0.026, 0.021, 0.018],  # triangle
    [0.047, 0.066, 0.052, 0.123, 0.020, 0.066, 0.017, 0.018, 0.026],  # star
], dtype=np.float32)
# No feature is trusted to better than STD_FLOOR: at 64 px one pixel row of a 16 px
# shape moves a fill fraction by ~0.06, so finer differences are pixel luck.
STD_FLOOR = 0.03
# A component further than this (in its nearest class's stds) is not an object, as
# low-scoring detections are dropped in GenEval: 99 % of bent renders lie within 5.3,
# while blobs and rounded pentagons land at 7 or more.
MAX_SHAPE_DIST = 6.5
# Stretched more than this factor from the class's aspect ratio, it is not that class.
MAX_STRETCH = 1.6


def _build_luts() -> tuple[np.ndarray, np.ndarray]:
    """Tables over RGB quantised to 6 bits per channel (2**18 entries).

    Returns (code uint8, alpha float32). code & 7: 0 background, 1-6 palette colour,
    7 off-palette; code & 8: solid. Tables make the per-pixel work one gather.
    """
    v = np.arange(64, dtype=np.float32) * 4 + 1.5  # bin centres
    ink = 255 - np.stack(np.meshgrid(v, v, v, indexing="ij"), axis=-1).reshape(-1, 3)  # [M,3]
    pal_ink = 255 - np.array([PALETTE[c] for c in COLORS], dtype=np.float32)  # [6,3]
    # alpha: projection of the pixel's ink on each colour's ink, clipped to [0, 1]
    alpha = np.clip(ink @ pal_ink.T / (pal_ink**2).sum(axis=1), 0.0, 1.0)  # [M,6]
    resid = np.linalg.norm(ink[:, None, :] - alpha[..., None] * pal_ink[None], axis=-1)  # [M,6]
    best = resid.argmin(axis=1)
    a = alpha[np.arange(len(ink)), best]
    colour = np.where(resid.min(axis=1) <= OFF_PALETTE_DIST, best + 1, OFF_PALETTE)
    # off-palette ink (gray, black, ...) is foreground by its strongest channel
    a = np.where(colour == OFF_PALETTE, ink.max(axis=1) / 255, a)
    code = np.where(a >= FG_ALPHA, colour + 8 * (a >= SOLID_ALPHA), 0)
    return code.astype(np.uint8), a.astype(np.float32)


_CODE_LUT, _ALPHA_LUT = _build_luts()


@dataclass
class Detection:
    """One detected object."""

    shape: str | None  # None: a blob unlike every class prototype (not counted)
    color: str | None  # None: no solid pixels, or mostly off-palette
    confidence: float  # prototype margin in [0.5, 1]; orders objects like GenEval's scores
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels, x1/y1 exclusive
    area: int  # foreground pixels
    # distance to each class's prototype (CLASSES order) in that class's stds; inf where
    # the blob is stretched past MAX_STRETCH from the class's aspect (soft credit reads it)
    distances: tuple[float, ...] = ()


def pixel_maps(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N,H,W,3] -> (code uint8 [N,H,W], alpha float32 [N,H,W]); see `_build_luts`."""
    q = (images >> 2).astype(np.int32)
    idx = (q[..., 0] << 12) | (q[..., 1] << 6) | q[..., 2]
    return _CODE_LUT[idx], _ALPHA_LUT[idx]


def label_components(fg: np.ndarray) -> np.ndarray:
    """8-connected components of a bool [N,H,W] batch.

    Returns int32 [N,H,W]: for each foreground pixel the flat index of the
    smallest-index pixel of its component, -1 on background. Min-propagation over
    3x3 neighbourhoods plus pointer jumping (a label is itself a pixel index, so a
    pixel may adopt its label's label), which converges in a few dozen passes.
    """
    n, h, w = fg.shape
    big = np.iinfo(np.int32).max
    lab = np.where(fg, np.arange(n * h * w, dtype=np.int32).reshape(n, h, w), big)
    pad = np.full((n, h + 2, w + 2), big, dtype=np.int32)
    fg_flat = fg.ravel()
    while True:
        pad[:, 1:-1, 1:-1] = lab
        row = np.minimum(np.minimum(pad[:, :, :-2], pad[:, :, 1:-1]), pad[:, :, 2:])
        new = np.minimum(np.minimum(row[:, :-2], row[:, 1:-1]), row[:, 2:])
        new = np.where(fg, new, big)
        flat = new.ravel()
        for _ in range(2):
            flat[fg_flat] = flat[flat[fg_flat]]
        if np.array_equal(new, lab):
            return np.where(fg, lab, -1)
        lab = new


def _boxes(y: np.ndarray, x: np.ndarray, comp: np.ndarray, k: int) -> np.ndarray:
    """int [K,4] bounding boxes (x0, y0, x1, y1; x1/y1 exclusive) of each component's pixels."""
    x0, y0 = np.full(k, 1 << 30), np.full(k, 1 << 30)
    x1, y1 = np.full(k, -1), np.full(k, -1)
    np.minimum.at(x0, comp, x)
    np.minimum.at(y0, comp, y)
    np.maximum.at(x1, comp, x + 1)
    np.maximum.at(y1, comp, y + 1)
    return np.stack([x0, y0, x1, y1], axis=1)


def _coverage_crops(alpha: np.ndarray, labels: np.ndarray, roots: np.ndarray,
                    boxes: np.ndarray) -> np.ndarray:
    """float32 [K,Hc,Wc]: each component's coverage in its box grown by 1 px (top-left aligned,
    zero padded), relative to its peak. Other components' pixels are zeroed; unlabelled
    fringe pixels are kept."""
    n, h, w = alpha.shape
    img = roots // (h * w)
    hc, wc = int((boxes[:, 3] - boxes[:, 1]).max()) + 2, int((boxes[:, 2] - boxes[:, 0]).max()) + 2
    yy = boxes[:, 1:2] - 1 + np.arange(hc)  # [K,Hc]
    xx = boxes[:, 0:1] - 1 + np.arange(wc)  # [K,Wc]
    inside = (((yy >= 0) & (yy < h) & (yy <= boxes[:, 3:4]))[:, :, None]
              & ((xx >= 0) & (xx < w) & (xx <= boxes[:, 2:3]))[:, None, :])
    at = (img[:, None, None], yy.clip(0, h - 1)[:, :, None], xx.clip(0, w - 1)[:, None, :])
    lab = labels[at]
    a = np.where(inside & ((lab == roots[:, None, None]) | (lab < 0)), alpha[at], 0.0)
    a = np.where(a >= NOISE_ALPHA, a, 0.0)
    # Off-palette or pale objects never reach alpha 1: measure coverage relative to the peak.
    return (a / a.max(axis=(1, 2), keepdims=True)).astype(np.float32)


def _band(profile: np.ndarray, length: np.ndarray, from_end: bool) -> np.ndarray:
    """Fraction [K,L] of each row (or column) inside the first (or last) `length` units of
    the soft extent, where row i spans `profile[:, i]` units (its peak coverage)."""
    end = np.cumsum(profile, axis=1)
    start = end - profile
    if from_end:
        total = end[:, -1:]
        start, end = total - end, total - start
    return np.clip((length[:, None] - start) / np.maximum(profile, 1e-6), 0.0, 1.0)


def shape_features(a: np.ndarray) -> np.ndarray:
    """Coverage crops float32 [K,Hc,Wc] -> features float32 [K,9] (see FEATURE_NAMES)."""
    cols, rows = a.max(axis=1), a.max(axis=2)  # [K,Wc], [K,Hc]: soft extent per column / row
    w, h = cols.sum(axis=1), rows.sum(axis=1)  # [K]: soft width and height
    row_mass = a.sum(axis=2)  # [K,Hc]
    top3, bottom3 = _band(rows, h / 3, False), _band(rows, h / 3, True)
    top4, bottom4 = _band(rows, h / 4, False), _band(rows, h / 4, True)
    sides = _band(cols, w / 4, False) + _band(cols, w / 4, True)  # [K,Wc]
    corner = 2 * (w / 4) * (h / 4)
    return np.concatenate([np.stack([
        a.sum(axis=(1, 2)) / (w * h),
        (top3 * row_mass).sum(axis=1) / (w * h / 3),
        (bottom3 * row_mass).sum(axis=1) / (w * h / 3),
        np.log(w / h),
        np.einsum("khw,kh,kw->k", a, top4, sides) / corner,
        np.einsum("khw,kh,kw->k", a, bottom4, sides) / corner,
    ], axis=1), radial_harmonics(a)], axis=1).astype(np.float32)


def radial_harmonics(a: np.ndarray, orders: tuple[int, ...] = (3, 4, 5)) -> np.ndarray:
    """Coverage crops [K,Hc,Wc] -> [K,len(orders)]: magnitudes of the outline radius's
    angular harmonics, relative to its mean. The radius in each of RADIAL_BINS angular
    bins is the farthest covered (>= 0.5) pixel from the coverage centroid; an n-pointed
    shape has a strong n-th harmonic whatever its rotation."""
    k, hc, wc = a.shape
    yy, xx = np.mgrid[0:hc, 0:wc].astype(np.float32)
    mass = a.sum(axis=(1, 2))
    dy = yy[None] - ((a * yy).sum(axis=(1, 2)) / mass)[:, None, None]
    dx = xx[None] - ((a * xx).sum(axis=(1, 2)) / mass)[:, None, None]
    covered = a >= 0.5
    kk = np.broadcast_to(np.arange(k)[:, None, None], a.shape)[covered]
    angle = np.arctan2(dy[covered], dx[covered])
    bins = ((angle + np.pi) * (RADIAL_BINS / (2 * np.pi))).astype(np.int64) % RADIAL_BINS
    radius = np.zeros((k, RADIAL_BINS), dtype=np.float32)
    np.maximum.at(radius, (kk, bins), np.hypot(dx[covered], dy[covered]) + 0.5)
    spectrum = np.abs(np.fft.rfft(radius, axis=1)) / np.maximum(radius.sum(axis=1, keepdims=True),
                                                                1e-6)
    return spectrum[:, list(orders)]


def class_distances(feats: np.ndarray) -> np.ndarray:
    """float [K,4]: each component's distance to each class prototype in that class's
    stds, inf where it is stretched past MAX_STRETCH from the class's aspect ratio."""
    std = np.maximum(CLASS_STD, STD_FLOOR)
    d = np.linalg.norm((feats[:, None, :] - PROTOTYPES[None]) / std[None], axis=-1)  # [K,4]
    stretch = np.abs(feats[:, None, 3] - PROTOTYPES[None, :, 3])  # [K,4] |log aspect ratio|
    return np.where(stretch <= np.log(MAX_STRETCH), d, np.inf)


def classify_shapes(feats: np.ndarray) -> tuple[list[str | None], np.ndarray]:
    """Nearest class per component -> (class or None, confidence float [K])."""
    d = class_distances(feats)
    d1, d2 = np.sort(d, axis=1)[:, :2].T
    finite = np.isfinite(d2)  # a second candidate class within MAX_STRETCH
    with np.errstate(invalid="ignore"):  # inf / inf where no class is within MAX_STRETCH
        conf = np.where(finite, d2 / (d1 + d2 + 1e-9), 1.0)
    nearest = d.argmin(axis=1)
    shapes = [CLASSES[i] if dist <= MAX_SHAPE_DIST else None
              for i, dist in zip(nearest, d1, strict=True)]
    return shapes, conf


def _colours(codes: np.ndarray, comp: np.ndarray, k: int) -> list[str | None]:
    """Majority colour of each component's solid pixels (None: none solid, or off-palette)."""
    votes = np.bincount(comp * 8 + (codes & 7), weights=codes >> 3, minlength=8 * k).reshape(k, 8)
    best = votes[:, 1:].argmax(axis=1) + 1
    return [COLORS[b - 1] if v > 0 and b != OFF_PALETTE else None
            for b, v in zip(best, votes[:, 1:].sum(axis=1), strict=True)]


@dataclass
class Components:
    """The K foreground components of a batch that are big enough to be objects."""

    image: np.ndarray  # int [K]: which image each is in
    boxes: np.ndarray  # int [K,4]: x0, y0, x1, y1 (exclusive)
    area: np.ndarray  # int [K]: foreground pixels
    features: np.ndarray  # float32 [K,9]: see FEATURE_NAMES
    colors: list[str | None]


def find_components(images: np.ndarray) -> Components:
    """uint8 [N,H,W,3] -> components with their boxes, shape features and colours."""
    n, h, w, _ = images.shape
    codes, alpha = pixel_maps(images)
    labels = label_components(codes > 0)
    flat = labels.ravel()
    pix = np.flatnonzero(flat >= 0)
    roots, comp = np.unique(flat[pix], return_inverse=True)
    area = np.bincount(comp, minlength=len(roots))
    keep = area >= MIN_AREA_64 * h * w / 4096
    # drop noise components before measuring, renumber the survivors 0..K-1
    sel = keep[comp]
    pix, comp, roots, area = pix[sel], (np.cumsum(keep) - 1)[comp[sel]], roots[keep], area[keep]
    if len(roots) == 0:
        return Components(roots, np.zeros((0, 4), int), area, np.zeros((0, len(FEATURE_NAMES)), np.float32), [])
    boxes = _boxes((pix // w) % h, pix % w, comp, len(roots))
    features = shape_features(_coverage_crops(alpha, labels, roots, boxes))
    colours = _colours(codes.ravel()[pix], comp, len(roots))
    return Components(roots // (h * w), boxes, area, features, colours)


def detect(images: np.ndarray) -> list[list[Detection]]:
    """uint8 [N,H,W,3] -> per image, detections sorted by confidence (highest first)."""
    comps = find_components(images)
    shapes, conf = classify_shapes(comps.features)
    dist = class_distances(comps.features)
    out: list[list[Detection]] = [[] for _ in range(len(images))]
    for j, i in enumerate(comps.image):
        box = tuple(float(v) for v in comps.boxes[j])
        out[i].append(Detection(shapes[j], comps.colors[j], float(conf[j]), box,
                                int(comps.area[j]), tuple(float(x) for x in dist[j])))
    for dets in out:
        dets.sort(key=lambda d: -d.confidence)
    return out
