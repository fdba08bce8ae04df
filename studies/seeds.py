"""Several seeds of one learning-curve study side by side.

    python -m studies.seeds docs/curves/credit_s0.json docs/curves/credit_s1.json \\
        docs/curves/credit_s2.json --metric reward/self_confidence --out docs/curves/credit

Reads the ``<out>.json`` that ``python -m studies.curve`` writes for each seed and, for
one held-out metric, prints each run's paired gain over its frozen control at every
evaluated version, seed by seed (± the standard error over images), with the mean over
seeds and its standard error over seeds; writes ``<out>.md`` (the table) and
``<out>.png`` (one line per seed and run, the mean bold).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def gains(reports: list[dict], metric: str) -> dict[str, dict[int, list[tuple[float, float]]]]:
    """``{run: {version: [(gain, se) per seed]}}`` of ``metric`` on held-out images, for
    the runs every report holds."""
    common = set.intersection(*(set(r["runs"]) for r in reports))
    out: dict[str, dict[int, list[tuple[float, float]]]] = {}
    for report in reports:
        for run, data in report["runs"].items():
            if run not in common:
                continue
            for point in data["eval"].get(metric, []):
                out.setdefault(run, {}).setdefault(point["version"], []).append(
                    (point["mean"], point["se"]))
    return out


def table(curves: dict, metric: str, seeds: int) -> str:
    lines = [f"Held-out {metric}: paired gain over the frozen control, per seed "
             "(± standard error over images) and the mean over seeds (± standard error over "
             "seeds)", "",
             "| run | version | " + " | ".join(f"seed {i}" for i in range(seeds)) + " | mean |",
             "|---|---|" + "---|" * (seeds + 1)]
    for run, by_version in curves.items():
        for version, points in sorted(by_version.items()):
            if version == 0:
                continue
            g = np.array([p[0] for p in points])
            se = g.std(ddof=1) / np.sqrt(len(g)) if len(g) > 1 else 0.0
            cells = " | ".join(f"{m:+.3f} ± {e:.3f}" for m, e in points)
            lines.append(f"| {run} | {version} | {cells} | **{g.mean():+.3f} ± {se:.3f}** |")
    return "\n".join(lines)


def plot(curves: dict, metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (run, by_version) in enumerate(curves.items()):
        versions = sorted(by_version)
        per_seed = np.array([[p[0] for p in by_version[v]] for v in versions])  # [V, S]
        color = f"C{i}"
        for s in range(per_seed.shape[1]):
            ax.plot(versions, per_seed[:, s], color=color, alpha=0.35, lw=1)
        ax.plot(versions, per_seed.mean(axis=1), color=color, lw=2.5, marker="o", label=run)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xlabel("weight version (training steps)")
    ax.set_ylabel(f"held-out {metric}: gain over frozen")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", type=Path, help="studies.curve <out>.json, one a seed")
    parser.add_argument("--metric", default="reward/self_confidence", help="held-out metric")
    parser.add_argument("--out", type=Path, required=True, help="output stem (.md, .png)")
    args = parser.parse_args(argv)
    reports = [json.loads(p.read_text()) for p in args.reports]
    curves = gains(reports, args.metric)
    if not curves:
        parser.error(f"no held-out {args.metric!r} in these reports")
    text = table(curves, args.metric, len(reports))
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text + "\n")
    plot(curves, args.metric, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
