"""What decides a training sample's ShapesEval reward: its initial noise or the SDE's noise?

    python -m studies.variance --config configs/repro_shapes.yaml --per-tag 2 \
        --out docs/results/variance_train.json

A policy-gradient step can only credit what the policy's own steps decide. Flow-GRPO's
log-probs cover the stochastic denoising steps, not the initial noise ``x_T``: if the
reward were fixed by ``x_T``, the group's advantages would be noise to the gradient. This
diagnostic samples ``inits`` initial latents per prompt and ``paths`` SDE noise paths from
each (the training sampler of ``--config``: steps, CFG, noise level, shift) and splits the
variance of ShapesEval partial credit over the ``inits x paths`` images of a prompt:

    share within = mean over inits of Var_paths(r) / Var_all(r)

near 1: the SDE steps decide the reward (the policy has levers); near 0: ``x_T`` does.
No training; base model (plus ``--lora``, fused, if given).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from learner.config import Config, load_config
from policy.pipeline import build_pipeline, load_fused_lora
from policy.sampler import (
    SamplerSpec,
    decode_images,
    denoise_step,
    encode_prompts,
    sample_noise,
    sd3_sigmas,
)
from shapes.evaluate import ShapesEval
from shapes.world import TAGS, load_split


def within_share(rewards: np.ndarray) -> float | None:
    """Share of the variance of ``rewards [inits, paths]`` that is within an init.

    None when every image scored the same (no variance to split).
    """
    total = rewards.var()
    return float(rewards.var(axis=1).mean() / total) if total > 0 else None


@torch.no_grad()
def sample_grid(pipe, spec: SamplerSpec, row: dict, inits: int, paths: int, seed: int,
                max_sequence_length: int) -> np.ndarray:
    """``inits x paths`` images of one prompt: ``paths`` SDE noise paths from each init."""
    n = inits * paths
    cond = encode_prompts(pipe, [row["prompt"]] * n, max_sequence_length)
    negative = (encode_prompts(pipe, [""], max_sequence_length)
                if spec.guidance_scale != 1.0 else None)
    config = pipe.transformer.config
    shape = (spec.num_steps + 1, config.in_channels, config.sample_size, config.sample_size)
    noise = sample_noise(torch.arange(n, dtype=torch.int64) + seed * 1_000_003, shape)
    x = noise[::paths, 0].repeat_interleave(paths, 0)  # one x_T per init, shared by its paths
    sigmas = sd3_sigmas(spec.num_steps, spec.shift)
    for j in range(spec.num_steps):
        x, _, _, _ = denoise_step(pipe.transformer, x, j, sigmas, cond, negative, spec,
                                  noise=noise[:, j + 1])
    return decode_images(pipe, x)


def decompose(cfg: Config, split: str, per_tag: int, inits: int, paths: int, seed: int,
              lora: Path | None = None) -> dict:
    """Per prompt and per tag: mean partial credit, strict rate, and the within-init shares."""
    pipe = build_pipeline(cfg.model.path, num_threads=cfg.model.num_threads)
    if lora is not None:
        load_fused_lora(pipe, lora)
    spec = cfg.sampler.spec()  # the training sampler
    rows = load_split(split)
    picked = [r for tag in TAGS for r in [r for r in rows if r["tag"] == tag][:per_tag]]
    grader = ShapesEval()
    prompts = []
    for row in picked:
        images = sample_grid(pipe, spec, row, inits, paths, seed, cfg.model.max_sequence_length)
        scores = grader(images, [row] * len(images))
        partial = scores.partial.reshape(inits, paths)
        strict = scores.strict.reshape(inits, paths).astype(np.float64)
        prompts.append({"tag": row["tag"], "prompt": row["prompt"],
                        "partial": float(partial.mean()), "strict": float(strict.mean()),
                        "share_within_partial": within_share(partial),
                        "share_within_strict": within_share(strict)})
    by_tag = {}
    for tag in TAGS:
        shares = [p["share_within_partial"] for p in prompts
                  if p["tag"] == tag and p["share_within_partial"] is not None]
        if shares:
            by_tag[tag] = float(np.median(shares))
    shares = [p["share_within_partial"] for p in prompts if p["share_within_partial"] is not None]
    return {"split": split, "inits": inits, "paths": paths, "seed": seed,
            "sampler": asdict(spec), "prompts": prompts,
            "median_share_within_partial": float(np.median(shares)) if shares else None,
            "median_share_within_partial_by_tag": by_tag}


def format_report(report: dict) -> str:
    lines = [f"{report['split']}: {report['inits']} initial noises x {report['paths']} SDE paths "
             f"per prompt; noise level {report['sampler']['noise_level']}",
             f"{'tag':>12} {'prompt':42} {'partial':>7} {'strict':>6} {'within(p)':>9} "
             f"{'within(s)':>9}"]
    def share(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    for p in report["prompts"]:
        lines.append(f"{p['tag']:>12} {p['prompt'][:42]:42} {p['partial']:7.3f} {p['strict']:6.3f} "
                     f"{share(p['share_within_partial']):>9} {share(p['share_within_strict']):>9}")
    lines.append("median share of partial-credit variance within an initial noise: "
                 + share(report["median_share_within_partial"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/repro_shapes.yaml"),
                        help="preset whose model and training sampler are used")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override of the preset, e.g. sampler.noise_level=0.3")
    parser.add_argument("--split", default="train", choices=["train", "test", "unseen"])
    parser.add_argument("--per-tag", type=int, default=2, help="prompts per tag")
    parser.add_argument("--inits", type=int, default=8, help="initial noises per prompt")
    parser.add_argument("--paths", type=int, default=8, help="SDE noise paths per initial noise")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lora", type=Path, help="a run's lora/ to load (fused) on the base")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    args = parser.parse_args(argv)
    if min(args.per_tag, args.inits, args.paths) < 1 or args.paths < 2:
        raise SystemExit("--per-tag and --inits must be >= 1 and --paths >= 2")
    cfg = load_config(args.config, args.set)
    report = decompose(cfg, args.split, args.per_tag, args.inits, args.paths, args.seed, args.lora)
    print(format_report(report))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
