"""Screen a recipe in one process: the sequential Flow-GRPO loop with paired ShapesEval.

    python -m studies.screen --config configs/learn_shapes.yaml --steps 150 \\
        --eval-every 50 --out runs/screens/early_window --set grpo.lr=1e-3 ...

A cheaper look than ``studies.curve`` (no Ray, no controls) at whether a recipe learns
what it trains on and whether that carries over: it trains with ``learner.sequential``'s
step functions and, before the first step and every ``--eval-every`` steps, evaluates
the policy with the ODE sampler from fixed noise (``shapes.eval_model``) on two prompt
sets, graded by ShapesEval:

* ``train``: the training prompts themselves (``train.prompts`` and ``train.tags``; the
  first 60 rows that are not color_attr when there are more), ``--train-per-prompt``
  images each: is the recipe learning at all?
* ``test``: the held-out test split, ``--test-per-prompt`` images each: does it carry over?

Each evaluation is paired image by image with the first (same noise), so a line reads
``strict 0.372 (+0.024 ± 0.033)``: GenEval's overall (the mean over tags) and its paired
gain with the standard error. It writes ``evals.jsonl`` (every image's grades),
``metrics.jsonl`` (the training reward per step) and ``summary.json`` in ``--out``.

What it does not show: drift. A recipe that screens well is then measured with
``studies.curve`` (the service, a frozen and a random-reward control, more images).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from learner.config import Config, load_config
from learner.evaluation import standard_error
from learner.grpo import combine_advantages, group_spreads, shuffle_within_groups
from learner.prompts import PromptCursor, load_prompts, select_tags
from learner.sequential import build_scorers, sample_step, score_step, update_step
from policy.pipeline import add_lora, build_pipeline
from policy.sampler import SHUFFLE_STREAM, derive_seed, encode_prompts
from shapes.eval_model import evaluate
from shapes.world import load_split

MAX_TRAIN_ROWS = 60  # training prompts evaluated; the shapes train split's color_attr has 202


def eval_sets(rows: list[dict], train_per_prompt: int, test_per_prompt: int
              ) -> dict[str, tuple[list[dict], int]]:
    """``{name: (rows, images per prompt)}`` of the two evaluation sets."""
    train = rows if len(rows) <= MAX_TRAIN_ROWS else [
        r for r in rows if r.get("tag") != "color_attr"][:MAX_TRAIN_ROWS]
    return {"train": (train, train_per_prompt), "test": (load_split("test"), test_per_prompt)}


def paired(now: dict, first: dict, key: str) -> tuple[float, float]:
    """Paired gain of ``key`` over the first evaluation; strict as GenEval's mean over tags."""
    d = np.array(now[key], dtype=float) - np.array(first[key], dtype=float)
    if key != "strict":
        return float(d.mean()), standard_error(d)
    tags = np.array(now["tags"])
    by_tag = [d[tags == t] for t in sorted(set(now["tags"]))]
    se = np.sqrt(sum(standard_error(x) ** 2 for x in by_tag if len(x) > 1)) / len(by_tag)
    return float(np.mean([x.mean() for x in by_tag])), float(se)


def run_evals(pipe, cfg: Config, sets: dict, step: int) -> dict:
    """Every evaluation set's per-image grades at this point of training."""
    out = {"step": step}
    for name, (rows, per_prompt) in sets.items():
        with torch.no_grad():
            ev = evaluate(pipe, rows, per_prompt, cfg.sampler.eval_num_steps,
                          cfg.sampler.guidance_scale, cfg.eval.seed,
                          cfg.model.max_sequence_length)
        out[name] = {"strict": ev.scores.strict.astype(int).tolist(),
                     "partial": ev.scores.partial.tolist(),
                     "tags": [m["tag"] for m in ev.metadata], "summary": ev.summary}
    return out


