"""docs/results.md and its figures, from the run directories of ``studies.reproduce``.

Every number is read from a run's ``eval.json``, ``metrics.jsonl``, ``config.yaml``,
``train_seconds.json`` and ``eval_images.npz``; the hand-written "Reading" section of an
existing report is kept when the file is rewritten.
"""

from __future__ import annotations

import json
import os
import platform
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from learner.charts import line_charts
from learner.config import load_config
from policy.grid import image_grid, prompt_lines
from shapes.world import TAGS
from studies.plan import (
    EVAL,
    FAMILIES,
    REFERENCE,
    SHAPES_KEYS,
    SPLITS,
    by_name,
    eval_rows,
    read_metrics,
    run_table,
)
from studies.trend import by_sample, read_samples

# --- tables ------------------------------------------------------------------------


def cell(values: Sequence[float]) -> str:
    """``mean ± sample std`` of several values, the value of one, ``-`` of none."""
    if len(values) == 0:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def summary_columns(evals: Sequence[dict], split: str) -> list[str]:
    tags = [t for t in TAGS if any(t in e[split] for e in evals)]
    return tags + ["overall", "partial"]


def tag_table(groups: Sequence[tuple[str, Sequence[dict]]], split: str) -> str:
    """One row per (label, evals): each ShapesEval column as mean ± std over the evals."""
    columns = summary_columns([e for _, evals in groups for e in evals], split)
    rows = [[label, str(len(evals))]
            + [cell([e[split][c] for e in evals if c in e[split]]) for c in columns]
            for label, evals in groups if evals]
    return markdown_table(["configuration", "seeds", *columns], rows)


def shapes_curve(metrics: Sequence[dict]) -> list[float]:
    """ShapesEval partial credit of each step's training samples (reward or monitor)."""
    for name in SHAPES_KEYS:
        key = f"reward/{name}/mean"
        if metrics and key in metrics[0]:
            return [m.get(key, np.nan) for m in metrics]
    return []


def reward_curves(metrics: Sequence[dict]) -> dict[str, list[float]]:
    """Every reward's per-step mean, by name; the ShapesEval partial as ``shapes``."""
    names = sorted({k.split("/")[1] for m in metrics for k in m
                    if re.fullmatch(r"reward/[^/]+/mean", k)} - set(SHAPES_KEYS))
    curves = {n: [m.get(f"reward/{n}/mean", np.nan) for m in metrics] for n in names}
    shapes = shapes_curve(metrics)
    return curves | ({"shapes": shapes} if shapes else {})


