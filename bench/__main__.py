"""The benchmark suite of issue #7: ``python -m bench all [--quick] [--out BENCHMARKS.md]``.

    python -m bench all                  # every part; writes BENCHMARKS.md and docs/bench/
    python -m bench all --quick          # the short mode the test suite runs
    python -m bench stages|e2e|scaling|gpu [--out FILE]   # one part (printed; written with --out)
    python -m bench memory [--gpu-config FILE]            # memory per actor role (issue #17)
    python -m bench onpolicy                              # recompute cost, merged-LoRA gain

Parts: ``stages`` (1-3: sampler, self-confidence and update efficiency; aliases sampler,
scoring, update), ``e2e`` (4-5: service vs sequential, overheads, publish latency; alias
overheads), ``scaling`` (6) and ``gpu`` (7); ``render`` measures nothing and rewrites the
``--out`` markdown and plot from the ``docs/bench/results.json`` beside it. ``--set section.field=value`` overrides the
benchmarked config (``configs/tiny_solace.yaml``) as for ``learner.main``. The plot and
``results.json`` go to ``docs/bench/`` beside the ``--out`` file.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from bench import chart, report

ROOT = Path(__file__).resolve().parents[1]
PARTS = {"all": ("stages", "e2e", "scaling", "gpu"), "render": (), "stages": ("stages",),
         "sampler": ("stages",), "scoring": ("stages",), "update": ("stages",),
         "e2e": ("e2e",), "overheads": ("e2e",), "scaling": ("scaling",), "gpu": ("gpu",),
         # issue #17: printed (and written with --out), not part of "all"
         "memory": ("memory",), "onpolicy": ("onpolicy",)}


@dataclass(frozen=True)
class Settings:
    """How long each part runs."""

    repeats: int  # interleaved stage/bare pairs per stage (parts 1-3, 7)
    runs: int  # runs of each loop in part 4
    steps: int  # steps per run in parts 4 and 6
    warmup: int  # steps not timed at the start of a run
    scaling: tuple[str, ...]  # the part-6 settings (keys of bench.service.SCALING)
    publish_mb: tuple[float, ...]  # synthetic weight buffers of part 5
    publish_repeats: int


FULL = Settings(5, 3, 8, 2, ("1 rollout, 2 reward", "2 rollout, 1 reward",
                              "1 rollout, 1 reward, 2 threads each"), (1, 10, 100), 5)
QUICK = Settings(1, 1, 3, 1, ("2 rollout, 1 reward",), (1, 10), 2)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def publish_payloads(cfg, settings: Settings) -> list[tuple[str, float]]:
    """Synthetic buffers, plus the real LoRA sizes of the benchmarked model and of SD3.5-M."""
    from bench.gpu_mode import SD35M_SHAPE
    from bench.service import lora_megabytes

    targets = cfg.lora.target_modules
    out = [(f"{mb:g} MiB synthetic", float(mb)) for mb in settings.publish_mb]
    config_file = Path(cfg.model.path) / "transformer" / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        for r, mb in lora_megabytes(config, [4, 16, 64], targets).items():
            out.append((f"LoRA r={r}, {cfg.model.path}", mb))
    if settings is FULL:
        (r, mb), = lora_megabytes(SD35M_SHAPE, [32], targets).items()
        out.append((f"LoRA r={r}, SD3.5-M shape", mb))
    return sorted(out, key=lambda p: p[1])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=sorted(PARTS), help="what to run")
    parser.add_argument("--quick", action="store_true", help="the short mode (tests)")
    parser.add_argument("--repeats", type=int, help="stage/bare pairs per stage")
    parser.add_argument("--runs", type=int, help="runs of each loop, end to end")
    parser.add_argument("--steps", type=int, help="steps per service/sequential run")
    parser.add_argument("--out", type=Path, help="markdown to write (default for 'all': BENCHMARKS.md)")
    parser.add_argument("--config", type=Path, default=ROOT / "configs/tiny_solace.yaml")
    parser.add_argument("--gpu-config", type=Path, default=ROOT / "configs/sd35m_solace.yaml",
                        help="the preset whose shapes and batch sizes the GPU mode uses")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override of the benchmarked config")
    parser.add_argument("--threads", type=int, help="torch threads of parts 1-3 and 7 "
                        "(default: rollout.num_threads, as in each actor)")
    parser.add_argument("--note", default="", help="a sentence about the machine's state")
    args = parser.parse_args(argv)

    from learner.config import load_config
    from learner.prompts import PromptCursor, load_prompts

    if args.part in ("memory", "onpolicy"):
        return option_part(args)
    if args.part == "render":
        out = args.out or Path("BENCHMARKS.md")
        write(json.loads((out.parent / "docs/bench/results.json").read_text()), out)
        return

    settings = QUICK if args.quick else FULL
    for name in ("repeats", "runs", "steps"):
        if getattr(args, name):
            settings = replace(settings, **{name: getattr(args, name)})
    out = args.out or (Path("BENCHMARKS.md") if args.part == "all" else None)
    load = lambda extra: load_config(args.config, [*args.overrides, *extra])  # noqa: E731
    cfg = load([])  # fails here, naming the field, before anything runs
    threads = args.threads or cfg.rollout.num_threads
    parts = PARTS[args.part]

    t_start = time.time()
    results = {"meta": report.machine_info(), "note": args.note, "part_s": {},
               "command": "python -m bench " + shlex.join(argv), "settings": settings.__dict__}
    clock = time.time()

    def done(part: str) -> None:
        nonlocal clock
        results["part_s"][part] = round(time.time() - clock, 1)
        clock = time.time()
        log(f"  ({part}: {results['part_s'][part]:.0f} s)")

    if "stages" in parts:
        from bench.stages import run_stages

        log("parts 1-3: stage efficiencies")
        prompts = [row["prompt"] for _, row in
                   PromptCursor(load_prompts(cfg.train.prompts), cfg.seed).take(cfg.grpo.prompts_per_step)]
        results["stages"] = run_stages(cfg, prompts, settings.repeats, threads, deepspeed=True)
        done("stages")
    if "e2e" in parts:
        from bench.service import run_e2e

        log("parts 4-5: end to end and overheads")
        results["e2e"] = run_e2e(load, settings.steps, settings.warmup, settings.runs,
                                 os.cpu_count() or 1, publish_payloads(cfg, settings),
                                 settings.publish_repeats, log=log)
        done("e2e")
    if "scaling" in parts:
        from bench.service import run_scaling

        log("part 6: scaling")
        results["scaling"] = run_scaling(load, settings.steps, settings.warmup,
                                         list(settings.scaling), log=log)
        done("scaling")
    if "gpu" in parts:
        from bench.gpu_mode import run_gpu_mode

        log("part 7: GPU mode")
        results["gpu"] = run_gpu_mode(load_config(args.gpu_config), settings.repeats, threads)
        done("gpu")
    results["meta"]["load_end"] = os.getloadavg()
    results["elapsed_s"] = time.time() - t_start

    print(report.console(results))
    if out is not None:
        write(results, out)


def option_part(args) -> None:
    """``memory`` (the memory model per role) and ``onpolicy`` (the on-policy options'
    cost and gain): printed, and with ``--out`` written as JSON."""
    from learner.config import load_config

    if args.part == "memory":
        from bench.memory import console, run_memory

        gcfg = load_config(args.gpu_config, args.overrides)
        results = run_memory(gcfg, args.gpu_config)
    else:
        from bench.onpolicy import console, run_onpolicy
        from learner.prompts import PromptCursor, load_prompts

        cfg = load_config(args.config, args.overrides)
        prompts = [row["prompt"] for _, row in
                   PromptCursor(load_prompts(cfg.train.prompts), cfg.seed).take(cfg.grpo.prompts_per_step)]
        repeats = args.repeats or (QUICK if args.quick else FULL).repeats
        results = run_onpolicy(cfg, load_config(args.gpu_config), prompts, repeats,
                               args.threads or cfg.rollout.num_threads)
    results["command"] = "python -m bench " + shlex.join(sys.argv[1:])
    print(console(results))
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        log(f"wrote {args.out}")


def write(results: dict, out: Path) -> None:
    """``out`` (markdown), and beside it docs/bench/results.json and the step-time plot."""
    docs = out.parent / "docs" / "bench"
    docs.mkdir(parents=True, exist_ok=True)
    plot = None
    if "e2e" in results:
        chart.plot(results, docs / "step_breakdown.png")
        plot = "docs/bench/step_breakdown.png"
    (docs / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    out.write_text(report.markdown(results, plot))
    log(f"wrote {out}, {docs / 'results.json'}" + (f", {docs / 'step_breakdown.png'}" if plot else ""))


if __name__ == "__main__":
    main()
