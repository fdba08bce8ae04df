"""How much of an update is signal? The cosine between two independent gradients.

    python -m studies.gradnoise --config configs/learn_colorful.yaml \\
        --sizes 2x8 4x8 8x8 8x16 [--pairs 2] [--out docs/curves/gradnoise_colorful.json]

For each size ``PxG`` (prompts x samples per prompt), two batches of the *same* P
prompts are sampled with independent noise, scored with the configuration's rewards and
turned into the first-step Flow-GRPO gradient of the fresh LoRA (``learner.update``, as
the sequential loop computes it). If the gradient were all signal the two would point
the same way (cosine 1); if all noise, they would be orthogonal (cosine ~0). For an
estimate ``g = s + n_i`` with independent noise, ``cos ~ |s|^2 / (|s|^2 + |n|^2)``, the
share of the update's squared length that is signal; it should grow ~linearly in the
samples per step while noise dominates.

Prompts are drawn by the configuration's cursor (seed, ``train.prompt_mix``); the first
batch uses sample seeds of step 0, the second of step 1. One process, no Ray.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from learner.config import SC, Config, load_config
from learner.grpo import combine_advantages
from learner.prompts import PromptCursor, load_prompts, select_tags
from learner.sequential import build_scorers, sample_step, score_step
from learner.update import accumulate_grpo_gradients
from policy.logprob import trained_steps
from policy.pipeline import add_lora, build_pipeline
from policy.sampler import encode_prompts


class FixedPrompts:
    """A cursor that hands out the same prompts every time."""

    def __init__(self, picked: list[tuple[int, dict]]) -> None:
        self.picked = picked

    def take(self, n: int, step: int = 0) -> list[tuple[int, dict]]:
        assert n == len(self.picked)
        return self.picked


def gradient(pipe, cfg: Config, params, cursor, step: int, negative, scorers, rows) -> torch.Tensor:
    """The flat first-step LoRA gradient of one batch (zero if every group is flat)."""
    batch = sample_step(pipe, cfg, cursor, step, negative)
    rewards = score_step(pipe, cfg, batch, negative, scorers, rows)
    weights = ({SC: cfg.self_confidence.weight} if cfg.self_confidence.enabled else {}) | {
        e.name: e.weight for e in cfg.external_rewards}
    adv = combine_advantages(rewards, weights, batch.group_ids, cfg.grpo.combine,
                             cfg.grpo.std_mode, cfg.grpo.adv_clip, cfg.grpo.adv_eps)
    for p in params:
        p.grad = None
    keep = adv.keep.nonzero().flatten()
    if len(keep):
        accumulate_grpo_gradients(pipe.transformer, batch.rollout, batch.cond, negative,
                                  adv.values, keep, trained_steps(batch.rollout,
                                                                  cfg.grpo.train_fraction),
                                  cfg.grpo, torch.Tensor.backward, global_count=len(keep))
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                      for p in params])


def measure(cfg: Config, sizes: list[tuple[int, int]], pairs: int) -> list[dict]:
    pipe = build_pipeline(cfg.model.path, cfg.model.dtype, cfg.model.device, cfg.model.num_threads)
    names = add_lora(pipe.transformer, cfg.lora.spec(cfg.seed))
    named = dict(pipe.transformer.named_parameters())
    params = [named[n] for n in names]
    rows = select_tags(load_prompts(cfg.train.prompts), cfg.train.tags, cfg.train.prompts)
    negative = encode_prompts(pipe, [""], cfg.model.max_sequence_length)
    scorers = build_scorers(cfg)
    cursor = PromptCursor(rows, cfg.seed, mix=cfg.train.prompt_mix)
    out = []
    for prompts, group in sizes:
        sized = cfg.model_copy(update={"grpo": cfg.grpo.model_copy(
            update={"prompts_per_step": prompts, "group_size": group})})
        cosines = []
        for pair in range(pairs):
            fixed = FixedPrompts(cursor.take(prompts))
            a = gradient(pipe, sized, params, fixed, 2 * pair, negative, scorers, rows)
            b = gradient(pipe, sized, params, fixed, 2 * pair + 1, negative, scorers, rows)
            cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
            cosines.append(cos)
            print(f"[gradnoise] {prompts}x{group} = {prompts * group} samples, pair {pair}: "
                  f"cosine {cos:+.3f}", flush=True)
        out.append({"prompts": prompts, "group_size": group, "samples": prompts * group,
                    "cosines": cosines, "mean": sum(cosines) / len(cosines)})
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--sizes", nargs="+", default=["2x8", "4x8", "8x8", "8x16"],
                        help="PxG: prompts x samples per prompt")
    parser.add_argument("--pairs", type=int, default=2, help="independent pairs per size")
    parser.add_argument("--out", type=Path, help="JSON file for the results")
    args = parser.parse_args(argv)
    try:
        sizes = [tuple(int(x) for x in s.lower().split("x")) for s in args.sizes]
    except ValueError:
        raise SystemExit(f"--sizes: write each as PxG, e.g. 4x8; got {args.sizes}") from None
    cfg = load_config(args.config, args.overrides)
    torch.manual_seed(cfg.seed)
    results = measure(cfg, sizes, args.pairs)
    print(f"{'samples':>8} {'P x G':>7} {'cosine':>8}")
    for r in results:
        print(f"{r['samples']:>8} {r['prompts']:>3}x{r['group_size']:<3} {r['mean']:+8.3f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"argv": argv, "results": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
