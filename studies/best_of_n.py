"""Does self-confidence pick better images? Best-of-N on held-out ShapesEval prompts.

    python -m studies.best_of_n --config configs/tiny_solace.yaml --split test \\
        --n-max 16 --early-step 3 --keep-fraction 0.5 --out docs/verifier/best_of_n

Samples ``n-max`` candidates of every prompt of a shapes-world split
(:func:`rewards.verifier.best_of_n`, every candidate kept and graded), scores each with
self-confidence (the config's K, window and delta, no CFG) at the end and, for early
rejection, at ``early-step``, and grades each with ShapesEval (strict). For each
``n`` in 1, 2, 4, ... ``n-max`` it reports GenEval's overall (the mean over tags) and
each tag's accuracy of

* ``self_confidence``: the most self-confident of ``n`` candidates;
* ``random``: any one of them (the plain sampler's accuracy, whatever ``n``);
* ``oracle``: the best by ShapesEval (right if any of the ``n`` is right);
* ``early``: the ``ceil(keep-fraction x n)`` most confident at ``early-step``, denoised to
  the end, then the most self-confident of those,

each the exact expectation over every ``n``-subset of a prompt's candidates (not one
draw), with standard errors over prompts; the paired gain of self-confidence over
random with its standard error; the compute per returned image in transformer forwards
of one image (:func:`rewards.verifier.forwards_per_image`); and per tag the AUROC of the
final and the early score against strict correctness, within each prompt's candidates
(the ranking that picks) and pooled. Writes ``<out>.json`` and ``<out>.png``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from learner.config import load_config
from policy.pipeline import build_pipeline
from policy.sampler import SamplerSpec
from rewards.verifier import VerifierSpec, best_of_n, forwards_per_image
from shapes.evaluate import ShapesEval
from shapes.world import TAGS, load_split
from studies.diagnose import auroc

STRATEGIES = ("self_confidence", "random", "oracle", "early")


def subsets(total: int, n: int) -> np.ndarray:
    """Every ``n``-subset of ``range(total)``, ``[C(total, n), n]``, indices ascending."""
    return np.array(list(itertools.combinations(range(total), n)), dtype=np.int64).reshape(-1, n)


def pick_accuracy(scores: np.ndarray, correct: np.ndarray, n: int) -> float:
    """Expected accuracy of the most confident of ``n`` candidates drawn without replacement
    from one prompt's ``scores`` / ``correct`` ``[N]``, exactly: the candidate ranked ``r``
    (0 = most confident; ties by index, as :func:`rewards.verifier.pick`) is the pick of
    ``C(N-1-r, n-1)`` of the ``C(N, n)`` subsets."""
    total = len(scores)
    order = np.lexsort((np.arange(total), -scores))  # descending score, then index
    weights = np.array([math.comb(total - 1 - r, n - 1) for r in range(total)], float)
    return float((weights * correct[order]).sum() / math.comb(total, n))


def oracle_accuracy(correct: np.ndarray, n: int) -> float:
    """P(at least one of ``n`` candidates drawn without replacement is right)."""
    total, right = len(correct), int(correct.sum())
    return 1.0 - math.comb(total - right, n) / math.comb(total, n)


def early_accuracy(early: np.ndarray, final: np.ndarray, correct: np.ndarray, n: int,
                   keep: int) -> float:
    """Expected accuracy of early rejection over every ``n``-subset: the ``keep`` most
    confident at the early step go on, the most confident of those at the end is kept."""
    combos = subsets(len(early), n)
    rank = np.argsort(-early[combos], axis=1, kind="stable")[:, :keep]
    kept = np.take_along_axis(combos, rank, axis=1)
    best = np.take_along_axis(kept, np.argmax(final[kept], axis=1)[:, None], axis=1)[:, 0]
    return float(correct[best].mean())


def keep_count(n: int, fraction: float) -> int:
    return max(1, math.ceil(fraction * n))


def per_prompt(data: dict, n: int, keep_fraction: float) -> dict[str, np.ndarray]:
    """Each strategy's expected accuracy per prompt ``[P]`` at ``n`` candidates."""
    final, early, correct = data["scores"], data["early"], data["correct"]
    rows = range(len(correct))
    return {
        "self_confidence": np.array([pick_accuracy(final[p], correct[p], n) for p in rows]),
        "random": correct.mean(axis=1).astype(float),
        "oracle": np.array([oracle_accuracy(correct[p], n) for p in rows]),
        "early": np.array([early_accuracy(early[p], final[p], correct[p], n,
                                          keep_count(n, keep_fraction)) for p in rows]),
    }


