"""The step-time plot: seconds per step by phase, and the service's actor timeline (PIL)."""

from __future__ import annotations

from pathlib import Path

from bench.tables import med, median_run

COLOURS = {"rollout": (66, 133, 244), "scoring": (251, 140, 0), "update": (52, 168, 83),
           "transport": (219, 68, 55), "publication": (142, 68, 173), "other": (170, 170, 170)}


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def plot(results: dict, path: Path) -> None:
    """Stacked seconds per step by phase, and the service's actor timeline (PIL, no matplotlib)."""
    from PIL import Image, ImageDraw

    e2e = results["e2e"]
    svc = median_run(e2e["service"])
    bars = []
    for r in (median_run(e2e["sequential"]), e2e["sequential_1"]):
        ph = dict(r["phases"])
        ph["other"] = max(0.0, med(r["step_s"]) - sum(ph.values()))
        bars.append((r["label"], ph, med(r["step_s"])))
    bars.append(("service: actor busy s, summed", svc["phases"], med(svc["step_s"])))

    W, H, left = 1200, 780, 300
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font, small = _font(16), _font(13)
    d.text((20, 12), "Seconds per step by phase (median over timed steps)", fill="black", font=font)
    top = max(max(sum(ph.values()), wall) for _, ph, wall in bars) * 1.1
    scale = (W - left - 230) / top
    for i, (label, ph, wall) in enumerate(bars):
        y = 50 + i * 55
        d.text((20, y + 10), label, fill="black", font=small)
        x = left
        for phase in (*COLOURS,):
            w = ph.get(phase, 0.0) * scale
            if w > 0:
                d.rectangle([x, y, x + w, y + 34], fill=COLOURS[phase])
                x += w
        wx = left + wall * scale
        d.line([wx, y - 4, wx, y + 38], fill="black", width=3)
        d.text((x + 6, y + 10), f"{sum(ph.values()):.2f} s (wall {wall:.2f} s)", fill="black",
               font=small)
    lx = left
    for phase, colour in COLOURS.items():
        d.rectangle([lx, 222, lx + 14, 236], fill=colour)
        d.text((lx + 20, 222), phase, fill="black", font=small)
        lx += 120

    # Gantt of the service over the last (up to) three timed steps.
    t0, t1 = svc["window"]
    ends = [t0]
    for s in svc["step_s"]:
        ends.append(ends[-1] + s)
    start = ends[max(0, len(ends) - 4)]
    rows = sorted({g[0] for g in svc["gantt"]})
    d.text((20, 270), f"Service actors, last {len(ends) - 1 - max(0, len(ends) - 4)} timed "
           f"steps ({t1 - start:.1f} s)", fill="black", font=font)
    gscale = (W - left - 40) / max(1e-9, t1 - start)
    for i, row in enumerate(rows):
        y = 310 + i * 50
        d.text((20, y + 10), row, fill="black", font=small)
        d.rectangle([left, y, W - 40, y + 34], outline=(220, 220, 220))
        for r, phase, a, b in svc["gantt"]:
            if r != row or b < start:
                continue
            xa, xb = left + (max(a, start) - start) * gscale, left + (min(b, t1) - start) * gscale
            d.rectangle([xa, y, max(xa + 1, xb), y + 34], fill=COLOURS[phase])
    y_end = 310 + len(rows) * 50
    for e in ends:
        if e >= start:
            x = left + (e - start) * gscale
            for yy in range(300, y_end, 8):
                d.line([x, yy, x, yy + 4], fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.crop((0, 0, W, min(H, y_end + 30))).save(path)
