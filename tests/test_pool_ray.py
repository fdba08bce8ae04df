"""The reward pool on one real local Ray instance, with tiny fake scorers.

Fake scorers keep the actors light (no torch import), so each starts in about a
second; one test runs the real SelfConfidenceWorker on the tiny pipeline. Module-level
imports stay light for the same reason: actors unpickle the fakes from this module.
"""

import functools
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray

from actors import scale
from actors.pool import RewardError, RewardPool

REPO = Path(__file__).resolve().parents[1]
# Actors cannot import this test module (tests/ is not on their path): ship its fakes
# by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def cluster():
    ctx = ray.init(address="local", num_cpus=4, include_dashboard=False, namespace="solace",
                   logging_level="ERROR")
    yield ctx
    ray.shutdown()


@dataclass
class Work:
    """A fake rollout: what the fake scorer should do with it."""

    key: int
    delay: float = 0.05
    hang_marker: str | None = None  # the first call to create this file hangs
    fail: bool = False


@dataclass
class FakeScores:
    key: int
    value: int
    pid: int


class FakeScorer:
    """Sleeps, then returns ``key * weights``; can hang once or always fail."""

    def score(self, work: Work, weights: int) -> FakeScores:
        if work.fail:
            raise ValueError(f"cannot score {work.key}")
        if work.hang_marker is not None:
            try:
                fd = os.open(work.hang_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                time.sleep(120)  # hung; the pool must time out and retry elsewhere
        time.sleep(work.delay)
        return FakeScores(work.key, work.key * weights, os.getpid())


def fake_pool(num_actors: int, **kwargs) -> RewardPool:
    kwargs = {"timeout_s": 30.0, "max_retries": 2, "num_cpus": 0.25, **kwargs}
    return RewardPool(FakeScorer, num_actors, **kwargs)


def drain(pool: RewardPool, limit_s: float = 60.0) -> list:
    """Collect until nothing is pending; returns (key, scores) in completion order."""
    out, end = [], time.monotonic() + limit_s
    while pool.pending:
        assert time.monotonic() < end, f"still {pool.pending} pending after {limit_s} s"
        out += pool.collect(timeout=5.0)
    return out


def submit_all(pool: RewardPool, works: list[Work], weights_ref) -> None:
    for work in works:
        pool.submit(ray.put(work), weights_ref, work.key)


def assert_each_once(results: list, keys) -> None:
    counts = Counter(k for k, _ in results)
    assert sorted(counts) == sorted(keys), f"missing {set(keys) - set(counts)}"
    assert max(counts.values()) == 1, f"duplicates: {[k for k, c in counts.items() if c > 1]}"
    for key, scores in results:
        assert scores.key == key


def test_results_come_back_as_they_finish(cluster):
    with fake_pool(2) as pool:
        assert pool.wait_ready(30.0) == 2
        weights = ray.put(3)
        submit_all(pool, [Work(0, delay=3.0)] + [Work(k) for k in range(1, 7)], weights)
        results = drain(pool)
        assert_each_once(results, range(7))
        assert [k for k, _ in results][-1] == 0  # the slow key did not hold up the others
        assert all(s.value == 3 * k for k, s in results)
        assert pool.stats.completed == 7 and pool.stats.retries == 0
        assert pool.stats.stolen >= 1  # the call queued behind the slow one moved


def test_a_hung_call_is_retried_on_another_actor(cluster, tmp_path):
    marker = tmp_path / "hung"
    with fake_pool(2, timeout_s=1.5) as pool:
        weights = ray.put(1)
        submit_all(pool, [Work(0, hang_marker=str(marker))] + [Work(k) for k in range(1, 5)],
                   weights)
        results = drain(pool)
        assert_each_once(results, range(5))
        hung_pid = int(marker.read_text())
        assert dict(results)[0].pid != hung_pid
        assert pool.stats.timeouts == 1 and pool.stats.retries == 1
        # The stuck actor was restarted and serves again.
        submit_all(pool, [Work(k, delay=0.3) for k in range(10, 16)], weights)
        more = drain(pool)
        assert_each_once(more, range(10, 16))
        # The short calls may all finish on the other actor before the restart is up.
        assert pool.wait_ready(60.0) == 2


def test_calls_behind_a_hung_call_are_requeued_without_a_retry(cluster, tmp_path):
    marker = tmp_path / "hung"
    with fake_pool(1, timeout_s=1.5, max_retries=1) as pool:
        assert pool.wait_ready(30.0) == 1
        weights = ray.put(1)
        submit_all(pool, [Work(0, hang_marker=str(marker)), Work(1)], weights)  # 1 queues behind 0
        results = drain(pool)
        assert_each_once(results, [0, 1])
        # Only the hung key is charged; the lone actor was restarted and served both.
        assert pool.stats.timeouts == 1 and pool.stats.retries == 1 and pool.alive == 1
        assert dict(results)[0].pid != int(marker.read_text())


def test_killed_actors_lose_and_duplicate_nothing(cluster):
    with fake_pool(3, max_restarts=1) as pool:
        weights = ray.put(1)
        submit_all(pool, [Work(k, delay=0.1) for k in range(40)], weights)
        results = []
        while len(results) < 6:
            results += pool.collect(timeout=10.0)
        first, second = pool.actor_handles()[:2]
        ray.kill(first, no_restart=False)  # restarts: in-flight calls fail, retried elsewhere
        while len(results) < 16:
            results += pool.collect(timeout=10.0)
        ray.kill(second, no_restart=True)  # dead for good: replaced by a new actor
        results += drain(pool)
        assert_each_once(results, range(40))
        assert pool.stats.actor_errors >= 1 and pool.stats.failed == 0
        assert pool.stats.replaced == 1 and pool.size == 3


def test_resize_during_a_stream_of_work(cluster):
    with fake_pool(1) as pool:
        weights = ray.put(1)
        submit_all(pool, [Work(k, delay=0.1) for k in range(60)], weights)
        results = []
        while len(results) < 4:
            results += pool.collect(timeout=10.0)
        pool.resize(2)
        assert pool.size == 2
        while len({s.pid for _, s in results}) < 2:  # until the new actor has served
            results += pool.collect(timeout=10.0)
        assert pool.alive == 2 and pool.pending > 10
        before = pool.actor_handles()
        pool.resize(1)  # the removed actor finishes its calls, then is killed
        assert pool.size == 1 and pool.alive == 1
        results += drain(pool)
        assert_each_once(results, range(60))
        assert pool.stats.failed == 0 and pool.stats.retries == 0  # draining re-ran nothing
        [removed] = [h for h in before if h not in pool.actor_handles()]
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(removed.ready.remote(), timeout=30)


def test_an_always_failing_scorer_raises_after_max_retries(cluster):
    with fake_pool(2, max_retries=2) as pool:
        weights = ray.put(1)
        submit_all(pool, [Work(0, fail=True), Work(1, delay=0.5)], weights)
        results = []
        with pytest.raises(RewardError, match=r"key 0 failed 3 times .* last error: ValueError: cannot score 0") as e:
            while pool.pending:
                results += pool.collect(timeout=10.0)
        assert e.value.key == 0 and "cannot score 0" in e.value.last_error
        results += drain(pool)  # the good key is still delivered, once
        assert_each_once(results, [1])
        assert pool.stats.retries == 2 and pool.stats.failed == 1 and pool.pending == 0


class BrokenScorer:
    def __init__(self) -> None:
        raise FileNotFoundError("no such model: /nowhere")


def test_actors_that_cannot_start_fail_loudly_at_setup(cluster):
    with RewardPool(BrokenScorer, 1, max_retries=1, num_cpus=0.25) as pool, \
            pytest.raises(RewardError, match="fail to start.*no such model"):
        pool.wait_ready(30.0)


def test_scale_sets_the_size_through_the_control_actor(cluster, capsys):
    with fake_pool(1, control_name="test-reward-pool") as pool:
        assert scale.main(["reward", "2", "--name", "test-reward-pool"]) == 0
        assert "1 -> 2" in capsys.readouterr().out
        assert pool.size == 1  # applied by the driver, once per step
        assert pool.sync_control() == 2 and pool.size == 2
        submit_all(pool, [Work(k, delay=0.3) for k in range(8)], ray.put(1))
        assert_each_once(drain(pool), range(8))
        assert pool.alive == 2
        # From another process, as an operator would run it.
        out = subprocess.run(
            [sys.executable, "-m", "actors.scale", "reward", "1", "--name", "test-reward-pool",
             "--address", cluster.address_info["gcs_address"]],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert "2 -> 1" in out.stdout
        assert pool.sync_control() == 1 and pool.size == 1
    assert scale.main(["reward", "3", "--name", "no-such-pool"]) == 1
    assert "no running pool found" in capsys.readouterr().err


def test_real_self_confidence_worker_as_an_actor(cluster):
    import numpy as np

    from actors.reward import SelfConfidenceWorker
    from actors.rollout import RolloutWorker
    from policy.pipeline import LoraSpec, lora_state_dict
    from policy.sampler import SamplerSpec
    from policy.weights import flatten_weights

    args = dict(model_path="tiny-random", dtype="float32", device="cpu", num_threads=1,
                lora=LoraSpec(rank=4, alpha=8), max_sequence_length=8, run_seed=5)
    roller = RolloutWorker(sampler=SamplerSpec(num_steps=4), **args)
    state = {k: v + 0.1 if "lora_B" in k else v
             for k, v in lora_state_dict(roller.policy.pipe.transformer).items()}
    flat = flatten_weights(state, version=4)
    roller.set_weights(flat)
    rollout = roller.sample([(2, "a photo of a star"), (5, "a photo of a circle")], step=4,
                            group_size=2)
    worker = functools.partial(SelfConfidenceWorker, num_probes=4, **args)
    expected = worker().score(rollout, flat)
    with RewardPool(worker, 1, timeout_s=120.0, num_cpus=1) as pool:
        pool.submit(ray.put(rollout), ray.put(flat), "group-2-5")
        [(key, scores)] = drain(pool, limit_s=120.0)
    assert key == "group-2-5" and scores.weight_version == 4
    assert scores.sample_keys == expected.sample_keys
    np.testing.assert_array_equal(scores.reward, expected.reward)
    np.testing.assert_array_equal(scores.per_step, expected.per_step)


def test_best_of_n_spread_over_ray_actors_gives_the_local_answers(cluster):
    """Two real actors on a local Ray instance, prompts dealt round-robin: the same
    choices, scores and images as one process, in prompt order."""
    import numpy as np

    from actors.verify import verify_on_ray
    from policy.pipeline import build_pipeline
    from policy.sampler import SamplerSpec
    from rewards.verifier import VerifierSpec, best_of_n

    spec, verifier = SamplerSpec(num_steps=6), VerifierSpec(num_probes=4)
    prompts = ["a photo of a red circle", "a photo of two stars", "a photo of a square"]
    local = best_of_n(build_pipeline("tiny-random"), prompts, 3, spec, verifier, seed=5,
                      early_step=2, keep=2)
    spread = verify_on_ray(prompts, 3, spec, verifier, model_path="tiny-random", actors=2,
                           seed=5, early_step=2, keep=2)
    assert spread.chosen.tolist() == local.chosen.tolist()
    np.testing.assert_allclose(spread.scores, local.scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(spread.early, local.early, rtol=1e-5, atol=1e-6)
    assert np.array_equal(spread.seeds, local.seeds)
    assert np.abs(spread.images.astype(int) - local.images.astype(int)).max() <= 1
