"""Issue #6's reproduction: every configuration trained, evaluated and reported.

    python -m studies.reproduce [--quick] [--only NAME ...] [--out docs/results]
                                [--per-prompt 4] [--limit N] [--runs-dir runs/reproduce]
                                [--set section.field=value ...]

For each run of :func:`run_table` (name, preset, overrides, seed): train it with the Ray
service (``learner.main.train``) into ``<runs-dir>/<name>/``, evaluate its LoRA with
ShapesEval on the ``test`` and ``unseen`` splits (40-step ODE, CFG 4.5, the same eval
seed for every run, so every model starts from the same noise) and save ``eval.json``
and ``eval_images.npz`` beside it. Then :mod:`studies.report` writes ``<out>.md``
(``docs/results.md``) with the tables, and ``<out>/training.png``, ``<out>/ablations.png``
and ``<out>/grid_<run>.png``; every number in them is read from the run directories.

Resuming: a run whose ``eval.json`` holds the current evaluation settings (and whose
``lora/`` exists) is skipped; one whose training stopped part-way continues from its last
checkpoint (``learner.main``'s resume); a finished training is evaluated without
retraining. A run directory holding another configuration is refused, not overwritten.
The report covers every run of the table that has an ``eval.json``, so ``--only`` fills
in part of it. The "Reading" section of an existing report is kept.

``--quick`` (the test suite's mode): the base model and SOLACE seed 0 trained 2 steps,
one image per prompt on one prompt per tag, into a temporary directory.

Deviations from the paper's protocol (SOLACE, CVPR 2026, on SD3.5-M and GenEval):

* The shipped tiny shapes model and ShapesEval replace SD3.5-M and GenEval; a run is
  ``train.steps`` steps of 16 samples (configs/repro_solace.yaml), not 2,000 of G=16
  groups on 8 GPUs, so that all 18 trained runs fit in ~2 hours on 2 CPU cores.
* The base model is evaluated once: its samples depend on the eval seed only, which is
  the same for all runs, so its three "seeds" would be the same numbers. The spread
  over seeds of the trained rows is the spread over training seeds at fixed eval noise.
* Each ablation changes one field of the SOLACE preset and is compared with SOLACE seed
  0, the ablation's reference (one seed each, as issue #6 asks).
* ShapesEval over training is the partial credit of the training samples (10-step SDE
  samples of train prompts), recorded by the weight-0 ``shapes_monitor`` reward; the
  final evaluation is strict GenEval accuracy on held-out prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from learner.config import Config, load_config
from studies.plan import (
    EVAL,
    EVAL_THREADS,
    REFERENCE,
    REPO,
    SPLITS,
    Run,
    by_name,
    eval_rows,
    read_eval,
    run_table,
)
from studies.report import write_report


def run_config(run: Run, extra: Sequence[str] = ()) -> Config:
    """The run's resolved configuration: preset, run overrides, seed, then ``extra``."""
    return load_config(REPO / run.preset, [*run.overrides, f"seed={run.seed}",
                                           f"reward_pool.control_name=repro-{run.name}", *extra])


def select(runs: list[Run], only: Sequence[str]) -> list[Run]:
    """Runs named (or of a family named) in ``only``; the base model always."""
    if not only:
        return runs
    unknown = set(only) - {r.name for r in runs} - {r.family for r in runs}
    if unknown:
        raise SystemExit(f"--only: unknown run or family {sorted(unknown)}; runs: "
                         f"{', '.join(r.name for r in runs)}")
    return [r for r in runs if r.family == "base" or r.name in only or r.family in only]


# --- training and evaluation -------------------------------------------------------


def train_run(cfg: Config, run_dir: Path, ray_cpus: int) -> None:
    """Train ``run_dir``, finish its training from the last checkpoint, or see it is done."""
    from learner.main import latest_checkpoint, train

    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None and load_config(run_dir / "config.yaml") != cfg:
        raise SystemExit(f"{run_dir} holds a run of another configuration; delete it, or "
                         "pass another --runs-dir")
    if ckpt is not None and ckpt.name == f"step_{cfg.train.steps:06d}":
        return
    ensure_ray(cfg, ray_cpus)
    print(f"[reproduce] {run_dir.name}: training {cfg.train.steps} steps"
          + (f", resumed at {ckpt.name}" if ckpt else ""), flush=True)
    started = time.perf_counter()
    train(cfg, run_dir, resume=ckpt is not None)
    timing = run_dir / "train_seconds.json"  # summed over resumed attempts
    before = json.loads(timing.read_text())["seconds"] if timing.is_file() else 0.0
    timing.write_text(json.dumps({"seconds": round(before + time.perf_counter() - started, 1)}))


