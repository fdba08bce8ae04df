"""Is a run's training reward going up? Per-block means of one reward from samples.jsonl.

    python -m studies.trend runs/my-run                     # the first reward, blocks of 10 steps
    python -m studies.trend runs/my-run --reward shapes --block 25
    python -m studies.trend runs/a --against runs/b --reward shapes   # paired, same seed

For each block of steps: the mean of the reward over the block's samples with its
standard error, and the share of samples at the reward's maximum (for ShapesEval partial
credit, 1.0 exactly when the image is strictly correct). A run's per-step mean swings
with the prompts drawn; blocks and standard errors say whether a change is more than
that. A resumed run's repeated steps count once (the last record).

``--against`` compares two runs of the same seed sample by sample. The seed fixes each
step's prompts and every sample's noise (``policy.sampler.sample_seed``), so the two runs
score the same (prompt, noise) pairs and differ only in the policy that denoised them:
the per-block mean of ``reward(a) - reward(b)`` over those pairs, with its standard
error over samples, measures what the training changed, free of the prompt draw.
``--against-reward`` names the reward in the other run when it differs (e.g. ShapesEval
as the reward ``shapes`` in one run and the monitor ``shapes_monitor`` in another).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np


def read_samples(run_dir: Path) -> list[dict]:
    """The rows of ``run_dir/samples.jsonl`` (one per sample, as ``learner.main`` writes them)."""
    path = run_dir / "samples.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path} does not exist: pass a run directory written by learner.main")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def by_sample(rows: list[dict], key: str) -> dict[tuple[int, int], float]:
    """``{(step, seed): rows' value of key}``, skipping nulls (the reward was dropped)."""
    out: dict[tuple[int, int], float] = {}
    for r in rows:  # a resumed run rewrites its repeated steps (same seeds): keep the last
        if r.get(key) is not None:
            out[(r["step"], r["seed"])] = float(r[key])
    return out


def load_samples(run_dir: Path, reward: str | None) -> tuple[str, dict[tuple[int, int], float]]:
    """``(reward key, {(step, seed): reward})``; the first reward when ``reward`` is None."""
    rows = read_samples(run_dir)
    keys = sorted({k for r in rows for k in r if k.startswith("reward/")})
    key = f"reward/{reward}" if reward else (keys[0] if keys else None)
    if key not in keys:
        raise SystemExit(f"{run_dir / 'samples.jsonl'} has no reward {reward!r}; it has "
                         f"{[k[7:] for k in keys]}")
    return key, by_sample(rows, key)


def load_rewards(run_dir: Path, reward: str | None) -> tuple[str, dict[int, list[float]]]:
    """``(reward key, {step: [reward of each sample]})`` from ``run_dir/samples.jsonl``."""
    key, samples = load_samples(run_dir, reward)
    steps: dict[int, list[float]] = {}
    for (step, _), value in sorted(samples.items()):
        steps.setdefault(step, []).append(value)
    return key, steps


def paired(a: dict[tuple[int, int], float], b: dict[tuple[int, int], float]
           ) -> dict[int, list[float]]:
    """``{step: [a - b for each sample the two runs share]}``; refuses runs of other seeds."""
    shared = sorted(a.keys() & b.keys())
    if not shared:
        raise SystemExit("the two runs share no (step, sample seed): compare runs of the same "
                         "seed (the seed fixes each step's prompts and noise)")
    diffs: dict[int, list[float]] = {}
    for key in shared:
        diffs.setdefault(key[0], []).append(a[key] - b[key])
    return diffs


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
    parser.add_argument("--against", type=Path, help="a run of the same seed: paired differences")
    parser.add_argument("--against-reward", help="the reward's name in --against (default: --reward)")
    args = parser.parse_args(argv)
    if args.block < 1:
        raise SystemExit("--block must be >= 1")
    if args.against is None:
        key, steps = load_rewards(args.run_dir, args.reward)
        print(f"{args.run_dir}: {key}, {sum(map(len, steps.values()))} samples in {len(steps)} steps")
        print(f"{'steps':>9} {'samples':>7} {'mean':>7} {'± se':>7} {'at max':>7}")
        for b in blocks(steps, args.block):
            print(f"{b['steps']:>9} {b['samples']:>7} {b['mean']:7.3f} {b['se']:7.3f} "
                  f"{b['at_max']:7.3f}")
        return
    key, a = load_samples(args.run_dir, args.reward)
    other, b = load_samples(args.against, args.against_reward or key[len("reward/"):])
    diffs = paired(a, b)
    print(f"{args.run_dir} {key} minus {args.against} {other}, sample by sample: "
          f"{sum(map(len, diffs.values()))} shared samples in {len(diffs)} steps")
    print(f"{'steps':>9} {'samples':>7} {'a - b':>7} {'± se':>7}")
    for blk in blocks(diffs, args.block):
        print(f"{blk['steps']:>9} {blk['samples']:>7} {blk['mean']:+7.3f} {blk['se']:7.3f}")


if __name__ == "__main__":
    main()
