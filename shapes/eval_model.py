"""Evaluate a text-to-image model on a shapes-world split with ShapesEval.

    python -m shapes.eval_model --model models/tiny-shapes-sd3 --split test \\
        --per-prompt 4 --out reports/base [--lora RUN_DIR/lora]

Generates ``per-prompt`` images for every prompt of the split with the deterministic
ODE sampler (``--steps`` steps, CFG ``--cfg``), grades them, prints a per-tag table and
GenEval's overall score (the mean over tags), and writes ``report.json`` and
``grid.png`` (one sample per prompt, its verdict and prompt underneath). Image ``i`` of
prompt ``p`` starts from the noise of ``policy.sampler.eval_seed(seed, p, i)``, so two
models evaluated with the same seed start from the same noise.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from policy.grid import prompt_lines, save_grid
from policy.pipeline import build_pipeline, load_fused_lora, t5_overflow
from policy.sampler import (
    SamplerSpec,
    decode_images,
    encode_prompts,
    eval_seed,
    sample_rollout,
)
from shapes.evaluate import ShapesEval, ShapesScores, summarize
from shapes.world import TAGS, load_split

GREEN, RED = (0, 160, 0), (200, 0, 0)  # grid frames: correct / wrong


@dataclass
class Evaluation:
    images: np.ndarray  # uint8 [N, H, W, 3]
    metadata: list[dict]  # one row per image
    scores: ShapesScores
    summary: dict[str, float]


def generate(pipe, rows: list[dict], per_prompt: int, spec: SamplerSpec, seed: int,
             max_sequence_length: int = 8, batch: int = 32) -> tuple[np.ndarray, list[dict]]:
    """``per_prompt`` images of every row, in batches of ``batch`` images."""
    jobs = [(p, i) for p in range(len(rows)) for i in range(per_prompt)]
    negative = encode_prompts(pipe, [""], max_sequence_length)
    images = []
    for start in range(0, len(jobs), batch):
        chunk = jobs[start:start + batch]
        prompts = [rows[p]["prompt"] for p, _ in chunk]
        seeds = torch.tensor([eval_seed(seed, p, i) for p, i in chunk])
        rollout = sample_rollout(pipe, prompts, seeds, spec, negative=negative,
                                 max_sequence_length=max_sequence_length)
        images.append(decode_images(pipe, rollout.final))
    return np.concatenate(images), [rows[p] for p, _ in jobs]


def evaluate(pipe, rows: list[dict], per_prompt: int = 4, steps: int = 40, cfg: float = 4.5,
             seed: int = 0, max_sequence_length: int = 8) -> Evaluation:
    spec = SamplerSpec(num_steps=steps, guidance_scale=cfg, noise_level=0.0)
    images, metadata = generate(pipe, rows, per_prompt, spec, seed, max_sequence_length)
    scores = ShapesEval()(images, metadata)
    return Evaluation(images, metadata, scores, summarize(scores, metadata))


def format_table(summary: dict[str, float], title: str = "") -> str:
    lines = [title] if title else []
    lines += [f"  {tag:<14} {summary[tag]:6.3f}" for tag in TAGS if tag in summary]
    lines.append(f"  {'overall':<14} {summary['overall']:6.3f}")
    lines.append(f"  {'partial':<14} {summary['partial']:6.3f}")
    return "\n".join(lines)


def paired_gain(report: dict, base: dict) -> dict[str, tuple[float, float]]:
    """Strict accuracy of ``report`` minus ``base``, image by image (same split, images per
    prompt, sampler and seed: the same starting noise), as ``{tag: (gain, standard error)}``
    and ``overall``: GenEval's mean over tags, its error from the tags' errors."""
    keys = ("split", "per_prompt", "steps", "cfg", "seed")
    if any(report[k] != base[k] for k in keys) or len(report["images"]) != len(base["images"]):
        raise ValueError("reports to pair must share " + ", ".join(keys) + ": got "
                         + str({k: (report[k], base[k]) for k in keys if report[k] != base[k]}))
    diffs: dict[str, list[float]] = {}
    for a, b in zip(report["images"], base["images"], strict=True):
        if a["prompt"] != b["prompt"]:
            raise ValueError(f"image order differs: {a['prompt']!r} vs {b['prompt']!r}")
        diffs.setdefault(a["tag"], []).append(float(a["strict"]) - float(b["strict"]))
    out = {}
    for tag in [t for t in TAGS if t in diffs]:
        d = np.array(diffs[tag])
        out[tag] = (float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0)
    out["overall"] = (float(np.mean([m for m, _ in out.values()])),
                      float(np.sqrt(sum(e * e for _, e in out.values())) / len(out)))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Evaluate a model with ShapesEval.")
    parser.add_argument("--model", default="models/tiny-shapes-sd3", help="diffusers dir, or tiny-random")
    parser.add_argument("--lora", help="LoRA directory to load on top (a run's lora/)")
    parser.add_argument("--split", default="test", choices=["train", "test", "unseen"])
    parser.add_argument("--per-prompt", type=int, default=4, help="images per prompt")
    parser.add_argument("--steps", type=int, default=40, help="ODE sampling steps")
    parser.add_argument("--cfg", type=float, default=4.5, help="CFG scale")
    parser.add_argument("--seed", type=int, default=0, help="seed of the evaluation noise")
    parser.add_argument("--out", type=Path, help="directory for report.json and grid.png")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--max-sequence-length", type=int, default=8, metavar="N",
                        help="T5 slots of the text sequence, as the run's model.max_sequence_length")
    parser.add_argument("--paired-with", type=Path, metavar="REPORT",
                        help="another model's report.json of the same split and seed: print "
                        "the strict gain over it, image by image, with standard errors")
    args = parser.parse_args(argv)
    base = json.loads(args.paired_with.read_text()) if args.paired_with else None

    pipe = build_pipeline(args.model, num_threads=args.threads)
    if args.lora:
        load_fused_lora(pipe, args.lora)
    rows = load_split(args.split)
    over = t5_overflow(pipe.tokenizer_3, [r["prompt"] for r in rows], args.max_sequence_length)
    if over is not None:
        parser.error(f"--max-sequence-length {args.max_sequence_length} cuts {over.count} "
                     f"prompt(s) short in the T5 encoder (the longest, {over.longest!r}, is "
                     f"{over.tokens} tokens); pass --max-sequence-length {over.tokens} or more")
    started = time.perf_counter()
    ev = evaluate(pipe, rows, args.per_prompt, args.steps, args.cfg, args.seed,
                  args.max_sequence_length)
    seconds = time.perf_counter() - started
    print(format_table(ev.summary, f"ShapesEval, {args.split} split, {len(rows)} prompts x "
                       f"{args.per_prompt} images, {args.steps} steps, CFG {args.cfg}:"))
    print(f"  ({len(ev.images)} images in {seconds:.0f} s)")
    report = {"model": args.model, "lora": args.lora, "split": args.split,
              "max_sequence_length": args.max_sequence_length, "per_prompt": args.per_prompt, "steps": args.steps, "cfg": args.cfg,
              "seed": args.seed, "seconds": round(seconds, 1), "summary": ev.summary,
              "images": [{"prompt": m["prompt"], "tag": m["tag"], "strict": bool(s),
                          "partial": float(p), "failures": d.failures}
                         for m, s, p, d in zip(ev.metadata, ev.scores.strict, ev.scores.partial,
                                               ev.scores.details, strict=True)]}
    if base is not None:
        gain = paired_gain(report, base)
        report["paired_with"] = {"report": str(args.paired_with),
                                 "gain": {k: list(v) for k, v in gain.items()}}
        print(f"strict gain over {args.paired_with} (paired image by image):")
        for tag, (g, e) in gain.items():
            print(f"  {tag:<14} {g:+.3f} ± {e:.3f}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.json").write_text(json.dumps(report, indent=1))
        first = np.arange(0, len(ev.images), args.per_prompt)  # one image per prompt
        save_grid(args.out / "grid.png", ev.images[first],
                  [prompt_lines(ev.metadata[i]["prompt"]) for i in first],
                  [GREEN if ok else RED for ok in ev.scores.strict[first]])
        print(f"  wrote {args.out / 'report.json'} and {args.out / 'grid.png'}")


if __name__ == "__main__":
    main()
