"""Does self-confidence rank correct images above incorrect ones? A check without training.

    python -m studies.diagnose --config configs/tiny_solace.yaml --split test \\
        --per-prompt 8 --out docs/results/auroc.json

Samples ``per-prompt`` images of every prompt of a shapes-world split with the run's own
sampler (the config's SDE sampler, as rollouts are drawn in training), scores each with
SOLACE self-confidence (the config's K, window, delta; both aggregations) using the
base model, grades each with ShapesEval, and reports per tag the AUROC of the reward
against strict correctness:

* ``pooled``: over every (correct, incorrect) pair of the tag;
* ``within_prompt``: over pairs drawn by the same prompt only. GRPO normalises rewards
  within a prompt's group, so this is the ranking that steers training.

0.5 is chance; ties count half (Mann-Whitney). A tag with no correct or no incorrect
image has no AUROC (null).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from learner.config import Config, load_config
from policy.pipeline import build_pipeline
from policy.sampler import (
    decode_images,
    derive_seed,
    encode_prompts,
    sample_rollout,
    suffix_window,
)
from rewards.self_confidence import aggregate, score_rollout
from shapes.evaluate import ShapesEval
from shapes.world import TAGS, load_split

DIAGNOSE_STREAM = 3  # seed stream of the diagnostic's samples (0-2: sampling, probes, eval)
AGGREGATIONS = ("paper", "official")


def auroc(scores: np.ndarray, positive: np.ndarray, groups: np.ndarray | None = None
          ) -> float | None:
    """P(score of a positive > score of a negative), ties half; pairs within a group only
    when ``groups`` is given. None without a single (positive, negative) pair."""
    wins = pairs = 0.0
    keys = np.zeros(len(scores), int) if groups is None else groups
    for g in np.unique(keys):
        s, y = scores[keys == g], positive[keys == g]
        pos, neg = s[y], s[~y]
        if len(pos) and len(neg):
            diff = pos[:, None] - neg[None, :]
            wins += (diff > 0).sum() + 0.5 * (diff == 0).sum()
            pairs += diff.size
    return float(wins / pairs) if pairs else None


def sample_and_score(cfg: Config, rows: list[dict], per_prompt: int, batch_prompts: int = 4
                     ) -> dict[str, np.ndarray]:
    """Images, per-aggregation rewards and prompt ids of ``per_prompt`` samples per row."""
    m, sc = cfg.model, cfg.self_confidence
    pipe = build_pipeline(m.path, m.dtype, m.device, num_threads=0)
    spec = cfg.sampler.spec()
    negative = encode_prompts(pipe, [""], m.max_sequence_length)
    images, ids = [], []
    rewards: dict[str, list[np.ndarray]] = {a: [] for a in AGGREGATIONS}
    for start in range(0, len(rows), batch_prompts):
        chunk = range(start, min(start + batch_prompts, len(rows)))
        pids = torch.tensor([p for p in chunk for _ in range(per_prompt)])
        seeds = torch.tensor([derive_seed(cfg.seed, DIAGNOSE_STREAM, p, i)
                              for p in chunk for i in range(per_prompt)])
        prompts = [rows[p]["prompt"] for p in pids.tolist()]
        with torch.no_grad():
            rollout = sample_rollout(pipe, prompts, seeds, spec, prompt_ids=pids,
                                     negative=negative, max_sequence_length=m.max_sequence_length)
            cond = encode_prompts(pipe, prompts, m.max_sequence_length)
            reward, per_step = score_rollout(pipe.transformer, rollout, cond, cfg.seed,
                                             sc.num_probes, sc.probe_fraction, sc.delta, "paper")
            # the same probes, aggregated the official way (z-scored within each group)
            start, stop = suffix_window(spec.num_steps - 1, sc.probe_fraction)
            official = aggregate(per_step, rollout.sigmas[start:stop], "official", pids)
        rewards["paper"].append(reward.float().numpy())
        rewards["official"].append(official.float().numpy())
        images.append(decode_images(pipe, rollout.final))
        ids.append(pids.numpy())
    out = {agg: np.concatenate(r) for agg, r in rewards.items()}
    out["images"], out["prompt_ids"] = np.concatenate(images), np.concatenate(ids)
    return out


def diagnose(cfg: Config, split: str, per_prompt: int, limit: int | None = None) -> dict:
    """The report: per tag, counts and AUROCs of each aggregation (first ``limit`` prompts)."""
    rows = load_split(split)[:limit]
    data = sample_and_score(cfg, rows, per_prompt)
    metadata = [rows[p] for p in data["prompt_ids"]]
    strict = ShapesEval()(data["images"], metadata).strict
    tags = np.array([m["tag"] for m in metadata])
    report: dict = {"split": split, "per_prompt": per_prompt, "model": cfg.model.path,
                    "sampler": cfg.sampler.model_dump(), "self_confidence": cfg.self_confidence
                    .model_dump(), "seed": cfg.seed, "tags": {}}
    for tag in [*TAGS, "all"]:
        sel = tags == tag if tag != "all" else np.ones(len(tags), bool)
        if not sel.any():
            continue
        entry = {"images": int(sel.sum()), "correct": int(strict[sel].sum())}
        for agg in AGGREGATIONS:
            r = data[agg][sel]
            entry[agg] = {
                "pooled": auroc(r, strict[sel]),
                "within_prompt": auroc(r, strict[sel], data["prompt_ids"][sel]),
                "mean_correct": float(r[strict[sel]].mean()) if strict[sel].any() else None,
                "mean_incorrect": float(r[~strict[sel]].mean()) if (~strict[sel]).any() else None,
            }
        report["tags"][tag] = entry
    return report


def format_report(report: dict) -> str:
    def f(x: float | None) -> str:
        return "  n/a" if x is None else f"{x:5.3f}"

    lines = [f"Self-confidence AUROC vs ShapesEval strict correctness ({report['split']} split, "
             f"{report['per_prompt']} samples per prompt)",
             f"  {'tag':<14} {'images':>6} {'correct':>7}   " + "   ".join(
                 f"{a} pooled / within" for a in AGGREGATIONS)]
    for tag, e in report["tags"].items():
        cells = "   ".join(f"{f(e[a]['pooled'])} / {f(e[a]['within_prompt'])}      "
                           for a in AGGREGATIONS)
        lines.append(f"  {tag:<14} {e['images']:>6} {e['correct']:>7}   {cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/tiny_solace.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. self_confidence.num_probes=16")
    parser.add_argument("--split", default="test", choices=["train", "test", "unseen"])
    parser.add_argument("--per-prompt", type=int, default=8, help="samples per prompt")
    parser.add_argument("--limit", type=int, help="only the first N prompts (a quick look)")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.set)
    started = time.perf_counter()
    report = diagnose(cfg, args.split, args.per_prompt, args.limit)
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(format_report(report))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