def evaluate_run(run_dir: Path, model: str, lora: Path | None, settings: dict,
                 max_sequence_length: int) -> dict:
    """ShapesEval summaries per split; the first image of each prompt to eval_images.npz."""
    from policy.pipeline import build_pipeline, load_fused_lora
    from shapes.eval_model import evaluate

    pipe = build_pipeline(model, num_threads=EVAL_THREADS)
    if lora is not None:
        load_fused_lora(pipe, lora)
    out, arrays = {}, {}
    for split in SPLITS:
        rows = eval_rows(split, settings["limit"])
        ev = evaluate(pipe, rows, settings["per_prompt"], EVAL["steps"], EVAL["cfg"], EVAL["seed"],
                      max_sequence_length)
        out[split] = ev.summary
        first = np.arange(0, len(ev.images), settings["per_prompt"])  # image 0 of each prompt
        arrays |= {f"{split}/images": ev.images[first], f"{split}/strict": ev.scores.strict[first],
                   f"{split}/partial": ev.scores.partial[first],
                   f"{split}/prompts": np.array([r["prompt"] for r in rows]),
                   f"{split}/tags": np.array([r["tag"] for r in rows])}
    np.savez_compressed(run_dir / "eval_images.npz", **arrays)
    return out


def run_one(run: Run, runs_dir: Path, settings: dict, extra: Sequence[str], ray_cpus: int) -> None:
    """Train ``run`` unless trained, then evaluate it unless its eval.json has ``settings``."""
    run_dir = runs_dir / run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    # The base model is the SOLACE preset's model, evaluated without a LoRA.
    cfg = run_config(run if run.preset is not None else by_name(REFERENCE), extra)
    if run.preset is not None:
        train_run(cfg, run_dir, ray_cpus)
    if read_eval(run_dir, settings):
        print(f"[reproduce] {run.name}: done before, skipped", flush=True)
        return
    started = time.perf_counter()
    lora = run_dir / "lora" if run.preset is not None else None
    result = {"run": run.name, "eval": settings,
              **evaluate_run(run_dir, cfg.model.path, lora, settings,
                              cfg.model.max_sequence_length),
              "eval_seconds": round(time.perf_counter() - started, 1)}
    (run_dir / "eval.json").write_text(json.dumps(result, indent=1))
    print(f"[reproduce] {run.name}: ShapesEval overall test {result['test']['overall']:.3f}, "
          f"unseen {result['unseen']['overall']:.3f}", flush=True)


def ensure_ray(cfg: Config, cpus: int) -> None:
    """One local Ray instance for every run, with ``cpus`` tokens (the largest run's need)."""
    import ray

    from learner.main import init_ray

    if not ray.is_initialized():
        init_ray(cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"num_cpus": cpus})}),
                 None)


def main(argv: list[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description="Issue #6's reproduction: train, evaluate, report.")
    parser.add_argument("--quick", action="store_true",
                        help="SOLACE seed 0 for 2 steps and a tiny evaluation, in a temporary dir")
    parser.add_argument("--only", nargs="+", default=[], metavar="NAME",
                        help="runs or families to run (the base model always)")
    parser.add_argument("--out", type=Path, help="figure directory; the report is <out>.md "
                        "(default: docs/results; --quick: a temporary directory)")
    parser.add_argument("--runs-dir", type=Path, help="parent of the run directories "
                        "(default: runs/reproduce; --quick: beside --out)")
    parser.add_argument("--per-prompt", type=int, help="eval images per prompt (default 4; quick 1)")
    parser.add_argument("--limit", type=int, help="eval prompts per tag (default all; quick 1)")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                        help="override for every trained run, e.g. train.steps=40")
    args = parser.parse_args(argv)
    if args.quick:
        args.only = args.only or [REFERENCE]
        args.extra = ["train.steps=2", *args.extra]
        args.out = args.out or Path(tempfile.mkdtemp(prefix="reproduce-")) / "results"
    out = (args.out or REPO / "docs/results").resolve()
    runs_dir = args.runs_dir or (out.parent / "runs" if args.quick else REPO / "runs/reproduce")
    settings = {"per_prompt": args.per_prompt or (1 if args.quick else 4),
                "limit": args.limit or (1 if args.quick else None), **EVAL}
    runs = select(run_table(), args.only)
    # Every configuration loads before anything runs; Ray gets the largest run's CPUs.
    from learner.main import local_cpus

    ray_cpus = max([local_cpus(run_config(r, args.extra)) for r in runs if r.preset], default=1)

    import ray

    ray_was_up = ray.is_initialized()  # a caller's Ray (a test's) is used and left running
    started, load_start = time.perf_counter(), os.getloadavg()
    try:
        for run in runs:
            run_one(run, runs_dir, settings, args.extra, ray_cpus)
    finally:
        if not ray_was_up:
            ray.shutdown()
    evals = {r.name: e for r in run_table() if (e := read_eval(runs_dir / r.name, settings))}
    report = write_report(out.parent / f"{out.name}.md", out, runs_dir, evals, argv,
                          time.perf_counter() - started, (load_start, os.getloadavg()))
    print(f"[reproduce] wrote {report} and {out}/", flush=True)
    return report


if __name__ == "__main__":
    main()
