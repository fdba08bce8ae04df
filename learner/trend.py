"""Is a run's training reward going up? Per-block means of one reward from samples.jsonl.

    python -m learner.trend runs/my-run                     # the first reward, blocks of 10 steps
    python -m learner.trend runs/my-run --reward shapes --block 25

For each block of steps: the mean of the reward over the block's samples with its
standard error, and the share of samples at the reward's maximum (for ShapesEval partial
credit, 1.0 exactly when the image is strictly correct). A run's per-step mean swings
with the prompts drawn; blocks and standard errors say whether a change is more than
that. A resumed run's repeated steps count once (the last record).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np


def load_rewards(run_dir: Path, reward: str | None) -> tuple[str, dict[int, list[float]]]:
    """``(reward key, {step: [reward of each sample]})`` from ``run_dir/samples.jsonl``."""
    path = run_dir / "samples.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path} does not exist: pass a run directory written by learner.main")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    keys = sorted({k for r in rows for k in r if k.startswith("reward/")})
    key = f"reward/{reward}" if reward else (keys[0] if keys else None)
    if key not in keys:
        raise SystemExit(f"{path} has no reward {reward!r}; it has {[k[7:] for k in keys]}")
    by_step: dict[tuple[int, int], float] = {}
    for r in rows:  # a resumed run rewrites its repeated steps (same seeds): keep the last
        if r.get(key) is not None:  # null: the reward was dropped for this sample
            by_step[(r["step"], r["seed"])] = r[key]
    steps: dict[int, list[float]] = {}
    for (step, _), value in sorted(by_step.items()):
        steps.setdefault(step, []).append(float(value))
    return key, steps


def blocks(steps: dict[int, list[float]], size: int) -> list[dict]:
    """Mean, standard error and share at the maximum per block of ``size`` steps."""
    top = max(v for vals in steps.values() for v in vals)
    out = []
    for start in range(0, max(steps) + 1, size):
        vals = np.array([v for s in range(start, start + size) for v in steps.get(s, [])])
        if len(vals) == 0:
            continue
        se = float(vals.std(ddof=1) / math.sqrt(len(vals))) if len(vals) > 1 else float("nan")
        out.append({"steps": f"{start}-{start + size - 1}", "samples": len(vals),
                    "mean": float(vals.mean()), "se": se, "at_max": float((vals == top).mean())})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--reward", help="reward name in samples.jsonl (default: the first)")
    parser.add_argument("--block", type=int, default=10, help="steps per block")
    args = parser.parse_args(argv)
    if args.block < 1:
        raise SystemExit("--block must be >= 1")
    key, steps = load_rewards(args.run_dir, args.reward)
    print(f"{args.run_dir}: {key}, {sum(map(len, steps.values()))} samples in {len(steps)} steps")
    print(f"{'steps':>9} {'samples':>7} {'mean':>7} {'± se':>7} {'at max':>7}")
    for b in blocks(steps, args.block):
        print(f"{b['steps']:>9} {b['samples']:>7} {b['mean']:7.3f} {b['se']:7.3f} {b['at_max']:7.3f}")


if __name__ == "__main__":
    main()
