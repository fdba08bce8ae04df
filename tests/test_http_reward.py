"""The remote external reward: HttpScorer's failure policy, and the service with a live server.

The unit tests run real aiohttp servers in this process (scripted answers, or
``rewards.serve``'s app with a failing scorer). The end-to-end tests train the shipped
tiny model with SOLACE + ShapesEval served by a ``python -m rewards.serve`` child, on one
local Ray instance for the module, and kill that server mid-run.
"""

import asyncio
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from aiohttp import web

from learner.config import load_config
from learner.grpo import combine_advantages
from learner.main import RewardStopped, train
from rewards.http import HttpScorer, RewardRejected, RewardUnavailable
from rewards.serve import ServerProcess, make_app, serve_in_thread

REPO = Path(__file__).resolve().parents[1]
TOKEN = "e2e-token-9876543210"
IMAGES = np.full((2, 8, 8, 3), 51, dtype=np.uint8)
PROMPTS, METADATA = ["a", "b"], [{"prompt": "a"}, {"prompt": "b"}]


@pytest.fixture(autouse=True)
def token_env(monkeypatch):
    monkeypatch.setenv("SOLACE_REWARD_TOKEN", TOKEN)


def scripted(script: list):
    """An app answering /score with ``script[i]`` on hit i (the last entry repeats):
    an int is that HTTP status, "sleep" answers after 2 s, "ok" gives scores 0.5."""
    hits: list[float] = []

    async def score(request: web.Request) -> web.Response:
        await request.read()
        hits.append(time.monotonic())
        step = script[min(len(hits), len(script)) - 1]
        if step == "sleep":
            await asyncio.sleep(2.0)
            step = "ok"
        if step == "ok":
            n = len(json.loads(await request.read())["prompts"])
            return web.json_response({"scores": [0.5] * n, "details": [{}] * n, "name": "s",
                                      "version": "1"})
        return web.json_response({"error": f"scripted {step}"}, status=step)

    app = web.Application()
    app.router.add_post("/score", score)
    return app, hits


def test_5xx_and_timeouts_are_retried_with_backoff():
    app, hits = scripted([500, 503, "sleep", "ok"])
    with serve_in_thread(app) as url:
        scorer = HttpScorer(url, timeout_s=0.5, max_retries=3, backoff_s=0.05)
        np.testing.assert_array_equal(scorer(IMAGES, PROMPTS, METADATA), [0.5, 0.5])
    assert len(hits) == 4
    gaps = np.diff(hits)
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1 and gaps[2] >= 0.5 + 0.2  # backoff doubles


def test_4xx_is_raised_at_once_with_the_servers_message():
    app, hits = scripted([422, "ok"])
    with serve_in_thread(app) as url, pytest.raises(RewardRejected,
                                                    match=r"answered 422: scripted 422") as e:
        HttpScorer(url, max_retries=3, backoff_s=0.05)(IMAGES, PROMPTS, METADATA)
    assert e.value.status == 422 and len(hits) == 1


def test_the_circuit_opens_after_failed_calls_and_closes_after_a_success():
    script = [500] * 6 + ["ok"]
    app, hits = scripted(script)
    with serve_in_thread(app) as url:
        scorer = HttpScorer(url, max_retries=1, backoff_s=0.01, circuit_failures=2,
                            circuit_reset_s=0.5)
        for _ in range(2):
            with pytest.raises(RewardUnavailable, match="2 attempts failed"):
                scorer(IMAGES, PROMPTS, METADATA)
        assert len(hits) == 4
        started = time.monotonic()
        with pytest.raises(RewardUnavailable, match=f"{url}: circuit open after 2 failed calls"):
            scorer(IMAGES, PROMPTS, METADATA)
        assert len(hits) == 4 and time.monotonic() - started < 0.05  # failed fast, no request
        time.sleep(0.5)  # half-open: one call goes through; it fails and re-opens the circuit
        with pytest.raises(RewardUnavailable, match="attempts failed"):
            scorer(IMAGES, PROMPTS, METADATA)
        assert len(hits) == 6
        with pytest.raises(RewardUnavailable, match="circuit open"):
            scorer(IMAGES, PROMPTS, METADATA)
        time.sleep(0.5)
        np.testing.assert_array_equal(scorer(IMAGES, PROMPTS, METADATA), [0.5, 0.5])
        np.testing.assert_array_equal(scorer(IMAGES, PROMPTS, METADATA), [0.5, 0.5])  # closed
    assert len(hits) == 8


def test_408_is_retried_as_a_slow_upload():
    app, hits = scripted([408, "ok"])
    with serve_in_thread(app) as url:
        scorer = HttpScorer(url, max_retries=1, backoff_s=0.01)
        np.testing.assert_array_equal(scorer(IMAGES, PROMPTS, METADATA), [0.5, 0.5])
    assert len(hits) == 2


