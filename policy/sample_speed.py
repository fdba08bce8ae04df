"""How fast a model samples: ``python -m policy.sample_speed [--model DIR] [--repeats 7]``.

Times ``batch`` images at ``steps`` SDE steps with CFG (a transformer forward of 2 x batch
per step) plus prompt encoding and VAE decoding, as a rollout actor does; prints the
median and the spread of ``repeats`` runs after one warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from policy.pipeline import build_pipeline
from policy.sampler import SamplerSpec, decode_images, sample_rollout


def time_sampling(pipe, batch: int, steps: int, cfg: float, repeats: int) -> list[float]:
    prompts = ["a photo of two red squares"] * batch
    spec = SamplerSpec(num_steps=steps, guidance_scale=cfg)
    times = []
    for r in range(repeats + 1):
        seeds = torch.arange(batch) + 1000 * r
        t0 = time.perf_counter()
        rollout = sample_rollout(pipe, prompts, seeds, spec, max_sequence_length=8)
        decode_images(pipe, rollout.final)
        times.append(time.perf_counter() - t0)
    return times[1:]  # the first run warms up allocators and kernels


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/tiny-shapes-sd3")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cfg", type=float, default=4.5)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    pipe = build_pipeline(args.model, num_threads=args.threads)
    times = time_sampling(pipe, args.batch, args.steps, args.cfg, args.repeats)
    print(f"{args.batch} images, {args.steps} steps, CFG {args.cfg}, {args.threads} threads: "
          f"median {statistics.median(times):.3f} s, min {min(times):.3f} s, "
          f"max {max(times):.3f} s over {len(times)} runs")


if __name__ == "__main__":
    main()
