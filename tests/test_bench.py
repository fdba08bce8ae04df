"""The benchmark suite (``python -m bench``): its short mode end to end, and its arithmetic.

No assertion is made on timings: they depend on the machine and on what else runs on it.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench.report_e2e import limit_text, pipeline_bound, step_limits
from bench.service import Run, overlap_share, timeline_phases
from bench.tables import spread

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ["# Benchmarks", "## Summary", "## 1. Sampler efficiency",
            "## 2. Self-confidence scoring efficiency", "## 3. Update efficiency",
            "## 4. End to end", "## 5. Overheads", "## 6. Scaling", "## 7. GPU mode",
            "## Step-time breakdown", "## Where targets are missed", "## Other benchmarks"]


@pytest.mark.slow  # minutes of Ray runs: `pytest -m slow` (README, Tests)
def test_quick_mode_writes_every_section(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "all", "--quick", "--set", "model.path=tiny-random",
         "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = out.read_text()
    for section in SECTIONS:
        assert section in text, f"{section!r} missing from the report"
    assert "python -m bench all --quick" in text  # the command that made it
    assert "torch 2" in text and "ray 2" in text  # the machine and versions
    results = json.loads((tmp_path / "docs/bench/results.json").read_text())
    # Every stage pair measured something positive; every run trained samples.
    for pair in results["stages"]["pairs"] + results["gpu"]["pairs"]:
        assert pair["ratio"] and all(r > 0 and math.isfinite(r) for r in pair["ratio"])
        assert pair["flops"] > 0
    e2e = results["e2e"]
    for run in e2e["service"] + e2e["sequential"] + [e2e["sequential_1"]] + results["scaling"]:
        assert run["rate"] > 0
    for phase in ("rollout", "scoring", "update"):
        assert e2e["service"][0]["phases"][phase] > 0  # Ray's timeline was read
    assert [p["mb"] for p in e2e["publish"]] == sorted(p["mb"] for p in e2e["publish"])
    if not results["gpu"]["measured_on_gpu"]:
        assert "not measured" in text and "no GPU" in text
    png = tmp_path / "docs/bench/step_breakdown.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _event(cat: str, tid: str, start: float, dur: float) -> dict:
    return {"cat": cat, "tid": tid, "ts": start * 1e6, "dur": dur * 1e6}


def test_timeline_phases_split_calls_into_compute_transport_and_publication():
    # One step of 10 s: a rollout call (1 s in, 3 s compute, 1 s out), a score call
    # that overlaps the update for 1 of its 2 s, and a weights publication of 0.5 s.
    events = [
        _event("task::RolloutWorker.sample", "r", 10, 5),
        _event("task:deserialize_arguments", "r", 10, 1),
        _event("task:execute", "r", 11, 3),
        _event("task:store_outputs", "r", 14, 1),
        _event("task::RolloutWorker.set_weights", "r", 19, 0.25),
        _event("task::ScorerActor.score", "s", 15, 2),
        _event("task:execute", "s", 15, 2),
        _event("task::LearnerRank.train_step", "l", 16, 3),
        _event("task:execute", "l", 16, 3),
        _event("task::LearnerRank.weights", "l", 19, 0.25),
        _event("task::ScorerActor.score", "s", 30, 1),  # outside the window: not counted
        _event("task:execute", "s", 30, 1),
    ]
    run = Run("service", "x", [], warmup=1, stamps=[10.0, 20.0, 25.0], metrics=[{}, {}, {}])
    timeline_phases(run, events)
    assert run.phases == {"rollout": 3.0, "scoring": 2.0, "update": 3.0, "transport": 2.0,
                          "publication": 0.5}
    assert run.extra["scoring_overlapping_update"] == 0.5
    assert run.utilisation == {"rollout actor 1": 0.5, "reward actor 1": 0.2,
                               "learner rank 1": 0.3}


def test_overlap_share_clips_to_the_window():
    gantt = [("a", "scoring", 0.0, 4.0), ("b", "update", 3.0, 10.0)]
    assert overlap_share(gantt, "scoring", "update", 2.0, 10.0) == 0.5  # 1 s of 2 s
    assert overlap_share(gantt, "rollout", "update", 0.0, 10.0) == 0.0


def simulated_step_s(r: float, sc: float, u: float, staleness: int, steps: int = 400) -> float:
    """``learner.main.train`` step by step, one actor per stage: seconds per step, steady state."""
    start = [0.0]  # step k starts (and launches step k + staleness) at start[k]
    rollout_end = [r * (i + 1) for i in range(staleness + 1)]  # launched at once at start[0]
    score_end = 0.0
    for k in range(steps):
        score_end = max(rollout_end[k], score_end) + sc  # dispatched as soon as it lands
        start.append(max(start[k], score_end) + u)  # gather, then the update
        rollout_end.append(max(start[k + 1], rollout_end[-1]) + r)  # step k + 1 + staleness
    half = steps // 2
    return (start[steps] - start[half]) / (steps - half)


def test_step_limits_by_hand():
    # Scoring (3 s) longer than the others and than the chain over two steps (5 / 2).
    assert max(step_limits(1.0, 3.0, 1.0, staleness=1).values()) == 3.0
    # Equal stages of 2 s: the chain (6 s) spans two steps at staleness 1, three at 2.
    assert step_limits(2.0, 2.0, 2.0, staleness=1)["chain"] == 3.0
    assert max(step_limits(2.0, 2.0, 2.0, staleness=2).values()) == 2.0


def test_step_limits_match_a_simulation_of_the_loop():
    times = [0.5, 1.0, 1.7, 3.0]
    for staleness in (1, 2):
        for r in times:
            for sc in times:
                for u in times:
                    bound = max(step_limits(r, sc, u, staleness).values())
                    assert math.isclose(simulated_step_s(r, sc, u, staleness), bound), \
                        (r, sc, u, staleness)


def test_pipeline_bound_by_hand():
    # One-thread stage times 1, 2, 1.5 s (4.5 s in all) at staleness 1 on 4 cores: the
    # chain over two steps (2.25 s) beats scoring (2 s) and the cores (4.5 / 4 s). The
    # sequential loop takes 2.7 s a step: bound 2.7 / 2.25 = 1.2.
    e2e = {"cores": 4, "staleness": 1,
           "sequential_1": {"phases": {"rollout": 1.0, "scoring": 2.0, "update": 1.5},
                            "rate": 4.0},
           "sequential": [{"step_s": [2.7, 2.7], "rate": 6.4}]}
    b = pipeline_bound(e2e)
    assert b["step_s"] == 2.25 and b["limit"] == ["chain"]
    assert math.isclose(b["bound"], 1.2) and math.isclose(b["thread_scaling"], 1.6)
    assert limit_text(b, e2e) == "the chain over 2 overlapped steps"
    # On 2 cores the cores tie with the chain, and both are named.
    e2e["cores"] = 2
    b = pipeline_bound(e2e)
    assert b["limit"] == ["chain", "cores"]
    assert limit_text(b, e2e) == ("the chain over 2 overlapped steps and all the work over "
                                  "the 2 cores")


def test_spread_is_median_and_range():
    assert spread([3.0, 1.0, 2.0]) == "2.00 [1.00–3.00]"
    assert spread([0.5]) == "0.50"
    assert spread([]) == "-"
