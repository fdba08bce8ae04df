"""Acceptance: ``ray start --head``, then ``ray job submit --working-dir . -- python -m learner.main``.

The issue: on one machine, start a Ray head with ``ray start --head`` and submit a short
training run with ``ray job submit``; it must succeed with Ray's token authentication on.

What Ray 2.60 does about auth (found by running it here; docs/cluster.md has the details):

* ``ray start --head`` turns token auth on when ``RAY_AUTH_MODE`` is unset *and* a token
  already exists (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``, which
  any earlier local ``ray.init()`` creates); on a machine that never had one it starts
  without auth. So this test does not rely on the default: it sets ``RAY_AUTH_MODE=token``
  and a token file of its own (``RAY_AUTH_TOKEN_PATH``) and never reads or writes
  ``~/.ray``.
* The ``ray job`` CLI sends the token only when ``RAY_AUTH_MODE=token`` is set in *its*
  environment (``RAY_AUTH_TOKEN`` alone is not enough); without it the dashboard answers
  401 "Missing authentication token". ``--headers '{"Authorization": "Bearer <token>"}'``
  also works.
* The job's driver inherits the head's environment (``RAY_AUTH_MODE``, the token path and
  ``PATH``), so ``ray.init()`` inside the job joins with no extra setup, and a plain
  ``python`` in the entrypoint is the venv's because ``ray start`` ran with the venv's
  ``bin`` first on ``PATH`` (as ray_cluster.yaml does on the cluster).

Isolation: the head gets its own short temp dir and free ports, and is run as
``ray start --block`` in a new session; teardown sends it SIGTERM, which makes Ray stop
exactly the processes of this head, and then kills any of its descendants still alive.
``ray stop`` is never run: it stops every Ray instance of this user on the machine,
including other test sessions' clusters.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv running the tests
RAY = BIN / "ray"
# Never uploaded with the working dir (Ray 2.60 already skips .git/.venv and .gitignore'd
# paths by default; listing them keeps the upload small under older defaults too).
EXCLUDES = [".venv", ".git", "runs", ".pytest_cache", ".ruff_cache", "**/__pycache__"]
START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 900

pytestmark = pytest.mark.skipif(not RAY.exists(), reason=f"no ray CLI next to {sys.executable}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env() -> dict[str, str]:
    """This process's environment without any RAY_* variable (RAY_ADDRESS, auth, ...)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}


def _dashboard_up(url: str, token: str) -> bool:
    request = urllib.request.Request(f"{url}/api/version",
                                     headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _stop_head(proc: subprocess.Popen) -> None:
    """Stop only this head: SIGTERM to ``ray start --block``, then kill what is left."""
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # Ray's own shutdown of this node's processes
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    _, alive = psutil.wait_procs(tree, timeout=10)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=10)


@pytest.fixture(scope="module")
def ray_head():
    """A token-authenticated Ray head of this module's own; yields how to reach it."""
    # Short: Ray's unix socket paths under the temp dir must stay below ~107 characters.
    tmp = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))
    token = secrets.token_hex(32)  # what `ray get-auth-token --generate` writes
    token_path = tmp / "auth_token"
    token_path.write_text(token)
    token_path.chmod(0o600)
    env = _clean_env()
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path),
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    dashboard = _free_port()
    cmd = [str(RAY), "start", "--head", "--block", f"--port={_free_port()}", "--num-cpus=4",
           "--include-dashboard=true", f"--dashboard-port={dashboard}", f"--temp-dir={tmp}",
           f"--ray-client-server-port={_free_port()}",
           f"--dashboard-agent-listen-port={_free_port()}", "--disable-usage-stats"]
    log = open(tmp / "ray_start.log", "w")  # noqa: SIM115 - closed in teardown
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp,
                            start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _dashboard_up(url, token):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start --head did not come up:\n"
                                   f"{(tmp / 'ray_start.log').read_text()[-4000:]}")
            time.sleep(0.5)
        yield {"url": url, "env": env, "tmp": tmp, "token": token}
    finally:
        _stop_head(proc)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _ray(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(RAY), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


@pytest.mark.parametrize("client", ["no auth mode", "wrong token"])
def test_job_api_refuses_clients_without_the_token(ray_head, client):
    """The head really enforces auth: no token, or a wrong one, is turned away."""
    env = _clean_env()
    if client == "wrong token":
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64)
    r = _ray("job", "list", "--address", ray_head["url"], env=env)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    expected = "Missing authentication token" if client == "no auth mode" else "invalid"
    assert expected in out, out


def test_headers_option_authenticates_without_auth_mode(ray_head):
    """``--headers`` with the bearer token is enough, with no RAY_AUTH_* variables at all."""
    header = json.dumps({"Authorization": f"Bearer {ray_head['token']}"})
    r = _ray("job", "list", "--address", ray_head["url"], "--headers", header, env=_clean_env())
    assert r.returncode == 0, r.stdout + r.stderr


def test_job_submit_runs_the_driver(ray_head):
    """`ray job submit --working-dir <repo> -- python -m learner.main ...` finishes a short run."""
    run_dir = ray_head["tmp"] / "run"
    overrides = [
        "train.steps=2",
        "grpo.prompts_per_step=1",
        "grpo.group_size=4",
        "metrics.port=0",  # the default 8000 may be taken on a shared machine
        "eval.every=0",  # the evaluation is tested in test_main
    ]
    entrypoint = ["python", "-m", "learner.main", "--config", "configs/tiny_solace.yaml",
                  "--run-dir", str(run_dir)]
    for item in overrides:
        entrypoint += ["--set", item]
    r = _ray("job", "submit", "--address", ray_head["url"], "--working-dir", str(REPO),
             "--runtime-env-json", json.dumps({"excludes": EXCLUDES}), "--", *entrypoint,
             env=ray_head["env"], timeout=JOB_TIMEOUT_S)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-8000:]
    assert "succeeded" in out, out[-8000:]
    # The driver's last line, streamed back through the job's logs.
    assert f"run directory: {run_dir}" in out, out[-8000:]
    assert "_ray_pkg_" in out, out[-8000:]  # the working dir was packaged for the job
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps] == [0, 1]
    assert (run_dir / "lora").is_dir()
    assert (run_dir / "config.yaml").is_file()
