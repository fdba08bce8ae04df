"""Held-out evaluation during training: which images, how they are graded, what is logged.

Every ``eval.every`` steps (and before the first step and after the last) the driver has
the rollout actors denoise ``eval.per_prompt`` images of each held-out prompt with the
deterministic sampler, from noise that depends only on ``eval.seed`` and the image's
place (``policy.sampler.eval_seed``). Two evaluations, of two versions or two runs, thus
see the same starting noise image by image, and their difference is paired: free of the
prompt draw and of the noise, it is what the weights changed.

Grading: rows with shapes-world metadata are graded by ShapesEval (strict GenEval
accuracy per tag, ``overall`` = the mean over tags, and partial credit), here in the
driver (a few thousand images a second on one core); with ``eval.rewards`` the reward
pools also score the images with every reward of the run, at the evaluated version.

A run writes ``eval_samples.jsonl`` (one row per image and evaluation) and
``evals.jsonl`` (one summary per evaluation); :func:`paired_gain` compares two
evaluations image by image.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from learner.charts import line_charts
from shapes.evaluate import ShapesEval, cannot_grade, summarize

SHAPES = "shapes"  # the key of ShapesEval's grades in the rows and metrics


def eval_rows(rows: Sequence[dict], prompts_per_tag: int | None) -> list[dict]:
    """The held-out rows to evaluate: all, or the first ``prompts_per_tag`` of each tag."""
    if prompts_per_tag is None:
        return list(rows)
    seen: dict[str, int] = {}
    out = []
    for row in rows:
        tag = row.get("tag", "")
        if seen.get(tag, 0) < prompts_per_tag:
            seen[tag] = seen.get(tag, 0) + 1
            out.append(row)
    return out


def eval_jobs(rows: Sequence[dict], per_prompt: int, offset: int) -> list[tuple[int, str, int]]:
    """``(prompt_id, prompt, sample_index)`` of every evaluation image, prompt by prompt.

    ``offset`` shifts the prompt ids past the training prompts, so that a reward actor
    finds each image's metadata in one list (training rows, then evaluation rows).
    """
    return [(offset + p, row["prompt"], i) for p, row in enumerate(rows) for i in range(per_prompt)]


def gradable(rows: Sequence[dict]) -> bool:
    """Whether ShapesEval can grade these rows (shapes-world metadata on every one; GenEval
    rows over COCO classes are not, and are left to the run's rewards)."""
    return all("include" in r and "tag" in r and cannot_grade(r) is None for r in rows)


@dataclass
class EvalResult:
    """One evaluation of one weight version."""

    version: int
    step: int  # training steps done when it ran (== version unless resumed oddly)
    rows: list[dict]  # one per image: prompt_id, sample, tag, shapes strict/partial, rewards
    summary: dict[str, float]  # flat, eval/... keys


def grade(version: int, step: int, rows: Sequence[dict], per_prompt: int, images: np.ndarray,
          rewards: dict[str, np.ndarray]) -> EvalResult:
    """Grade one evaluation's images (ShapesEval when the rows allow) and summarise them."""
    metadata = [row for row in rows for _ in range(per_prompt)]
    out = [{"version": version, "step": step, "prompt_id": p, "sample": i,
            "tag": row.get("tag", "")}
           for p, row in enumerate(rows) for i in range(per_prompt)]
    summary: dict[str, float] = {"eval/version": version, "eval/images": len(out)}
    if gradable(rows):
        scores = ShapesEval()(images, metadata)
        for r, strict, partial in zip(out, scores.strict, scores.partial, strict=True):
            r[f"{SHAPES}/strict"], r[f"{SHAPES}/partial"] = bool(strict), float(partial)
        tags = summarize(scores, metadata)
        summary[f"eval/{SHAPES}/strict"] = tags.pop("overall")  # GenEval's mean over tags
        summary[f"eval/{SHAPES}/partial"] = tags.pop("partial")
        summary |= {f"eval/{SHAPES}/strict/{tag}": v for tag, v in tags.items()}
    for name, values in rewards.items():
        for r, v in zip(out, values, strict=True):
            r[f"reward/{name}"] = float(v)
        summary[f"eval/{name}/mean"] = float(np.mean(values))
    return EvalResult(version, step, out, summary)


def write(run_dir: Path, result: EvalResult) -> None:
    """Append the evaluation to eval_samples.jsonl and evals.jsonl."""
    with open(run_dir / "eval_samples.jsonl", "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in result.rows)
    with open(run_dir / "evals.jsonl", "a") as f:
        f.write(json.dumps({"version": result.version, "step": result.step, **result.summary})
                + "\n")


def headline(summary: dict) -> dict[str, float]:
    """The scores a person reads of one evaluation summary, by name without ``eval/``:
    ShapesEval strict overall and each reward's mean (``shapes/strict``,
    ``self_confidence/mean``, ...), not the per-tag breakdowns."""
    return {k[5:]: v for k, v in summary.items() if k.startswith("eval/")
            and k.endswith(("/strict", "/mean")) and k.count("/") == 2}


def read_evals(run_dir: Path) -> dict[int, list[dict]]:
    """``{version: [image rows]}`` from eval_samples.jsonl (a repeated version: the last)."""
    path = run_dir / "eval_samples.jsonl"
    out: dict[int, dict[tuple[int, int], dict]] = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        r = json.loads(line)
        out.setdefault(r["version"], {})[(r["prompt_id"], r["sample"])] = r
    return {v: [rows[k] for k in sorted(rows)] for v, rows in sorted(out.items())}


def metric_keys(rows: Sequence[dict]) -> list[str]:
    """The per-image metrics of evaluation rows (ShapesEval grades and rewards)."""
    skip = {"version", "step", "prompt_id", "sample", "tag"}
    return sorted({k for r in rows for k in r if k not in skip})


def paired_gain(a: Sequence[dict], b: Sequence[dict], key: str) -> tuple[float, float, int]:
    """Mean of ``a - b`` over the images both evaluations share, its standard error, and n.

    For ShapesEval strict the per-image value is 0/1; the gain is then taken per tag and
    averaged over tags (GenEval's overall), its standard error combined from the tags'.
    """
    index = {(r["prompt_id"], r["sample"]): r for r in b if r.get(key) is not None}
    pairs = [(r.get("tag", ""), float(r[key]) - float(index[k][key]))
             for r in a if r.get(key) is not None and (k := (r["prompt_id"], r["sample"])) in index]
    if not pairs:
        return math.nan, math.nan, 0
    if not key.endswith("/strict"):
        d = np.array([x for _, x in pairs])
        return float(d.mean()), standard_error(d), len(d)
    by_tag: dict[str, list[float]] = {}
    for tag, x in pairs:
        by_tag.setdefault(tag, []).append(x)
    means = [np.mean(v) for v in by_tag.values()]
    ses = [standard_error(np.array(v)) for v in by_tag.values()]
    se = math.sqrt(sum(s * s for s in ses if math.isfinite(s))) / len(ses)
    return float(np.mean(means)), se, len(pairs)


def read_summaries(run_dir: Path) -> dict[int, dict]:
    """``{version: summary}`` from evals.jsonl (a repeated version: the last)."""
    path = run_dir / "evals.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return {r["version"]: r for r in map(json.loads, lines)}


def plot(run_dir: Path) -> Path | None:
    """``eval.png``: each evaluation metric against the weight version."""
    summaries = read_summaries(run_dir)
    if not summaries:
        return None
    last = max(summaries)
    keys = [k for k in next(iter(summaries.values()))
            if k.endswith(("/strict", "/partial", "/mean")) and k.count("/") == 2]
    panels = [(k, [(k.split("/")[1], [summaries[v].get(k, math.nan) if v in summaries
                                      else math.nan for v in range(last + 1)])]) for k in keys]
    return line_charts(run_dir / "eval.png", panels, smooth=1)


def report(run_dir: Path) -> list[str]:
    """The run's closing lines: each evaluation metric, first -> last version, with the
    paired gain image by image (mean ± standard error)."""
    evals = read_evals(run_dir)
    if len(evals) < 2:
        return []
    first, last = min(evals), max(evals)
    lines = [f"held-out evaluation, version {first} -> {last} ({len(evals[last])} images, "
             "same noise; paired gain ± standard error):"]
    for key in metric_keys(evals[last]):
        if key.endswith("/partial") or not key.startswith((f"{SHAPES}/", "reward/")):
            continue
        gain, se, n = paired_gain(evals[last], evals[first], key)
        a, b = (_overall(evals[v], key) for v in (first, last))
        lines.append(f"  {key.removeprefix('reward/'):<24} {a:.4f} -> {b:.4f}  "
                     f"({gain:+.4f} ± {se:.4f})")
    return lines


def _overall(rows: Sequence[dict], key: str) -> float:
    """A metric over one evaluation; ShapesEval strict as GenEval's mean over tags."""
    values = [(r.get("tag", ""), float(r[key])) for r in rows if r.get(key) is not None]
    if not key.endswith("/strict"):
        return float(np.mean([v for _, v in values]))
    tags = sorted({t for t, _ in values})
    return float(np.mean([np.mean([v for t, v in values if t == tag]) for tag in tags]))


def standard_error(d) -> float:
    """Standard error of the mean of ``d`` (NaN for fewer than two values)."""
    d = np.asarray(d, dtype=np.float64)
    return float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.nan
