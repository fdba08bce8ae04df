"""Line charts of per-step training curves, drawn with PIL (no plotting library needed).

Each panel is (title, [(label, per-step values)]); NaN values are skipped, so a series
measured every few steps draws as a line through its points. Used for a run's
``eval.png`` (``learner.main``) and for the studies' figures (``studies.report``,
``studies.curve``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
          (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
PANEL = (480, 270)  # pixels of one chart panel


def moving_average(ys: Sequence[float], w: int) -> list[float]:
    """Trailing mean over ``w`` steps, NaNs ignored (NaN where the window has none)."""
    a = np.asarray(ys, dtype=np.float64)
    out = []
    for i in range(len(a)):
        part = a[max(0, i - w + 1):i + 1]
        part = part[np.isfinite(part)]
        out.append(float(part.mean()) if len(part) else np.nan)
    return out


def draw_panel(draw: ImageDraw.ImageDraw, origin: tuple[int, int], title: str,
               series: Sequence[tuple[str, Sequence[float]]], smooth: int) -> None:
    """One line chart: x = training step, a faint line per step and a bold moving average."""
    ox, oy = origin
    left, right, top, bottom = ox + 60, ox + PANEL[0] - 14, oy + 22, oy + PANEL[1] - 34
    draw.text((left, oy + 6), title, fill="black")
    values = np.array([v for _, ys in series for v in ys], dtype=np.float64)
    values = values[np.isfinite(values)]
    draw.rectangle([left, top, right, bottom], outline="black")
    if len(values) == 0:
        draw.text((left + 10, top + 10), "no data", fill="black")
        return
    lo, hi = float(values.min()), float(values.max())
    pad = 0.05 * (hi - lo) if hi > lo else max(abs(lo), 1.0) * 0.05
    lo, hi = lo - pad, hi + pad
    last = max(max(len(ys) for _, ys in series) - 1, 1)

    def xy(i: int, v: float) -> tuple[float, float]:
        return (left + (right - left) * i / last, bottom - (bottom - top) * (v - lo) / (hi - lo))

    for k in range(5):  # y ticks
        v = lo + (hi - lo) * k / 4
        y = xy(0, v)[1]
        draw.line([(left - 4, y), (left, y)], fill="black")
        draw.text((ox + 4, y - 6), f"{v:.3g}", fill="black")
    for i in sorted({0, last // 2, last}):  # x ticks
        x = xy(i, lo)[0]
        draw.line([(x, bottom), (x, bottom + 4)], fill="black")
        draw.text((x - 6, bottom + 6), str(i), fill="black")
    draw.text(((left + right) // 2 - 36, bottom + 18), "training step", fill="black")
    for c, (label, ys) in enumerate(series):
        color = COLORS[c % len(COLORS)]
        faint = tuple(255 - (255 - ch) * 2 // 5 for ch in color)
        for line, fill, width in ((ys, faint, 1), (moving_average(ys, smooth), color, 2)):
            points = [xy(i, v) for i, v in enumerate(line) if np.isfinite(v)]
            if len(points) > 1:
                draw.line(points, fill=fill, width=width)
        draw.rectangle([left + 6, top + 6 + 12 * c, left + 14, top + 14 + 12 * c], fill=color)
        draw.text((left + 18, top + 4 + 12 * c), label, fill="black")


def line_charts(path: Path, panels: Sequence[tuple[str, Sequence[tuple[str, Sequence[float]]]]],
                columns: int = 2, smooth: int = 10) -> Path:
    """Panels of (title, [(label, per-step values)]) in a grid, saved as a PNG.

    Each series is drawn faint per step and bold as its trailing mean over ``smooth`` steps.
    """
    rows = -(-len(panels) // columns)
    image = Image.new("RGB", (columns * PANEL[0], rows * PANEL[1]), "white")
    draw = ImageDraw.Draw(image)
    for n, (title, series) in enumerate(panels):
        draw_panel(draw, ((n % columns) * PANEL[0], (n // columns) * PANEL[1]), title, series,
                   smooth)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