def test_a_4xx_does_not_count_against_the_circuit():
    # 500, then a refusal, then 500: two failures, but not in a row, so no open circuit.
    app, hits = scripted([500, 422, 500, "ok"])
    with serve_in_thread(app) as url:
        scorer = HttpScorer(url, max_retries=0, circuit_failures=2, circuit_reset_s=60)
        with pytest.raises(RewardUnavailable):
            scorer(IMAGES, PROMPTS, METADATA)
        with pytest.raises(RewardRejected, match="answered 422"):
            scorer(IMAGES, PROMPTS, METADATA)
        with pytest.raises(RewardUnavailable, match="1 attempts failed"):
            scorer(IMAGES, PROMPTS, METADATA)
        np.testing.assert_array_equal(scorer(IMAGES, PROMPTS, METADATA), [0.5, 0.5])
    assert len(hits) == 4


class Picky:
    """Mean brightness; raises KeyError for a metadata row without a ``tag``, as a
    GenEval scorer does for a row it cannot read."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, images, prompts, metadata):
        self.calls += 1
        tags = [m["tag"] for m in metadata]
        del tags
        return images.reshape(len(images), -1).mean(axis=1) / 255.0


def test_metadata_the_scorer_refuses_is_rejected_at_once_and_good_calls_still_work():
    scorer = Picky()
    with serve_in_thread(make_app(scorer, "picky", "1", TOKEN)) as url:
        client = HttpScorer(url, max_retries=3, backoff_s=0.01, circuit_failures=1)
        with pytest.raises(RewardRejected) as e:
            client(IMAGES, PROMPTS, METADATA)  # no "tag": KeyError in the scorer
        assert e.value.status == 422 and scorer.calls == 1  # not retried
        assert str(e.value) == (f"reward server {url}/score answered 422: scorer refused "
                                "the input: KeyError: 'tag'")
        good = [{"tag": "counting"}] * 2
        np.testing.assert_allclose(client(IMAGES, PROMPTS, good), [0.2, 0.2], rtol=1e-6)
        assert scorer.calls == 2  # the circuit stayed closed


class Flaky:
    """Mean brightness, but the first ``fail_first`` calls raise (the server answers 500)."""

    def __init__(self, fail_first: int) -> None:
        self.fail_first, self.calls = fail_first, 0

    def __call__(self, images, prompts, metadata):
        self.calls += 1
        if self.calls <= self.fail_first:
            raise RuntimeError(f"flaky call {self.calls}")
        return images.reshape(len(images), -1).mean(axis=1) / 255.0


def test_a_scorer_failing_its_first_calls_is_retried_through_the_real_server():
    scorer = Flaky(fail_first=2)
    with serve_in_thread(make_app(scorer, "flaky", "1", TOKEN)) as url:
        client = HttpScorer(url, max_retries=3, backoff_s=0.01)
        np.testing.assert_allclose(client(IMAGES, PROMPTS, METADATA), [0.2, 0.2], rtol=1e-6)
        assert scorer.calls == 3
        scorer.fail_first = 1000  # from now on it always fails: 4 attempts, then give up
        with pytest.raises(RewardUnavailable, match="4 attempts failed.*HTTP 500: scorer "
                                                    "raised RuntimeError: flaky call 7"):
            client(IMAGES, PROMPTS, METADATA)
        assert scorer.calls == 7


def test_preflight_with_a_wrong_token_names_the_url_401_and_the_variable(monkeypatch):
    with serve_in_thread(make_app(Flaky(0), "flaky", "7", TOKEN)) as url:
        assert HttpScorer(url).preflight().version == "7"
        monkeypatch.setenv("SOLACE_REWARD_TOKEN", "not-the-token")
        with pytest.raises(RewardRejected) as e:
            HttpScorer(url).preflight()
    assert e.value.status == 401
    message = str(e.value)
    assert f"{url}/health answered 401" in message and "SOLACE_REWARD_TOKEN" in message


def test_an_unreachable_server_or_a_missing_token_fails_clearly(monkeypatch):
    with serve_in_thread(web.Application()) as url:
        pass  # now closed: nothing listens there
    with pytest.raises(RewardUnavailable, match=f"{url}/health: 2 attempts failed.*Connection"):
        HttpScorer(url, max_retries=1, backoff_s=0.01).preflight()
    monkeypatch.delenv("SOLACE_REWARD_TOKEN")
    with pytest.raises(ValueError, match="environment variable SOLACE_REWARD_TOKEN"):
        HttpScorer(url)


# -- the service with a live reward server ---------------------------------------------

SMALL = [
    "grpo.group_size=4", "grpo.prompts_per_step=2", "grpo.micro_batch=8", "sampler.num_steps=6",
    "self_confidence.num_probes=4", "metrics.port=0", "metrics.grid_every=100",
    "reward_pool.timeout_s=120", "learner.max_staleness=0", "train.save_every=100",
]
SHAPES = "rewards.shapes:ShapesReward"


@pytest.fixture(scope="module")
def local_ray():
    # Ray's workers inherit this process's environment when the instance starts: the
    # reward actors read the token from it, as they would from a node's environment.
    saved = os.environ.get("SOLACE_REWARD_TOKEN")
    os.environ["SOLACE_REWARD_TOKEN"] = TOKEN
    ray.init(address="local", num_cpus=8, namespace="solace", include_dashboard=False)
    yield
    ray.shutdown()
    if saved is None:
        os.environ.pop("SOLACE_REWARD_TOKEN", None)
    else:
        os.environ["SOLACE_REWARD_TOKEN"] = saved


def _config(url: str, steps: int, pool: str, **reward):
    shapes = {"name": "shapes", "kind": "http", "url": url, "timeout_s": 10, "max_retries": 1,
              "backoff_s": 0.05, **reward}
    return load_config(REPO / "configs/tiny_solace_shapes_hybrid.yaml", SMALL + [
        f"train.steps={steps}", f"reward_pool.control_name={pool}",
        f"external_rewards=[{json.dumps(shapes)}]"])


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _kill_after_first_step(server: ServerProcess, run_dir: Path) -> threading.Thread:
    def watch() -> None:
        deadline = time.monotonic() + 240
        while not _lines(run_dir / "metrics.jsonl") and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(server.proc.pid, signal.SIGKILL)  # the server dies mid-run

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_wrong_token_fails_at_start_up_naming_the_url_and_401(tmp_path):
    with ServerProcess(SHAPES, token="the-servers-own-token") as server:
        started = time.monotonic()
        with pytest.raises(RuntimeError) as e:
            train(_config(server.url, 2, "test-pool-http-token"), tmp_path / "run")
    message = str(e.value)
    assert "'shapes'" in message and f"{server.url}/health answered 401" in message
    assert "SOLACE_REWARD_TOKEN" in message
    assert time.monotonic() - started < 10 and not (tmp_path / "run").exists()  # no actor started


def test_both_rewards_combine_then_drop_renormalises_when_the_server_dies(local_ray, tmp_path,
                                                                         caplog):
    run_dir, steps = tmp_path / "drop", 3
    with ServerProcess(SHAPES, token=TOKEN) as server:
        cfg = _config(server.url, steps, "test-pool-http-drop", on_failure="drop")
        watcher = _kill_after_first_step(server, run_dir)
        train(cfg, run_dir)
        watcher.join(timeout=10)
    metrics, samples = _lines(run_dir / "metrics.jsonl"), _lines(run_dir / "samples.jsonl")
    assert [m["step"] for m in metrics] == list(range(steps))
    assert len(samples) == steps * 2 * 4  # no sample dropped with the reward
    # Step 0 had both rewards; once the server died, shapes is null and SOLACE's weight is
    # renormalised to the original total 1 + 1.
    with_shapes = sorted({s["step"] for s in samples if s["reward/shapes"] is not None})
    assert with_shapes == [0], with_shapes
    assert metrics[0]["reward/shapes/weight"] == 1.0 and metrics[0]["reward/dropped"] == 0
    for m in metrics[1:]:
        assert m["reward/self_confidence/weight"] == 2.0 and "reward/shapes/weight" not in m
        assert m["reward/dropped"] == 1 and "reward/shapes/mean" not in m
    assert any("'shapes'" in r.message and server.url in r.message and "renormalised to "
               "{'self_confidence': 2.0}" in r.message for r in caplog.records), caplog.text
    # Every step's advantages are the configured rule applied to the recorded rewards.
    for step in range(steps):
        rows = [s for s in samples if s["step"] == step]
        names = [n for n in ("self_confidence", "shapes") if rows[0][f"reward/{n}"] is not None]
        weights = {"self_confidence": 1.0, "shapes": 1.0} if len(names) == 2 else {"self_confidence": 2.0}
        adv = combine_advantages(
            {n: torch.tensor([r[f"reward/{n}"] for r in rows]) for n in names}, weights,
            torch.arange(len(rows)) // 4, "advantages", "global", 5.0, 1e-4)
        np.testing.assert_allclose([r["advantage"] for r in rows], adv.values, atol=1e-6)
        assert [r["kept"] for r in rows] == adv.keep.tolist()
    assert all(0.0 <= s["reward/shapes"] <= 1.0 for s in samples if s["step"] == 0)


def test_by_default_a_dead_server_stops_the_run_after_a_checkpoint(local_ray, tmp_path):
    run_dir = tmp_path / "stop"
    with ServerProcess(SHAPES, token=TOKEN) as server:
        cfg = _config(server.url, 3, "test-pool-http-stop")
        assert cfg.external_rewards[0].on_failure == "stop"  # the default
        watcher = _kill_after_first_step(server, run_dir)
        with pytest.raises(RewardStopped) as e:
            train(cfg, run_dir)
        watcher.join(timeout=10)
    checkpoint = run_dir / "checkpoints" / "step_000001"
    message = str(e.value)
    assert "reward 'shapes'" in message and server.url in message and str(checkpoint) in message
    assert e.value.checkpoint == checkpoint
    assert (checkpoint / "trainer.pt").is_file() and (checkpoint / "lora").is_dir()
    assert len(_lines(run_dir / "samples.jsonl")) == 2 * 4  # step 0 was trained and logged