def overall(values: np.ndarray, tags: np.ndarray) -> tuple[float, float, dict]:
    """GenEval's overall (mean over tags of per-tag means) with its standard error over
    prompts, and per tag (mean, standard error)."""
    per_tag = {}
    for tag in TAGS:
        v = values[tags == tag]
        if len(v):
            se = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0
            per_tag[tag] = (float(v.mean()), se)
    means = [m for m, _ in per_tag.values()]
    se = math.sqrt(sum(s * s for _, s in per_tag.values())) / len(per_tag)
    return float(np.mean(means)), se, per_tag


def collect(cfg, rows: list[dict], n_max: int, spec: SamplerSpec, verifier: VerifierSpec,
            early_step: int) -> dict:
    """Every candidate's final and early score and its ShapesEval verdict."""
    m = cfg.model
    pipe = build_pipeline(m.path, m.dtype, m.device, num_threads=m.num_threads or 0)
    out = best_of_n(pipe, [r["prompt"] for r in rows], n_max, spec, verifier, seed=cfg.seed,
                    max_sequence_length=m.max_sequence_length, early_step=early_step,
                    keep=n_max, keep_all=True)
    images = out.candidates.reshape(-1, *out.candidates.shape[2:])
    metadata = [r for r in rows for _ in range(n_max)]
    strict = ShapesEval()(images, metadata).strict.reshape(len(rows), n_max)
    return {"scores": out.scores, "early": out.early, "correct": strict.astype(bool),
            "tags": np.array([r["tag"] for r in rows]), "candidates": out.candidates}


def study(data: dict, n_max: int, keep_fraction: float, spec: SamplerSpec,
          verifier: VerifierSpec, early_step: int) -> dict:
    """The report: per n, each strategy's overall and per-tag accuracy and compute."""
    tags = data["tags"]
    ns = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= n_max]
    report: dict = {"n": ns, "strategies": {}, "gain_over_random": [], "auroc": {}}
    for n in ns:
        acc = per_prompt(data, n, keep_fraction)
        forwards = {
            "self_confidence": forwards_per_image(n, spec, verifier),
            "random": forwards_per_image(1, spec, verifier),
            "oracle": forwards_per_image(n, spec, verifier) - (
                n * verifier.num_probes * verifier.probe_steps(spec.num_steps) if n > 1 else 0),
            "early": forwards_per_image(n, spec, verifier, early_step, keep_count(n, keep_fraction))
            if n > 1 else forwards_per_image(1, spec, verifier),
        }
        for name in STRATEGIES:
            mean, se, per_tag = overall(acc[name], tags)
            report["strategies"].setdefault(name, []).append(
                {"n": n, "overall": mean, "se": se, "per_tag": per_tag,
                 "forwards_per_image": forwards[name]})
        mean, se, per_tag = overall(acc["self_confidence"] - acc["random"], tags)
        report["gain_over_random"].append({"n": n, "overall": mean, "se": se, "per_tag": per_tag})
    prompt_ids = np.repeat(np.arange(len(tags)), n_max)
    for tag in [*TAGS, "all"]:
        sel = np.repeat(tags == tag if tag != "all" else np.ones(len(tags), bool), n_max)
        if not sel.any():
            continue
        y = data["correct"].reshape(-1)[sel]
        entry = {"images": int(sel.sum()), "correct": int(y.sum())}
        for key in ("scores", "early"):
            s = data[key].reshape(-1)[sel]
            entry[key] = {"within_prompt": auroc(s, y, prompt_ids[sel]), "pooled": auroc(s, y)}
        report["auroc"][tag] = entry
    return report


