"""The prepared GPU check (``python -m bench.gpu_check``) in its CPU mode, at the smoke size.

It runs without Ray, DeepSpeed or matplotlib (the lent GPU machines lack them), says that
its figures are not GPU figures and what a GPU run measures, and reports every stage.
"""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_cpu_mode_runs_without_ray_or_deepspeed_and_says_what_a_gpu_measures(tmp_path):
    out = tmp_path / "gpu_check.json"
    code = ("import sys; from bench.gpu_check import main; "
            f"main(['--cpu', '--repeats', '1', '--out', {str(out)!r}]); "
            "heavy = sorted({m.split('.')[0] for m in sys.modules} "
            "& {'ray', 'deepspeed', 'matplotlib'}); print('HEAVY', heavy)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, check=True)
    assert "HEAVY []" in run.stdout
    assert "NOT GPU FIGURES" in run.stdout and "first ratio" in run.stdout
    r = json.loads(out.read_text())
    assert r["measured_on_gpu"] is False and r["dtype"] == "float32"
    assert set(r["stages"]) == {"sampling", "scoring", "scoring, merged LoRA", "update",
                                "update, recompute old log-probs"}
    for stage in r["stages"].values():
        assert stage["images"] > 0 and all(t > 0 for t in stage["seconds"])
    # on-policy in fp32 on a CPU the ratio is 1 either way; with the recompute by construction
    assert r["stages"]["update, recompute old log-probs"]["first_ratio_max_dev"] == 0.0
    assert r["stages"]["update"]["first_ratio_max_dev"] < 1e-5
    est = r["estimate_gib"]
    assert 0 < est["weights"] < est["sampling"] and est["weights"] < est["update"]


def test_the_carried_wheels_are_the_locks_and_torch_is_not_among_them():
    from bench.gpu_check import CARRY, needed_packages

    lock = {line.split("==")[0].lower().replace("_", "-")
            for line in (REPO / "requirements.lock").read_text().splitlines() if "==" in line}
    needed = {p.split("==")[0].lower().replace("_", "-") for p in needed_packages()}
    carried = {n.lower().replace("_", "-") for n in CARRY}
    assert carried <= needed <= lock
    assert {"diffusers", "peft", "pydantic"} <= carried and "torch" not in needed