def window(n: int) -> int:
    """Steps averaged for a 'start' or 'final' value: a fifth of the run, 1 to 10."""
    return max(1, min(10, n // 5))


def start_final(curve: Sequence[float]) -> tuple[float, float]:
    w = window(len(curve))
    return float(np.nanmean(curve[:w])), float(np.nanmean(curve[-w:]))


def reward_table(groups: Sequence[tuple[str, Sequence[dict]]]) -> str:
    """Training rewards per (label, metrics of each seed): ``start -> final`` means."""
    curves = [(label, [reward_curves(m) for m in runs]) for label, runs in groups]
    names = sorted({n for _, cs in curves for c in cs for n in c})
    rows = []
    for label, cs in curves:
        row = [label]
        for n in names:
            pairs = [start_final(c[n]) for c in cs if c.get(n)]
            row.append(f"{np.mean([p[0] for p in pairs]):.3f} → {cell([p[1] for p in pairs])}"
                       if pairs else "-")
        rows.append(row)
    return markdown_table(["configuration", *names], rows)


# --- figures -----------------------------------------------------------------------


def seed_mean(curves: Sequence[Sequence[float]]) -> list[float]:
    """Per-step mean over seeds (runs of different lengths: over those that have the step)."""
    n = max((len(c) for c in curves), default=0)
    padded = np.full((len(curves), n), np.nan)
    for k, c in enumerate(curves):
        padded[k, :len(c)] = c
    with np.errstate(all="ignore"):
        return [float(np.nanmean(col)) if np.isfinite(col).any() else np.nan for col in padded.T]


def seeds_label(n: int) -> str:
    return "seed 0" if n == 1 else f"mean of {n} seeds"


def training_panels(families: dict[str, list[list[dict]]]) -> list:
    """A panel per (family, trained reward), and ShapesEval of training samples for all."""
    panels, shapes = [], []
    for family, runs in families.items():
        curves = [reward_curves(m) for m in runs]
        weights = {k.split("/")[1] for m in runs for k, v in (m[0] if m else {}).items()
                   if k.endswith("/weight") and v != 0}
        for name in sorted(weights - set(SHAPES_KEYS)):
            panels.append((f"{family}: {name} ({seeds_label(len(runs))})",
                           [(name, seed_mean([c[name] for c in curves if name in c]))]))
        if weights & {"shapes"}:
            panels.append((f"{family}: shapes, ShapesEval partial ({seeds_label(len(runs))})",
                           [("shapes", seed_mean([c["shapes"] for c in curves]))]))
        shapes.append((family, seed_mean([c.get("shapes", []) for c in curves])))
    panels.append(("ShapesEval partial credit of training samples", shapes))
    return panels


def before_after(path: Path, base: dict, run: dict, label: str, per_tag: int = 1,
                 unseen: int = 2) -> Path:
    """Base (top) and ``run`` (bottom) on the same prompts from the same noise.

    The prompts: the first ``per_tag`` of each tag of the test split and the first
    ``unseen`` of the unseen split; frames green where ShapesEval's strict verdict holds.
    """
    picks = []
    for split, tags, n in (("test", TAGS, per_tag), ("unseen", (None,), unseen)):
        split_tags = list(base[f"{split}/tags"])
        for tag in tags:
            idx = [i for i, t in enumerate(split_tags) if tag is None or t == tag][:n]
            picks += [(split, i) for i in idx]
    images, captions, frames = [], [], []
    for who, data in (("base", base), ("after", run)):
        for split, i in picks:
            if data[f"{split}/prompts"][i] != base[f"{split}/prompts"][i]:
                raise ValueError(f"{label}: evaluated on other prompts than the base model")
            images.append(data[f"{split}/images"][i])
            captions.append(prompt_lines(str(data[f"{split}/prompts"][i]))
                            + [f"{who} {data[f'{split}/partial'][i]:.2f}"])
            frames.append((0, 160, 0) if data[f"{split}/strict"][i] else (200, 0, 0))
    grid = image_grid(np.stack(images), captions, frames, columns=len(picks))
    image = Image.new("RGB", (grid.width, grid.height + 18), "white")
    ImageDraw.Draw(image).text(
        (4, 4), f"top: base model; bottom: {label}; same noise; last caption line: partial "
        "credit; frame green: correct", fill="black")
    image.paste(grid, (0, 18))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


# --- the report --------------------------------------------------------------------

READING = "## Reading"
READING_TODO = (f"{READING}\n\nTODO(lead): written by hand after the real run; "
                "`python -m studies.reproduce` keeps this section when it rewrites the file.\n")


def kept_reading(report: Path) -> str:
    """The Reading section of an existing report (written by hand), else the placeholder."""
    text = report.read_text() if report.is_file() else ""
    return text[text.index(READING):] if READING in text else READING_TODO


def fmt_load(load: Sequence[float]) -> str:
    return "/".join(f"{v:.1f}" for v in load)


def header_section(argv: Sequence[str], evals: dict[str, dict], runs_dir: Path, wall_s: float,
                   load: tuple[Sequence[float], Sequence[float]]) -> str:
    """The command, the machine, the times and the protocol, from the runs' files."""
    settings = evals["base"]["eval"]
    sizes = {s: len(eval_rows(s, settings["limit"])) for s in SPLITS}
    configs = [load_config(runs_dir / n / "config.yaml") for n in evals if n != "base"]
    train_s = sum(json.loads((runs_dir / n / "train_seconds.json").read_text())["seconds"]
                  for n in evals if (runs_dir / n / "train_seconds.json").is_file())
    eval_s = sum(e["eval_seconds"] for e in evals.values())
    missing = [r.name for r in run_table() if r.name not in evals]
    lines = [
        "# Reproduction: SOLACE on the tiny shapes model (issue #6)", "",
        "Written by `studies/reproduce.py` from the run directories; edit only the Reading "
        "section.", "", "## How it was run", "", "```",
        " ".join(["python -m studies.reproduce", *argv]), "```", "",
        f"* machine: {platform.platform()}, {os.cpu_count()} logical CPUs, no GPU used; load "
        f"average (1/5/15 min) {fmt_load(load[0])} at the start, {fmt_load(load[1])} at the end",
        f"* wall time of this invocation: {wall_s / 60:.1f} min; recorded by the {len(evals)} "
        f"runs: training {train_s / 60:.1f} min, evaluation {eval_s / 60:.1f} min (a run "
        "done before is skipped, so the two differ after a resumed reproduction)",
        f"* training: {', '.join(sorted({f'{c.train.steps} steps' for c in configs}))} of "
        f"{configs[0].grpo.prompts_per_step} prompts x {configs[0].grpo.group_size} samples "
        "(configs/repro_*.yaml)" if configs else "* training: none",
        f"* evaluation: ShapesEval, {EVAL['steps']}-step ODE, CFG {EVAL['cfg']}, eval seed "
        f"{EVAL['seed']} for every model (the same initial noise), {settings['per_prompt']} "
        f"image(s) per prompt; test {sizes['test']} prompts, unseen {sizes['unseen']}",
        "* cells: mean ± sample std over training seeds; one value where there is one seed. "
        "The base model is evaluated once: its samples depend on the eval seed only",
    ]
    return "\n".join(lines + ([f"* not run yet: {', '.join(missing)}"] if missing else []))


def shapes_section(groups: Sequence[tuple[str, list[dict]]], seeds: Sequence[tuple[str, list[dict]]]
                   ) -> str:
    parts = []
    for split in SPLITS:
        parts += [f"## ShapesEval, {split} split", "", "Strict accuracy per tag; overall: the "
                  "mean over tags (GenEval's); partial: mean partial credit.", "",
                  tag_table(groups, split), ""]
    parts += ["### Per seed", ""]
    for split in SPLITS:
        parts += [f"{split}:", "", tag_table(seeds, split), ""]
    return "\n".join(parts)


def training_section(groups: Sequence[tuple[str, list[str]]], metrics: dict[str, list[dict]],
                     out: Path) -> str:
    """The start/final reward table and training.png (one panel per family's reward)."""
    steps = max((len(m) for m in metrics.values()), default=0)
    line_charts(out / "training.png", training_panels(
        {f: [metrics[n] for n in names] for f, names in groups}), smooth=window(steps))
    return "\n".join([
        "## Training rewards", "",
        f"Per-step batch means, `start → final` (means of the first and last {window(steps)} "
        "steps; final as mean ± std over seeds). `shapes` is ShapesEval partial credit of the "
        "training samples: the reward, or the weight-0 `shapes_monitor`.", "",
        reward_table([(f, [metrics[n] for n in names]) for f, names in groups]), "",
        f"![rewards over training]({out.name}/training.png)", "",
        f"Faint: each step's batch mean (over seeds); bold: the trailing mean of {window(steps)} "
        "steps.", ""])


CONTROL = "control_s0"
# (column, the reward's names in a trained run, its name in the control)
PAIRED = (("self_confidence", ("self_confidence",), "self_confidence"),
          ("ShapesEval partial", SHAPES_KEYS, "shapes_monitor"),
          ("ShapesEval strict", SHAPES_KEYS, "shapes_monitor"),
          ("colourfulness", ("colorfulness",), "colorfulness"))


def paired_cell(run: list[dict], control: list[dict], names: Sequence[str], control_name: str,
                first_step: int, strict: bool = False) -> str:
    """``mean ± se`` of run - control over the samples both scored from ``first_step`` on."""
    key = next((f"reward/{n}" for n in names if any(f"reward/{n}" in r for r in run[:1])), None)
    if key is None or not any(f"reward/{control_name}" in r for r in control[:1]):
        return "-"
    a, b = by_sample(run, key), by_sample(control, f"reward/{control_name}")
    shared = [k for k in sorted(a.keys() & b.keys()) if k[0] >= first_step]
    if len(shared) < 2:
        return "-"
    if strict:  # partial credit is 1 exactly when the image is strictly correct
        d = np.array([float(a[k] == 1.0) - float(b[k] == 1.0) for k in shared])
    else:
        d = np.array([a[k] - b[k] for k in shared])
    return f"{d.mean():+.3f} ± {d.std(ddof=1) / np.sqrt(len(d)):.3f}"


def paired_section(names: Sequence[str], runs_dir: Path) -> str:
    """Seed-0 runs minus the frozen control, sample by sample, over the second half."""
    control = read_samples(runs_dir / CONTROL)
    ctrl_sc = load_config(runs_dir / CONTROL / "config.yaml").self_confidence
    steps = max(r["step"] for r in control) + 1
    rows = []
    for name in names:
        run = read_samples(runs_dir / name)
        sc = load_config(runs_dir / name / "config.yaml").self_confidence
        # Self-confidence with CFG or z-scored is another quantity. Scored by the frozen
        # base (policy: base) it is the control's own quantity: the control is the base.
        same_sc = (sc.guidance_scale, sc.aggregation) == (ctrl_sc.guidance_scale,
                                                          ctrl_sc.aggregation)
        rows.append([f"`{name}`"] + [
            paired_cell(run, control, names_ if column != "self_confidence" or same_sc else (),
                        control_name, steps // 2, strict=column == "ShapesEval strict")
            for column, names_, control_name in PAIRED])
    return "\n".join([
        "## Paired with the frozen control: what training changed on its own samples", "",
        f"A seed fixes each step's prompts and every sample's noise, so each seed-0 run and "
        f"`{CONTROL}` (the base policy, frozen: configs/repro_control.yaml) score the same "
        "(prompt, noise) pairs and differ only in the policy that denoised them. Cells: mean "
        f"of run minus control over the samples of steps {steps // 2}-{steps - 1} (the second "
        "half), ± its standard error over samples; strict: the change in the share of "
        "strictly correct images. `-`: the run does not record that reward, or records "
        "another quantity under its name (self-confidence with CFG, or z-scored). `python -m studies.trend runs/reproduce/<run> --against "
        f"runs/reproduce/{CONTROL} --reward <name>` gives the same per block of steps.", "",
        markdown_table(["run", *[c for c, _, _ in PAIRED]], rows), ""])


def ablation_section(names: Sequence[str], evals: dict[str, dict], metrics: dict[str, list[dict]],
                     out: Path) -> str:
    """One row per ablation run (``names[0]`` is the reference), and ablations.png."""
    rows = []
    for name in names:
        change = by_name(name).overrides[0].replace("=", " = ") if name != REFERENCE else "(preset)"
        finals = {k: start_final(v)[1] for k, v in reward_curves(metrics[name]).items()}
        rows.append([change, f"`{name}`"] + [f"{evals[name][s]['overall']:.3f}" for s in SPLITS]
                    + [f"{finals[k]:.3f}" if k in finals else "-"
                       for k in ("self_confidence", "shapes")])
    line_charts(out / "ablations.png", [
        ("ShapesEval partial credit of training samples",
         [(n, shapes_curve(metrics[n])) for n in names]),
        ("self_confidence reward", [(n, reward_curves(metrics[n]).get("self_confidence", []))
                                    for n in names])], columns=1,
                smooth=window(max(len(metrics[n]) for n in names)))
    return "\n".join([
        f"## Ablations (one seed each, against `{REFERENCE}`)", "",
        markdown_table(["change", "run", "test overall", "unseen overall", "final self_confidence",
                        "final shapes (training samples)"], rows), "",
        "The self_confidence values of the CFG, base-policy and official-aggregation runs are "
        "another quantity (another velocity, another model, per-step z-scores), not comparable "
        "with the others.", "",
        f"![ablations over training]({out.name}/ablations.png)", ""])


def grids_section(names: Sequence[str], runs_dir: Path, out: Path, shown: Sequence[str]) -> str:
    """grid_<run>.png for every trained run; ``shown`` are embedded in the report."""
    images = {n: dict(np.load(runs_dir / n / "eval_images.npz")) for n in ["base", *names]}
    parts = ["## Before and after, from the same noise", ""]
    for name in names:
        before_after(out / f"grid_{name}.png", images["base"], images[name], name)
        if name in shown:
            parts += [f"`{name}`:", "", f"![{name}]({out.name}/grid_{name}.png)", ""]
    return "\n".join(parts + [f"Every trained run has its grid in `{out.name}/grid_<run>.png`.", ""])


def write_report(report: Path, out: Path, runs_dir: Path, evals: dict[str, dict],
                 argv: Sequence[str], wall_s: float, load: tuple) -> Path:
    """``<out>.md`` and the figures in ``out``, from the runs' eval.json, metrics, images."""
    runs = [r for r in run_table() if r.name in evals]
    metrics = {r.name: read_metrics(runs_dir / r.name) for r in runs}
    families = [(f, [r.name for r in runs if r.family == f]) for f in FAMILIES]
    families = [(f, names) for f, names in families if names]
    groups = [("base model", [evals["base"]])] + [
        (f"{FAMILIES[f][1]} (`{f}`)", [evals[n] for n in names]) for f, names in families]
    seeds = [(n, [evals[n]]) for _, names in families for n in names]
    ablations = [r.name for r in runs if r.family == "ablation"]
    trained = [r.name for r in runs if r.preset is not None]
    sections = [header_section(argv, evals, runs_dir, wall_s, load), shapes_section(groups, seeds)]
    if families:
        sections.append(training_section(families, metrics, out))
    paired = [n for n in trained if n != CONTROL and by_name(n).seed == 0]
    if CONTROL in evals and paired:
        sections.append(paired_section(paired, runs_dir))
    if ablations and REFERENCE in evals:
        sections.append(ablation_section([REFERENCE, *ablations], evals, metrics, out))
    if trained:
        shown = [f"{f}_s0" for f in FAMILIES if f != "control"]
        sections.append(grids_section(trained, runs_dir, out, shown))
    sections.append(kept_reading(report))
    out.mkdir(parents=True, exist_ok=True)
    report.write_text("\n\n".join(sections))
    return report
