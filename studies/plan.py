"""The reproduction's plan: which runs exist, how they are evaluated, where results lie.

Read by :mod:`studies.reproduce` (which trains and evaluates the runs) and by
:mod:`studies.report` (which reads what the runs wrote); neither imports the other's
work, so the runner calls the report and the report never calls the runner.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from shapes.world import TAGS, load_split

REPO = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)
SPLITS = ("test", "unseen")
EVAL = dict(steps=40, cfg=4.5, seed=0)  # the evaluation protocol of README's base table
# One torch thread for evaluation: on the shared 2-core machine two threads sampled 32 eval
# images ~9x slower than one (54 s vs 6.3 s at load ~4.7: OpenMP threads waiting on each
# other while other processes hold the cores).
EVAL_THREADS = 1
# Rows 2-5 of issue #6: family -> (preset, what it trains on, training seeds).
FAMILIES = {
    "solace": ("configs/repro_solace.yaml", "SOLACE only", SEEDS),
    "shapes": ("configs/repro_shapes.yaml", "Flow-GRPO, ShapesEval", SEEDS),
    "shapes_solace": ("configs/repro_shapes_solace.yaml", "Flow-GRPO, ShapesEval + SOLACE", SEEDS),
    "colorful": ("configs/repro_colorful.yaml", "Flow-GRPO, colourfulness", (0,)),
    "colorful_solace": ("configs/repro_colorful_solace.yaml", "Flow-GRPO, colourfulness + SOLACE",
                        (0,)),
    # Not a row of the issue: the base policy frozen on the seed-0 samples, for the paired
    # comparison of training rewards (configs/repro_control.yaml); it evaluates as the base.
    "control": ("configs/repro_control.yaml", "frozen control (lr 1e-20)", (0,)),
}
REFERENCE = "solace_s0"  # the ablations' reference run: the SOLACE preset, seed 0
# Row 6: one field of the SOLACE preset changed per run (the preset's value is REFERENCE).
ABLATIONS = (
    ("self_confidence.guidance_scale", (4.5,)),  # CFG in the scoring velocity (preset: 1.0)
    ("self_confidence.policy", ("base",)),  # offline: the frozen base model scores
    ("grpo.train_fraction", (0.6, 1.0)),
    ("self_confidence.num_probes", (4, 16)),
    ("self_confidence.aggregation", ("official",)),
)
SHAPES_KEYS = ("shapes", "shapes_monitor")  # ShapesEval partial credit, as reward or monitor


@dataclass(frozen=True)
class Run:
    name: str
    family: str  # "base", a FAMILIES key, or "ablation"
    preset: str | None  # None: the base model, not trained
    overrides: tuple[str, ...] = ()
    seed: int = 0


def run_table() -> list[Run]:
    """Every run of the reproduction, in the order they are run."""
    runs = [Run("base", "base", None)]
    for family, (preset, _, seeds) in FAMILIES.items():
        runs += [Run(f"{family}_s{s}", family, preset, (), s) for s in seeds]
    for field, values in ABLATIONS:
        runs += [Run(ablation_name(field, v), "ablation", FAMILIES["solace"][0],
                     (f"{field}={v}",), 0) for v in values]
    return runs


def by_name(name: str) -> Run:
    return next(r for r in run_table() if r.name == name)


def ablation_name(field: str, value) -> str:
    return f"abl_{field.rsplit('.', 1)[-1]}_{value}"


def eval_rows(split: str, limit: int | None) -> list[dict]:
    """The split's prompts, or the first ``limit`` of each tag."""
    rows = load_split(split)
    if limit is None:
        return rows
    return [r for tag in TAGS for r in [r for r in rows if r["tag"] == tag][:limit]]


def read_eval(run_dir: Path, settings: dict) -> dict | None:
    """The run's eval.json if it was made with ``settings``."""
    path = run_dir / "eval.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    return saved if saved.get("eval") == settings else None


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl, one row per step (a resumed run's repeated steps: the last one)."""
    path = run_dir / "metrics.jsonl"
    by_step = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        row = json.loads(line)
        by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]