def plot(report: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name in STRATEGIES:
        rows = report["strategies"][name]
        x = [r["n"] for r in rows]
        y = np.array([r["overall"] for r in rows])
        e = np.array([r["se"] for r in rows])
        left.errorbar(x, y, yerr=e, marker="o", capsize=3, label=name)
        right.errorbar([r["forwards_per_image"] for r in rows], y, yerr=e, marker="o",
                       capsize=3, label=name)
    left.set_xscale("log", base=2)
    left.set_xlabel("candidates per prompt (n)")
    right.set_xscale("log")
    right.set_xlabel("transformer forwards per returned image")
    for ax in (left, right):
        ax.set_ylabel("ShapesEval strict, overall")
        ax.grid(alpha=0.3)
    left.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_report(report: dict) -> str:
    lines = ["n   " + "".join(f"{s:>24}" for s in STRATEGIES) + "   sc - random"]
    for i, n in enumerate(report["n"]):
        cells = "".join(
            f"{report['strategies'][s][i]['overall']:>8.3f} ± {report['strategies'][s][i]['se']:.3f}"
            f" ({report['strategies'][s][i]['forwards_per_image']:>5.0f})" for s in STRATEGIES)
        g = report["gain_over_random"][i]
        lines.append(f"{n:<4}{cells}   {g['overall']:+.3f} ± {g['se']:.3f}")
    lines.append("AUROC (within prompt / pooled): final score, early score")
    for tag, e in report["auroc"].items():
        def f(x):
            return " n/a " if x is None else f"{x:.3f}"
        lines.append(f"  {tag:<14} {e['images']:>5} images {e['correct']:>4} right   "
                     f"{f(e['scores']['within_prompt'])} / {f(e['scores']['pooled'])}   "
                     f"{f(e['early']['within_prompt'])} / {f(e['early']['pooled'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/tiny_solace.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. self_confidence.num_probes=16")
    parser.add_argument("--split", default="test", choices=["train", "test", "unseen"])
    parser.add_argument("--limit", type=int, help="only the first N prompts (a quick look)")
    parser.add_argument("--n-max", type=int, default=16, help="candidates sampled per prompt")
    parser.add_argument("--sampler", choices=["ode", "sde"], default="ode",
                        help="ode: the deterministic sampler; sde: the config's training sampler")
    parser.add_argument("--early-step", type=int, default=3, help="the early score's step")
    parser.add_argument("--keep-fraction", type=float, default=0.5,
                        help="share of the n candidates denoised past --early-step")
    parser.add_argument("--out", type=Path, required=True, help="output stem (.json, .png)")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.set)
    spec = cfg.sampler.spec()
    if args.sampler == "ode":
        spec = SamplerSpec(num_steps=spec.num_steps, guidance_scale=spec.guidance_scale,
                           noise_level=0.0, shift=spec.shift)
    sc = cfg.self_confidence
    verifier = VerifierSpec(sc.num_probes, sc.probe_fraction, sc.delta, sc.aggregation)
    rows = load_split(args.split)[:args.limit]
    started = time.perf_counter()
    data = collect(cfg, rows, args.n_max, spec, verifier, args.early_step)
    seconds = time.perf_counter() - started
    report = study(data, args.n_max, args.keep_fraction, spec, verifier, args.early_step)
    report.update({"split": args.split, "prompts": len(rows), "n_max": args.n_max,
                   "model": cfg.model.path, "sampler": args.sampler,
                   "spec": {"num_steps": spec.num_steps, "guidance_scale": spec.guidance_scale,
                            "noise_level": spec.noise_level},
                   "verifier": asdict(verifier),
                   "early_step": args.early_step, "keep_fraction": args.keep_fraction,
                   "seed": cfg.seed, "seconds": round(seconds, 1)})
    print(format_report(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    plot(report, args.out.with_suffix(".png"),
         f"best-of-n on {args.split} ({len(rows)} prompts, {args.sampler} "
         f"{spec.num_steps} steps), verifier: self-confidence K={verifier.num_probes}")
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