def describe(now: dict, first: dict) -> str:
    parts = []
    for name in ("train", "test"):
        s, s_se = paired(now[name], first[name], "strict")
        p, p_se = paired(now[name], first[name], "partial")
        parts.append(f"{name}: strict {now[name]['summary']['overall']:.3f} ({s:+.3f} ± {s_se:.3f})"
                     f" partial {np.mean(now[name]['partial']):.3f} ({p:+.3f} ± {p_se:.3f})")
    return "  ".join(parts)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML preset of the recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="dotted override (repeatable)")
    parser.add_argument("--steps", type=int, required=True, help="training steps")
    parser.add_argument("--eval-every", type=int, default=50, help="steps between evaluations")
    parser.add_argument("--train-per-prompt", type=int, default=4,
                        help="images per training prompt in each evaluation")
    parser.add_argument("--test-per-prompt", type=int, default=2,
                        help="images per held-out test prompt in each evaluation")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, [*args.overrides, f"model.num_threads={args.threads}",
                                    f"train.steps={args.steps}"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "config.json").write_text(json.dumps(
        {"argv": argv, "config": cfg.model_dump(mode="json")}, indent=1))

    torch.manual_seed(cfg.seed)
    pipe = build_pipeline(cfg.model.path, cfg.model.dtype, cfg.model.device, args.threads)
    names = add_lora(pipe.transformer, cfg.lora.spec(cfg.seed))
    named = dict(pipe.transformer.named_parameters())
    params = [named[n] for n in names]
    optimizer = torch.optim.AdamW(params, lr=cfg.grpo.lr, weight_decay=cfg.grpo.weight_decay)
    rows = select_tags(load_prompts(cfg.train.prompts), cfg.train.tags, cfg.train.prompts)
    cursor = PromptCursor(rows, cfg.seed, mix=cfg.train.prompt_mix, floor=cfg.train.spread_floor)
    negative = encode_prompts(pipe, [""], cfg.model.max_sequence_length)
    scorers = build_scorers(cfg)
    weights = {e.name: e.weight for e in cfg.external_rewards}
    sets = eval_sets(rows, args.train_per_prompt, args.test_per_prompt)

    evals = [run_evals(pipe, cfg, sets, 0)]
    print(f"[screen] step 0  {describe(evals[0], evals[0])}", flush=True)
    train_s = 0.0
    with open(args.out / "metrics.jsonl", "w") as log:
        for step in range(args.steps):
            t0 = time.perf_counter()
            batch = sample_step(pipe, cfg, cursor, step, negative)
            rewards = score_step(pipe, cfg, batch, negative, scorers, rows)
            trained_on = rewards
            if cfg.grpo.shuffle_rewards:
                trained_on = shuffle_within_groups(rewards, batch.group_ids,
                                                   derive_seed(cfg.seed, SHUFFLE_STREAM, step))
            adv = combine_advantages(trained_on, weights, batch.group_ids, cfg.grpo.combine,
                                     cfg.grpo.std_mode, cfg.grpo.adv_clip, cfg.grpo.adv_eps)
            if adv.keep.any():
                update_step(pipe, cfg, batch, adv, negative, optimizer, params)
            cursor.observe(step, zip(batch.rollout.prompt_ids[::cfg.grpo.group_size].tolist(),
                                     group_spreads(adv.values, batch.group_ids).tolist(),
                                     strict=True))
            train_s += time.perf_counter() - t0
            log.write(json.dumps({"step": step, "train_s": train_s} | {
                f"reward/{k}": float(v.mean()) for k, v in rewards.items()}) + "\n")
            log.flush()
            if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                evals.append(run_evals(pipe, cfg, sets, step + 1))
                print(f"[screen] step {step + 1}  {describe(evals[-1], evals[0])}  "
                      f"({train_s / 60:.1f} min of training)", flush=True)
    with open(args.out / "evals.jsonl", "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in evals)
    summary = {"train_minutes": train_s / 60, "steps": args.steps, "evals": [
        {"step": e["step"]} | {f"{name}/{key}": paired(e[name], evals[0][name], key)
                               for name in sets for key in ("strict", "partial")}
        for e in evals]}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
