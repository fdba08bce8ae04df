"""Best-of-N with self-confidence as the verifier, in this process or over Ray actors.

    python -m actors.verify --model models/tiny-shapes-sd3 --n 8 --prompts prompts.txt \\
        --out best/ [--lora RUN_DIR/lora] [--actors 4 --num-gpus 1 --address auto]

``--actors 0`` (the default) runs :func:`rewards.verifier.best_of_n` here. ``--actors K``
starts ``K`` :class:`VerifierWorker` actors (each a pipeline with the LoRA fused in,
``--num-cpus``/``--num-gpus`` each) on a local Ray instance or the cluster at
``--address``, deals the prompts out round-robin and puts the answers back in prompt
order. Candidates are seeded by prompt index, so the images and scores are the same
however many actors there are (a test checks it). Writes ``best.png`` (the chosen image
of each prompt) and ``scores.jsonl`` (every candidate's seed and score, the choice).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from policy.pipeline import build_pipeline, load_fused_lora
from policy.sampler import SamplerSpec
from rewards.verifier import BestOfN, VerifierSpec, best_of_n, check_settings


class VerifierWorker:
    """A frozen pipeline (with a fused LoRA) that answers best-of-N calls; plain class,
    made an actor with ``ray.remote`` by :func:`verify_on_ray`."""

    def __init__(self, model_path: str, lora: str | None = None, dtype: str = "float32",
                 device: str = "cpu", num_threads: int = 0) -> None:
        self.pipe = build_pipeline(model_path, dtype, device, num_threads)
        if lora:
            load_fused_lora(self.pipe, lora)

    def best_of_n(self, prompts: list[str], prompt_ids: list[int], n: int, spec: SamplerSpec,
                  verifier: VerifierSpec, seed: int, max_sequence_length: int,
                  early_step: int | None, keep: int | None) -> BestOfN:
        return best_of_n(self.pipe, prompts, n, spec, verifier, seed=seed,
                         prompt_ids=prompt_ids, max_sequence_length=max_sequence_length,
                         early_step=early_step, keep=keep)


def merge(parts: list[tuple[list[int], BestOfN]], total: int) -> BestOfN:
    """Answers for shards of prompt indices, back in prompt order."""
    order = np.argsort(np.concatenate([np.asarray(ids) for ids, _ in parts]))
    if len(order) != total:
        raise RuntimeError(f"{len(order)} answers for {total} prompts")

    def cat(name):
        return np.concatenate([getattr(out, name) for _, out in parts])[order]

    early = None if parts[0][1].early is None else cat("early")
    return BestOfN(images=cat("images"), chosen=cat("chosen"), scores=cat("scores"),
                   early=early, seeds=cat("seeds"), forwards=parts[0][1].forwards)


def verify_on_ray(prompts: list[str], n: int, spec: SamplerSpec, verifier: VerifierSpec, *,
                  model_path: str, lora: str | None = None, actors: int = 2,
                  num_cpus: float = 1, num_gpus: float = 0, device: str = "cpu",
                  dtype: str = "float32", seed: int = 0, max_sequence_length: int = 8,
                  early_step: int | None = None, keep: int | None = None) -> BestOfN:
    """:func:`rewards.verifier.best_of_n` over ``actors`` Ray actors (Ray must be up)."""
    import ray

    if actors < 1:
        raise ValueError(f"actors must be >= 1, got {actors}")
    shards = [list(range(i, len(prompts), actors)) for i in range(min(actors, len(prompts)))]
    cls = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(VerifierWorker)
    workers = [cls.remote(model_path, lora, dtype, device, max(1, int(num_cpus)))
               for _ in shards]
    try:
        refs = [w.best_of_n.remote([prompts[i] for i in ids], ids, n, spec, verifier, seed,
                                   max_sequence_length, early_step, keep)
                for w, ids in zip(workers, shards, strict=True)]
        parts = list(zip(shards, ray.get(refs), strict=True))
    finally:
        for w in workers:
            ray.kill(w)
    return merge(parts, len(prompts))


def main(argv: list[str] | None = None) -> None:
    from policy.grid import prompt_lines, save_grid

    parser = argparse.ArgumentParser(description="Best-of-N sampling with self-confidence as "
                                     "the verifier.")
    parser.add_argument("--model", default="models/tiny-shapes-sd3", help="diffusers dir, or tiny-random")
    parser.add_argument("--lora", help="LoRA directory to load on top (a run's lora/)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts", type=Path, help="a file of prompts, one a line")
    parser.add_argument("--n", type=int, default=8, help="candidates per prompt")
    parser.add_argument("--steps", type=int, default=10, help="sampling steps")
    parser.add_argument("--cfg", type=float, default=4.5, help="CFG scale of the sampler")
    parser.add_argument("--noise-level", type=float, default=0.0,
                        help="SDE noise level of the sampler (0: the deterministic ODE)")
    parser.add_argument("--probes", type=int, default=8, help="self-confidence probes K")
    parser.add_argument("--probe-fraction", type=float, default=0.5, help="probe window rho")
    parser.add_argument("--early-step", type=int, help="score at this step and reject early")
    parser.add_argument("--keep", type=int, help="candidates kept past --early-step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-sequence-length", type=int, default=8)
    parser.add_argument("--actors", type=int, default=0, help="Ray actors (0: this process)")
    parser.add_argument("--num-cpus", type=float, default=1, help="CPUs of each actor")
    parser.add_argument("--num-gpus", type=float, default=0, help="GPUs of each actor")
    parser.add_argument("--device", default="cpu", help="torch device of each actor")
    parser.add_argument("--address", help="Ray cluster to join (default: a new local one)")
    parser.add_argument("--out", type=Path, required=True, help="directory for images and scores")
    args = parser.parse_args(argv)
    prompts = list(args.prompt)
    if args.prompts:
        if not args.prompts.is_file():
            parser.error(f"--prompts {args.prompts}: no such file")
        prompts += [p.strip() for p in args.prompts.read_text().splitlines() if p.strip()]
    if not prompts:
        parser.error("no prompt: give --prompt TEXT (repeatable) or --prompts FILE")
    if args.actors < 0:
        parser.error(f"--actors must be >= 0, got {args.actors}")
    spec = SamplerSpec(num_steps=args.steps, guidance_scale=args.cfg, noise_level=args.noise_level)
    verifier = VerifierSpec(num_probes=args.probes, probe_fraction=args.probe_fraction)
    common = dict(seed=args.seed, max_sequence_length=args.max_sequence_length,
                  early_step=args.early_step, keep=args.keep)
    try:
        check_settings(args.n, spec, args.early_step, args.keep)  # before any actor starts
        if args.actors:
            import ray

            ray.init(address=args.address or "local", include_dashboard=False)
            try:
                out = verify_on_ray(prompts, args.n, spec, verifier, model_path=args.model,
                                    lora=args.lora, actors=args.actors, num_cpus=args.num_cpus,
                                    num_gpus=args.num_gpus, device=args.device, **common)
            finally:
                ray.shutdown()
        else:
            pipe = build_pipeline(args.model, device=args.device)
            if args.lora:
                load_fused_lora(pipe, args.lora)
            out = best_of_n(pipe, prompts, args.n, spec, verifier, **common)
    except ValueError as e:
        parser.error(str(e))
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "scores.jsonl", "w") as f:
        for i, prompt in enumerate(prompts):
            row = {"prompt": prompt, "chosen": int(out.chosen[i]),
                   "seeds": out.seeds[i].tolist(),
                   "scores": [None if math.isnan(s) else float(s) for s in out.scores[i]]}
            if out.early is not None:
                row["early"] = out.early[i].tolist()
            f.write(json.dumps(row) + "\n")
    save_grid(args.out / "best.png", out.images, [prompt_lines(p) for p in prompts])
    print(f"{len(prompts)} prompts x {args.n} candidates, {out.forwards:.0f} transformer "
          f"forwards per image; wrote {args.out / 'best.png'} and {args.out / 'scores.jsonl'}")


if __name__ == "__main__":
    main()
