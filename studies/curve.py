"""Learning curves that can be believed: a recipe, its frozen control and its random-reward
control, paired sample by sample.

    python -m studies.curve --config configs/repro_colorful.yaml --steps 20 \\
        --out docs/curves/colorful [--set grpo.lr=1e-2 ...] [--runs-dir runs/curves/colorful]

Trains three runs of one configuration and one seed with the Ray service
(``learner.main.train``), into ``<runs-dir>/{recipe,frozen,shuffled}``:

* ``recipe``: the configuration as given;
* ``frozen``: the same with ``grpo.frozen`` (no optimizer step), a policy that never
  moves. The seed fixes each step's prompts and every sample's noise, so it scores exactly
  the recipe's (prompt, noise) pairs; it evaluates its base once, on the same noise as
  every evaluation of the other runs, and each of their versions pairs with that;
* ``shuffled``: the same trained on rewards permuted within each group
  (``grpo.shuffle_rewards``): the same update sizes with no signal, i.e. what drift
  alone does to every metric.

Then it writes ``<out>.md`` (tables), ``<out>.json`` (every number) and ``<out>.png``
(curves): for every reward recorded in samples.jsonl, the paired gain per step over the
frozen control of the training samples, ``mean(r_run - r_frozen) ± standard error``; and
for every held-out evaluation metric, the same per evaluated version. A batch-mean reward
curve would move with the prompts drawn; these do not.

A run already trained to ``train.steps`` is not trained again (``--fresh`` retrains).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np

from learner import evaluation
from learner.charts import line_charts
from learner.config import Config, load_config
from studies.reproduce import train_run
from studies.trend import by_sample, paired, read_samples

RUNS = {"recipe": [], "frozen": ["grpo.frozen=true"], "shuffled": ["grpo.shuffle_rewards=true"]}
CONTROL = "frozen"


def run_configs(config: Path, overrides: list[str], steps: int | None,
                runs: dict[str, list[str]]) -> dict[str, Config]:
    """Every run's configuration, loaded (and so checked) before anything trains."""
    extra = [*overrides, *([f"train.steps={steps}"] if steps else [])]
    return {name: load_config(config, [*extra, *own, f"reward_pool.control_name=curve-{name}"])
            for name, own in runs.items()}


def train_gains(run_dir: Path, control_dir: Path) -> dict[str, list[dict]]:
    """``{reward: [{step, mean, se, n}]}``: per-step paired gain of the training samples."""
    rows, control = read_samples(run_dir), read_samples(control_dir)
    keys = sorted({k for r in rows for k in r if k.startswith("reward/")})
    out = {}
    for key in keys:
        diffs = paired(by_sample(rows, key), by_sample(control, key))
        out[key.removeprefix("reward/")] = [
            {"step": s, "mean": float(np.mean(d)), "se": evaluation.standard_error(d), "n": len(d)}
            for s, d in sorted(diffs.items())]
    return out


def paired_evals(run_dir: Path, control_dir: Path) -> list[tuple[int, list[dict], list[dict]]]:
    """``(version, run's images, control's images)`` for every version both can show.

    A ``grpo.frozen`` control evaluates its base once: each of the run's versions pairs
    with that. A control trained at a vanishing learning rate pairs version by version.
    """
    run, control = evaluation.read_evals(run_dir), evaluation.read_evals(control_dir)
    if not run or not control:
        return []
    if load_config(control_dir / "config.yaml").grpo.frozen:
        return [(v, run[v], control[min(control)]) for v in sorted(run)]
    return [(v, run[v], control[v]) for v in sorted(run.keys() & control.keys())]


def eval_gains(run_dir: Path, control_dir: Path) -> dict[str, list[dict]]:
    """``{metric: [{version, mean, se, n}]}``: paired held-out gains."""
    pairs = paired_evals(run_dir, control_dir)
    out: dict[str, list[dict]] = {}
    for key in evaluation.metric_keys(pairs[0][1]) if pairs else []:
        for v, a, b in pairs:
            gain, se, n = evaluation.paired_gain(a, b, key)
            out.setdefault(key, []).append({"version": v, "mean": gain, "se": se, "n": n})
    return out


def se_by_images(run_dir: Path, control_dir: Path, key: str = "shapes/strict") -> list[dict]:
    """The paired gain's standard error at the last shared version, using the first k
    images of each prompt, for k = 1, 2, 4, ... up to what was evaluated: how many fixed-
    noise images an evaluation needs to see an effect of a given size."""
    pairs = paired_evals(run_dir, control_dir)
    if not pairs or key not in evaluation.metric_keys(pairs[-1][1]):
        return []
    _, a, b = pairs[-1]
    per_prompt = 1 + max(r["sample"] for r in a)
    out, k = [], 1
    while k <= per_prompt:
        gain, se, n = evaluation.paired_gain([r for r in a if r["sample"] < k],
                                             [r for r in b if r["sample"] < k], key)
        out.append({"per_prompt": k, "images": n, "mean": gain, "se": se})
        k *= 2
    return out


