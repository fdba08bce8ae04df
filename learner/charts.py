"""Line charts of per-step training curves, drawn with matplotlib (Agg, no display).

Each panel is (title, [(label, per-step values)]); NaN values are skipped, so a series
measured every few steps draws as a line through its points. Used for a run's
``eval.png`` (``learner.evaluation``) and ``training.png`` (:func:`plot_training`, at
each checkpoint), and for the studies' figures (``studies.report``, ``studies.curve``).

Figures are built as ``matplotlib.figure.Figure`` on an Agg canvas, never through
``pyplot``: pyplot keeps every figure in a global registry until it is closed (a leak in
a driver that plots at every checkpoint) and picks a GUI backend where a display exists.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from numbers import Real
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
          (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
PANEL = (480, 270)  # pixels of one chart panel
DPI = 96  # PANEL in inches is PANEL / DPI; a saved chart is exactly columns x rows panels
FONT = 8  # points: small panels, still readable at 100 %

Series = Sequence[tuple[str, Sequence[float]]]
Panel = tuple[str, Series]


def moving_average(ys: Sequence[float], w: int) -> list[float]:
    """Trailing mean over ``w`` steps, NaNs ignored (NaN where the window has none)."""
    a = np.asarray(ys, dtype=np.float64)
    out = []
    for i in range(len(a)):
        part = a[max(0, i - w + 1):i + 1]
        part = part[np.isfinite(part)]
        out.append(float(part.mean()) if len(part) else np.nan)
    return out


def color(i: int) -> tuple[float, float, float]:
    """The i-th series colour (matplotlib's tab10, as 0-1 RGB)."""
    return tuple(ch / 255 for ch in COLORS[i % len(COLORS)])


def finite(x: np.ndarray, y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The points of ``(x, y)`` with a finite y: NaNs would break the line into pieces."""
    y = np.asarray(y, dtype=np.float64)
    keep = np.isfinite(y)
    return x[keep], y[keep]


def draw_panel(ax: Axes, title: str, series: Series, smooth: int,
               bands: Sequence[Sequence[float] | None] = (), x: Sequence[float] | None = None,
               xlabel: str = "training step") -> None:
    """One line chart: a faint line per step and a bold trailing mean over ``smooth`` steps.

    ``bands[i]`` (optional): a per-step spread of series i (a std), shaded as mean ± band.
    ``x``: the steps of the values (default 0, 1, 2, ...).
    """
    ax.set_title(title, fontsize=FONT + 1, loc="left")
    ax.set_xlabel(xlabel, fontsize=FONT)
    ax.tick_params(labelsize=FONT)
    ax.grid(alpha=0.3, linewidth=0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and versions are whole
    drawn = False
    for c, (label, ys) in enumerate(series):
        steps = np.asarray(x if x is not None else range(len(ys)), dtype=np.float64)
        band = bands[c] if c < len(bands) else None
        if band is not None:
            lo, hi = np.asarray(ys, float) - np.asarray(band, float), np.asarray(ys, float) + band
            keep = np.isfinite(lo) & np.isfinite(hi)
            ax.fill_between(steps[keep], lo[keep], hi[keep], color=color(c), alpha=0.15,
                            linewidth=0)
        raw, avg = finite(steps, ys), finite(steps, moving_average(ys, smooth))
        if smooth > 1:
            ax.plot(*raw, color=color(c), alpha=0.35, linewidth=0.8)
        marker = "o" if len(raw[0]) < 3 else None  # a line needs two points; one shows as a dot
        ax.plot(*avg, color=color(c), linewidth=1.6, label=label, marker=marker, markersize=3)
        drawn = drawn or len(raw[0]) > 0
    if not drawn:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center",
                fontsize=FONT + 1)
        ax.set_xticks([])
        ax.set_yticks([])
    elif series:
        ax.legend(fontsize=FONT - 1, loc="best", frameon=False)


def figure(n: int, columns: int) -> tuple[Figure, list[Axes]]:
    """A figure of ``n`` panels in ``columns`` columns, PANEL pixels each; spare cells off."""
    rows = max(-(-n // columns), 1)
    fig = Figure(figsize=(columns * PANEL[0] / DPI, rows * PANEL[1] / DPI), dpi=DPI,
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).ravel())
    for ax in axes[n:]:
        ax.set_axis_off()
    return fig, axes[:n]


def save(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG and free it (the figure holds its whole pixel buffer)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    fig.clear()
    return path


def line_charts(path: Path, panels: Sequence[Panel], columns: int = 2, smooth: int = 10, *,
                xlabel: str = "training step") -> Path:
    """Panels of (title, [(label, per-step values)]) in a grid, saved as a PNG.

    Each series is drawn faint per step and bold as its trailing mean over ``smooth`` steps.
    """
    fig, axes = figure(len(panels), columns)
    for ax, (title, series) in zip(axes, panels, strict=True):
        draw_panel(ax, title, series, smooth, xlabel=xlabel)
    return save(fig, path)


# -- training.png: a run's own curves, from metrics.jsonl ---------------------------------

# (title, metrics.jsonl keys drawn in it); reward panels come first, one per reward
TRAINING_PANELS = (
    ("loss/total", ("loss/total",)),
    ("KL to the reference", ("loss/kl", "loss/approx_kl")),
    ("gradient norm (before clipping)", ("loss/grad_norm", "grad/norm")),
    ("rollout samples per second", ("rollout/samples_per_s",)),
)


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl, one row per step (a repeated step: its last row), in step order."""
    path = Path(run_dir) / "metrics.jsonl"
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        if line.strip():
            row = json.loads(line)
            by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]


def column(rows: Sequence[dict], key: str) -> list[float]:
    """``key`` of every row, NaN where a row lacks it or holds no number."""
    return [float(v) if isinstance(v := r.get(key), Real) else math.nan for r in rows]


def reward_names(rows: Sequence[dict]) -> list[str]:
    """The rewards that have a ``reward/<name>/mean`` in some row, in first-seen order."""
    names: dict[str, None] = {}
    for r in rows:
        for k in r:
            parts = k.split("/")
            if len(parts) == 3 and parts[0] == "reward" and parts[2] == "mean":
                names.setdefault(parts[1])
    return list(names)


def training_panels(rows: Sequence[dict]) -> list[tuple[str, list[tuple[str, str, str | None]]]]:
    """(title, [(label, key, std key or None)]) of each panel with data in ``rows``."""
    panels = [(f"reward: {name} (mean ± std over the step's samples)",
               [(name, f"reward/{name}/mean", f"reward/{name}/std")])
              for name in reward_names(rows)]
    for title, keys in TRAINING_PANELS:
        present = [(k, k, None) for k in keys if any(k in r for r in rows)]
        if present:
            panels.append((title, present))
    return panels


def plot_training(run_dir: Path, columns: int = 2) -> Path | None:
    """``training.png`` in the run dir: rewards, loss, KL, grad norm, throughput per step.

    Written at each checkpoint, so a running job's progress is one image away; None when
    metrics.jsonl has no rows yet.
    """
    rows = read_metrics(run_dir)
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    smooth = max(1, min(10, len(rows) // 10))
    panels = training_panels(rows)
    fig, axes = figure(len(panels), columns)
    for ax, (title, lines) in zip(axes, panels, strict=True):
        series = [(label, column(rows, key)) for label, key, _ in lines]
        bands = [column(rows, std) if std else None for _, _, std in lines]
        draw_panel(ax, title, series, smooth, bands=bands, x=steps)
    return save(fig, Path(run_dir) / "training.png")
