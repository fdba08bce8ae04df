"""Faults an operator meets, on the tiny model: a driver stopped by SIGTERM or killed by
SIGKILL and resumed, a rollout actor killed mid-run. Each run is compared step by step
and sample by sample with the same configuration run without a fault.

Runs use ``max_staleness: 1`` (the default), the case where a checkpoint must also carry
the step sampled ahead: its prompts and the older weights it was sampled with.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray

from learner.config import load_config
from learner.main import (
    RunFailed,
    check_finite_advantages,
    latest_checkpoint,
    pool_metrics,
    train,
)
from learner.rundir import LOGS, log_sizes, restore_logs
from learner.stopping import RunStopped, StopSignals

REPO = Path(__file__).resolve().parents[1]
STEPS = 4
OVERRIDES = [
    "model.path=tiny-random", "grpo.group_size=4", "grpo.prompts_per_step=2",
    "grpo.micro_batch=8", "sampler.num_steps=6", "self_confidence.num_probes=4",
    "metrics.port=0", "metrics.grid_every=100", "reward_pool.timeout_s=120", "eval.every=0",
    f"train.steps={STEPS}", "train.save_every=2", "learner.max_staleness=1",
]
# What differs between two runs of one seed for reasons other than their numbers.
VOLATILE = ("time", "timing/", "rollout/samples_per_s", "reward/pool/", "system/queue_depth")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=8, namespace="solace", include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def uninterrupted(local_ray, tmp_path_factory) -> Path:
    """The reference: the configuration run start to end with no fault."""
    cfg = load_config(REPO / "configs/tiny_solace.yaml",
                      OVERRIDES + ["reward_pool.control_name=test-rel-reference"])
    return train(cfg, tmp_path_factory.mktemp("reference") / "run")


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _numbers(run_dir: Path) -> tuple[list[dict], list[dict]]:
    metrics = [{k: v for k, v in m.items() if not k.startswith(VOLATILE)}
               for m in _lines(run_dir / "metrics.jsonl")]
    return metrics, _lines(run_dir / "samples.jsonl")


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """Every step's metrics and every sample row as the reference's, each exactly once."""
    metrics, samples = _numbers(run_dir)
    ref_metrics, ref_samples = _numbers(reference)
    assert [m["step"] for m in metrics] == list(range(STEPS))
    assert len(samples) == len(ref_samples) == STEPS * 2 * 4
    for got, want in zip(metrics, ref_metrics, strict=True):
        assert got.keys() == want.keys()
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-7), (got["step"], key)
    key = lambda r: (r["step"], r["prompt_id"], r["seed"])  # noqa: E731
    assert sorted(map(key, samples)) == sorted(map(key, ref_samples))
    ref_rows = {key(r): r for r in ref_samples}
    for row in samples:
        want = ref_rows[key(row)]
        assert row.keys() == want.keys()
        for k, v in want.items():
            if isinstance(v, float):
                assert row[k] == pytest.approx(v, rel=1e-6, abs=1e-7), (key(row), k)
            else:
                assert row[k] == v, (key(row), k)


def _resumed_driver(run_dir: Path, log: Path) -> subprocess.Popen:
    """``python -m learner.main --resume RUN_DIR`` as an operator starts it, on its own
    local Ray."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO)
    args = [sys.executable, "-m", "learner.main", "--resume", str(run_dir)]
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for_lines(proc: subprocess.Popen, path: Path, n: int, log: Path,
                    timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while len(_lines(path)) < n:
        assert proc.poll() is None, f"the driver ended early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {n} lines in {path}:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


def _kill_group(proc: subprocess.Popen) -> None:
    """The driver's session: its local Ray's processes too, so none outlives the test."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def _session_processes(sid: int) -> list[str]:
    """Live processes of the session ``sid`` (a driver started with start_new_session)."""
    import psutil

    out = []
    for p in psutil.process_iter(["name", "status"]):
        with contextlib.suppress(OSError, psutil.Error):
            if os.getsid(p.pid) == sid and p.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {p.info['name']}")
    return out


def test_sigterm_then_sigkill_then_resume_gives_the_uninterrupted_run(uninterrupted, tmp_path):
    """Stopped by SIGTERM, resumed by ``python -m learner.main --resume`` and killed there by
    SIGKILL, resumed again: the run's metrics and samples are the uninterrupted run's, step
    for step, each sample exactly once."""
    run_dir, log = tmp_path / "faulty", tmp_path / "driver.log"
    metrics = run_dir / "metrics.jsonl"
    cfg = load_config(REPO / "configs/tiny_solace.yaml",
                      OVERRIDES + ["reward_pool.control_name=test-rel-faulty"])

    def operator():  # SIGTERM to this process, as `ray job stop` sends to the driver
        deadline = time.monotonic() + 300
        while len(_lines(metrics)) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=operator, daemon=True)
    thread.start()
    with pytest.raises(RunStopped) as stopped:
        train(cfg, run_dir)
    thread.join(timeout=30)
    assert stopped.value.status == 128 + signal.SIGTERM  # the CLI's exit status
    assert "stopped by SIGTERM" in str(stopped.value) and "--resume" in str(stopped.value)
    done = len(_lines(metrics))
    assert 1 <= done < STEPS
    # The checkpoint covers exactly the steps logged: nothing to cut, nothing missing.
    assert latest_checkpoint(run_dir).name == f"step_{done:06d}" == stopped.value.checkpoint.name

    proc = _resumed_driver(run_dir, log)
    try:
        # Step 2 logged, the next checkpoint (every 2 steps) not yet written: the log holds
        # lines past the last checkpoint when the driver dies.
        _wait_for_lines(proc, metrics, 3, log)
        os.kill(proc.pid, signal.SIGKILL)  # the driver alone, as the OOM killer would
        proc.wait(timeout=60)
        # Its local Ray goes with it (learner.reaper): no agent or actor left running.
        deadline = time.monotonic() + 30
        while _session_processes(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _session_processes(proc.pid), _session_processes(proc.pid)
    finally:
        _kill_group(proc)
    train(load_config(run_dir / "config.yaml"), run_dir, resume=True)
    assert_same_run(run_dir, uninterrupted)


def _pids(title: str, before: frozenset[int] = frozenset()) -> list[int]:
    """PIDs of live actors of class ``title``, found by the process title Ray gives them,
    leaving out ``before`` (an earlier run's, still exiting). Start times cannot tell: Ray
    turns idle workers it started earlier into new actors."""
    import psutil

    return [p.pid for p in psutil.process_iter(["cmdline"])
            if p.info["cmdline"] and p.info["cmdline"][0].startswith(f"ray::{title}")
            and p.pid not in before]


def test_a_rollout_actor_killed_is_restarted_and_a_dead_learner_stops_resumably(uninterrupted,
                                                                               tmp_path):
    """A rollout actor dies mid-run: it is restarted and the lost call sampled again, so
    the run goes on with nothing lost. Then the DeepSpeed rank dies: the run stops with a
    message naming the update and the checkpoint that stands, and ``--resume`` from it
    ends with the uninterrupted run's numbers."""
    cfg = load_config(REPO / "configs/tiny_solace.yaml",
                      OVERRIDES + ["reward_pool.control_name=test-rel-actor-kill"])
    run_dir = tmp_path / "actor-kill"
    killed: dict[str, int] = {}
    earlier = frozenset(_pids("RolloutWorker") + _pids("LearnerRank"))

    def ready(title: str) -> bool:
        if title == "RolloutWorker":  # step 0 is logged: step 1 is sampling
            return len(_lines(run_dir / "metrics.jsonl")) >= 1
        # the step-2 checkpoint is whole: the next call to the learner is step 2's update
        # (killed earlier, the rank would die inside that checkpoint and leave none)
        return latest_checkpoint(run_dir) is not None

    def operator():
        for title in ("RolloutWorker", "LearnerRank"):
            deadline = time.monotonic() + 300
            while not ready(title) and time.monotonic() < deadline:
                time.sleep(0.05)
            pids = _pids(title, earlier)
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed[title] = pids[0]

    thread = threading.Thread(target=operator, daemon=True)
    thread.start()
    with pytest.raises(RunFailed) as failed:
        train(cfg, run_dir)
    thread.join(timeout=30)
    assert set(killed) == {"RolloutWorker", "LearnerRank"}, killed
    message = str(failed.value)
    assert "learner" in message and "--resume" in message and "checkpoint" in message, message
    # Steps 0-1 went through the rollout actor's death; the learner's took step 2's update.
    assert len(_lines(run_dir / "metrics.jsonl")) == 2
    assert "update of step 2" in message, message
    train(load_config(run_dir / "config.yaml"), run_dir, resume=True)
    assert_same_run(run_dir, uninterrupted)


def test_restore_logs_cuts_back_to_the_checkpoint_and_a_fresh_start_clears(tmp_path):
    for name in LOGS:
        (tmp_path / name).write_text('{"step": 0}\n')
    sizes = log_sizes(tmp_path)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 1}\n{"step": 2, "half')  # written after the checkpoint, cut short
    restore_logs(tmp_path, sizes)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 0}\n'
    restore_logs(tmp_path, None)  # no checkpoint: the run starts from step 0
    assert not any((tmp_path / name).exists() for name in LOGS)


def test_the_first_signal_only_asks_to_stop():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals(timeout_s=30) as stop:
        assert not stop()
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not stop() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stop() and stop.exit_status == 143 and stop.name() == "SIGTERM"
        stop.closed()  # else its watchdog ends this process train.stop_timeout_s later
    assert signal.getsignal(signal.SIGTERM) is before  # the handler goes with the block


def test_a_non_finite_advantage_stops_before_the_update_naming_the_reward():
    rewards = {"self_confidence": np.array([0.1, 0.2]), "shapes": np.array([np.nan, 1.0])}
    with pytest.raises(RuntimeError, match=r"step 3: 1 non-finite.*\['shapes'\]"):
        check_finite_advantages(3, np.array([np.nan, 0.5]), rewards)
    check_finite_advantages(3, np.array([0.1, -0.1]), rewards)  # finite: no error


def test_every_reward_pool_reports_under_its_own_name():
    class Pool:
        def metrics(self):
            return {"reward/pool/retries": 2.0, "reward/pool/size": 1}

    assert pool_metrics("self_confidence", Pool()) == {"reward/pool/retries": 2.0,
                                                       "reward/pool/size": 1}
    assert pool_metrics("shapes", Pool()) == {"reward/shapes/pool/retries": 2.0,
                                              "reward/shapes/pool/size": 1}


BAD_INPUTS = """
import contextlib, io, json, sys
import ray
from learner.main import main
out = {}
for case, args in json.loads(sys.argv[1]).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            main(args)
            status = 0
        except SystemExit as e:
            status = e.code
        except BaseException as e:  # a traceback the user would have seen
            status, err = -1, io.StringIO(f"Traceback: {type(e).__name__}: {e}")
    out[case] = {"status": status, "stderr": err.getvalue(), "ray": ray.is_initialized()}
print(json.dumps(out))
"""


def test_bad_input_is_one_plain_message_and_status_2_before_ray(tmp_path):
    """Each bad input: exit 2, a message naming the field or file:line and the fix, no
    traceback, and Ray never started (one interpreter runs every case, in turn)."""
    import socket

    bad = tmp_path / "prompts.jsonl"
    bad.write_bytes(b'{"prompt": "a red circle"}\n{"prompt": "caf\xe9"}\n')  # Latin-1
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    cases = {
        "model": (["--set", f"model.path={tmp_path / 'nowhere'}"], "model.path"),
        "prompts": (["--set", f"train.prompts={bad}"], f"{bad}:2"),
        "resume": (["--resume", str(tmp_path)], "no run there"),
        "port": (["--set", f"metrics.port={port}"], "metrics.port"),
        "nan": (["--set", "self_confidence.weight=.nan"], "self_confidence.weight"),
        "seed": (["--set", "seed=-5"], "seed"),
    }
    run = subprocess.run(
        [sys.executable, "-c", BAD_INPUTS, json.dumps({k: a for k, (a, _) in cases.items()})],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    taken.close()
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    for case, (_, expect) in cases.items():
        got = results[case]
        assert got["status"] == 2, (case, got)
        assert expect in got["stderr"] and "Traceback" not in got["stderr"], (case, got)
        assert not got["ray"], (case, "Ray was started")


def test_the_reaper_kills_what_a_dead_driver_leaves_behind():
    """A stand-in driver starts a child that outlives it (as Ray's agents outlive a
    SIGKILLed driver); once the driver is gone, learner.reaper kills the child."""
    from learner import reaper

    driver = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'],"
        " start_new_session=True)\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(600)\n")], stdout=subprocess.PIPE, text=True)
    child = int(driver.stdout.readline())
    watcher = reaper.start(driver.pid)
    time.sleep(2.5)  # the watcher notes the child
    driver.kill()
    driver.wait()
    watcher.wait(timeout=30)
    import psutil

    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