def _per_index(points: list[dict], index: str) -> list[float]:
    last = max(p[index] for p in points)
    by = {p[index]: p["mean"] for p in points}
    return [by.get(i, math.nan) for i in range(last + 1)]


def write_outputs(out: Path, results: dict, argv: list[str]) -> None:
    """``<out>.json``, ``<out>.md`` and ``<out>.png`` from the paired gains."""
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.with_suffix(".json")).write_text(json.dumps(results, indent=1))
    panels, lines = [], [f"# Learning curve: {out.name}", "",
                         f"`python -m studies.curve {' '.join(argv)}`", "",
                         "Paired gain over the frozen control (same prompts, same noise), "
                         "mean ± standard error.", ""]
    for kind, index in (("train", "step"), ("eval", "version")):
        metrics = sorted({m for r in results["runs"].values() for m in r[kind]})
        for metric in metrics:
            series = [(name, _per_index(r[kind][metric], index))
                      for name, r in results["runs"].items() if r[kind].get(metric)]
            panels.append((f"{kind}: {metric} gain over frozen, per {index}", series))
            lines += [f"## {kind}: {metric}", "", f"| {index} | " + " | ".join(
                name for name, _ in series) + " |", "|---|" + "---|" * len(series)]
            points = {name: {p[index]: p for p in r[kind][metric]}
                      for name, r in results["runs"].items() if r[kind].get(metric)}
            steps = sorted({i for p in points.values() for i in p})
            for i in steps:
                cells = [f"{p[i]['mean']:+.4f} ± {p[i]['se']:.4f}" if i in p else ""
                         for p in points.values()]
                lines.append(f"| {i} | " + " | ".join(cells) + " |")
            lines.append("")
    for name, r in results["runs"].items():
        if r.get("se_by_images"):
            lines += [f"## {name}: held-out ShapesEval strict at the last version, by images "
                      "per prompt", "", "| images per prompt | images | gain | standard error |",
                      "|---|---|---|---|"]
            lines += [f"| {p['per_prompt']} | {p['images']} | {p['mean']:+.4f} | {p['se']:.4f} |"
                      for p in r["se_by_images"]]
            lines.append("")
    if panels:
        line_charts(out.with_suffix(".png"), panels, smooth=1)
    (out.with_suffix(".md")).write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="the recipe's YAML preset")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override for every run (repeatable)")
    parser.add_argument("--steps", type=int, help="train.steps of every run")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS),
                        help="which runs (the frozen control always)")
    parser.add_argument("--variant", nargs="+", action="append", default=[],
                        metavar=("NAME", "KEY=VALUE"), help="one more run: the recipe with "
                        "these overrides, paired with the same frozen control (repeatable)")
    parser.add_argument("--runs-dir", type=Path, help="parent of the run directories "
                        "(default: runs/curves/<out name>)")
    parser.add_argument("--out", type=Path, required=True,
                        help="output stem: writes <out>.md, <out>.json, <out>.png")
    parser.add_argument("--ray-cpus", type=int, default=0, help="local Ray CPUs (0: enough)")
    parser.add_argument("--fresh", action="store_true", help="retrain runs already trained")
    args = parser.parse_args(argv)
    runs = {CONTROL: RUNS[CONTROL]} | {n: RUNS[n] for n in args.runs if n != CONTROL}
    for name, *own in args.variant:
        if name in runs or "=" in name:
            raise SystemExit(f"--variant {name}: give a new run name first, then KEY=VALUE")
        runs[name] = own
    names = list(runs)
    cfgs = run_configs(args.config, args.overrides, args.steps, runs)
    runs_dir = args.runs_dir or Path("runs/curves") / args.out.name

    import ray

    from learner.main import local_cpus

    ray_was_up = ray.is_initialized()
    cpus = args.ray_cpus or max(local_cpus(c) for c in cfgs.values())
    try:
        for name, cfg in cfgs.items():
            if args.fresh:
                shutil.rmtree(runs_dir / name, ignore_errors=True)
            (runs_dir / name).mkdir(parents=True, exist_ok=True)
            train_run(cfg, runs_dir / name, cpus)
    finally:
        if not ray_was_up:
            ray.shutdown()
    control = runs_dir / CONTROL
    results = {"config": str(args.config), "overrides": args.overrides,
               "runs": {name: {"train": train_gains(runs_dir / name, control),
                               "eval": eval_gains(runs_dir / name, control),
                               "se_by_images": se_by_images(runs_dir / name, control)}
                        for name in names if name != CONTROL}}
    write_outputs(args.out, results, argv)
    for name, r in results["runs"].items():
        for metric, points in r["eval"].items():
            p = points[-1]
            print(f"[curve] {name} - frozen, eval {metric} at version {p['version']}: "
                  f"{p['mean']:+.4f} ± {p['se']:.4f} ({p['n']} images)")
    print(f"[curve] wrote {args.out.with_suffix('.md')}, .json, .png", flush=True)
    return results


if __name__ == "__main__":
    main()
