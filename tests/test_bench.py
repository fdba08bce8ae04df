"""The benchmark suite (``python -m bench``): its short mode end to end, and its arithmetic.

No assertion is made on timings: they depend on the machine and on what else runs on it.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

from bench.report import pipeline_bound, simulate_loop, spread
from bench.service import Run, overlap_share, timeline_phases

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ["# Benchmarks", "## Summary", "## 1. Sampler efficiency",
            "## 2. Self-confidence scoring efficiency", "## 3. Update efficiency",
            "## 4. End to end", "## 5. Overheads", "## 6. Scaling", "## 7. GPU mode",
            "## Step-time breakdown", "## Where targets are missed", "## Other benchmarks"]


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


def test_simulated_loop_by_hand():
    # Scoring (3 s) longer than rollout + update: it is the bottleneck either way.
    assert simulate_loop(1.0, 3.0, 1.0, pumped=False) == 3.0
    assert simulate_loop(1.0, 3.0, 1.0, pumped=True) == 3.0
    # r = sc = 1, u = 2. As built, step starts S = 0, 4, 6, 9, 11, 14, ...: rollout k+1 lands
    # during every other update and waits for it, so steps alternate 2 s and 3 s. Pumped,
    # the update is the bottleneck: 2 s.
    assert simulate_loop(1.0, 1.0, 2.0, pumped=False) == 2.5
    assert simulate_loop(1.0, 1.0, 2.0, pumped=True) == 2.0


def test_pipeline_bound_by_hand():
    # One-thread stage times 1, 1, 2 s (all work 4 s, 2 s per core on 2 cores); the
    # sequential loop takes 2.5 s a step on 2 cores. As built max(2.5, 2) = 2.5 s, bound 1.0;
    # pumped max(2, 2) = 2 s, bound 1.25.
    e2e = {"cores": 2, "staleness": 1,
           "sequential_1": {"phases": {"rollout": 1.0, "scoring": 1.0, "update": 2.0},
                            "rate": 4.0},
           "sequential": [{"step_s": [2.5, 2.5], "rate": 6.4}]}
    b = pipeline_bound(e2e)
    assert b["built_s"] == 2.5 and b["pumped_s"] == 2.0
    assert math.isclose(b["bound_built"], 1.0) and math.isclose(b["bound_pumped"], 1.25)
    assert math.isclose(b["thread_scaling"], 1.6)


def test_spread_is_median_and_range():
    assert spread([3.0, 1.0, 2.0]) == "2.00 [1.00–3.00]"
    assert spread([0.5]) == "0.50"
    assert spread([]) == "-"
