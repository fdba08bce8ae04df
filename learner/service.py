"""The actors of one run and the calls that move data between them.

:class:`Service` builds the rollout actors, the reward pools (self-confidence and each
external reward) and the DeepSpeed learner ranks; it launches a step's rollouts, queues
them for scoring as they finish, and collects the scores. The driver loop
(``learner.main.train``) decides what happens when; this module only moves data.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import ray

from actors.pool import RewardError, RewardPool
from actors.reward import ExternalRewardWorker, Scores, SelfConfidenceWorker
from actors.rollout import RolloutWorker
from actors.text import PromptEncoder
from learner.config import HTTP_SCORER, SC, Config
from learner.engine import LearnerGroup, PlacementTimeout
from policy.logprob import window_steps

logger = logging.getLogger(__name__)


class RewardFailure(RuntimeError):
    """A reward's pool gave up on a call mid-run; ``reward`` names it."""

    def __init__(self, reward: str, error: RewardError) -> None:
        super().__init__(f"reward {reward!r}: {error}")
        self.reward, self.error = reward, error


class RolloutFailure(RuntimeError):
    """A rollout call failed for good (its actor died past ``rollout.max_restarts``, or
    sampling raised): the reward pools' failures that follow are not the rewards' fault."""


class StepTimeout(RuntimeError):
    """A wait of the driver ran past its bound (``rollout.timeout_s``,
    ``learner.update_timeout_s``): the run stops rather than hangs."""


class StopRequested(Exception):
    """Raised inside a wait when the run has been asked to stop (SIGTERM/SIGINT)."""


@dataclass
class StepWork:
    """The rollouts of one step in flight: their refs, version and scores as they arrive.

    An evaluation is filed the same way under the step key ``("eval", version)``.
    """

    step: int | tuple[str, int]
    version: int
    refs: list[ray.ObjectRef]  # one ObjectRef[Rollout] per rollout call, in order
    groups: list[list[tuple[int, str]]]  # the (prompt index, prompt) groups of each call
    scores: dict[str, dict[int, Scores]] = field(default_factory=lambda: defaultdict(dict))
    started: float = field(default_factory=time.perf_counter)
    scored: bool = True  # False: no reward scores this work (an evaluation without rewards)

    def sizes(self) -> list[int]:
        """The samples of each rollout call, in order (from the scores, all arrived)."""
        first = next(iter(self.scores))  # every reward scores the same samples, in order
        return [len(self.scores[first][call].sample_keys) for call in range(len(self.refs))]


def build_prompt_table(cfg: Config, rows: list[dict]) -> ray.ObjectRef:
    """The run's prompt table, built by a :class:`actors.text.PromptEncoder` placed as a
    rollout actor would be, and put in the object store; the encoder is gone after."""
    m = cfg.model
    encoder = ray.remote(num_cpus=cfg.rollout.num_cpus, num_gpus=cfg.rollout.num_gpus)(
        PromptEncoder).remote(m.path, m.dtype, m.device, cfg.rollout.num_threads)
    try:
        table = ray.get(encoder.build.remote([r["prompt"] for r in rows],
                                             m.max_sequence_length, m.prompt_table_max_gib))
    finally:
        ray.kill(encoder)
    logger.info("prompt table: %d prompts, %.1f MiB; actors load no text encoder",
                len(table), table.nbytes / 2**20)
    return ray.put(table)


class Service:
    """The actors of one run and the calls that move data between them."""

    def __init__(self, cfg: Config, rows: list[dict], eval_rows: list[dict] | None = None):
        self.cfg = cfg
        eval_rows = eval_rows or []
        m, lora = cfg.model, cfg.lora.spec(cfg.seed)
        resources = ray.cluster_resources()
        wants = cfg.rollout.require_resource or "rollout" in resources
        rollout_res = {"rollout": 0.01} if wants else None
        # A rollout actor that dies is restarted, and Ray sends its lost call again: every
        # call carries its seeds and its weights, so the retry samples the same rollout.
        restarts = cfg.rollout.max_restarts
        table = build_prompt_table(cfg, rows + eval_rows) if m.prompt_table else None
        self.prompt_table = table  # ObjectRef[PromptTable] or None; the driver keeps it alive
        actor = ray.remote(num_cpus=cfg.rollout.num_cpus, num_gpus=cfg.rollout.num_gpus,
                           resources=rollout_res, max_restarts=restarts,
                           max_task_retries=restarts)(RolloutWorker)
        self.rollout_actors = [
            actor.remote(m.path, m.dtype, m.device, cfg.rollout.num_threads, lora,
                         cfg.sampler.spec(), m.max_sequence_length, cfg.seed,
                         cfg.sampler.spec(eval=True), cfg.rollout.micro_batch, table,
                         cfg.rollout.decode_batch)
            for _ in range(cfg.rollout.num_actors)
        ]
        sc, rp = cfg.self_confidence, cfg.reward_pool
        self.pools: dict[str, RewardPool] = {}
        if sc.enabled:
            self.pools[SC] = RewardPool(
                partial(SelfConfidenceWorker, m.path, m.dtype, m.device, rp.num_threads, lora,
                        m.max_sequence_length, cfg.seed, sc.num_probes, sc.probe_fraction,
                        sc.delta, sc.aggregation, sc.guidance_scale, sc.policy,
                        window_steps(cfg.sampler.spec(), cfg.grpo.train_fraction)
                        if cfg.grpo.credit == "per_step" else None, sc.micro_batch, table,
                        sc.merge_lora),
                rp.num_actors, timeout_s=rp.timeout_s, max_retries=rp.max_retries,
                max_restarts=rp.max_restarts, ready_timeout_s=rp.ready_timeout_s,
                num_cpus=rp.num_cpus, num_gpus=rp.num_gpus,
                require_resource=rp.require_resource, control_name=rp.control_name, name=SC,
            )
        for ext in cfg.external_rewards:
            # kind http: the client actor of a reward server, the remote external reward
            target, kwargs = ((HTTP_SCORER, ext.http_kwargs()) if ext.kind == "http"
                              else (ext.target, ext.kwargs))
            self.pools[ext.name] = RewardPool(
                partial(ExternalRewardWorker, target, ext.name, m.path, m.dtype, m.device,
                        1, kwargs, rows + eval_rows,  # eval prompt ids follow the rows
                        cfg.rollout.decode_batch),
                ext.num_actors, timeout_s=rp.timeout_s, max_retries=rp.max_retries,
                max_restarts=rp.max_restarts, ready_timeout_s=rp.ready_timeout_s,
                num_cpus=ext.num_cpus, num_gpus=ext.num_gpus,
                control_name=f"{rp.control_name}-{ext.name}", name=ext.name,
            )
        for name, pool in self.pools.items():
            try:
                pool.wait_ready()
            except RewardError as e:
                raise RewardError(f"reward {name!r}: {e}", last_error=e.last_error) from e
        try:
            self.learner = LearnerGroup(
                cfg.learner.num_ranks, lora=lora, grpo=cfg.grpo, model_path=m.path,
                dtype=m.dtype, device=m.device, num_threads=cfg.learner.num_threads,
                num_cpus=cfg.learner.num_cpus, zero_stage=cfg.learner.zero_stage,
                max_sequence_length=m.max_sequence_length,
                require_resource=cfg.learner.require_resource,
                gradient_checkpointing=cfg.learner.gradient_checkpointing,
                placement_timeout_s=cfg.learner.placement_timeout_s, prompt_table=table,
                recompute_old_logprobs=cfg.learner.recompute_old_logprobs,
            )
        except PlacementTimeout:  # nothing to run with: the started actors go too
            for pool in self.pools.values():
                pool.shutdown()
            for rollout_actor in self.rollout_actors:
                ray.kill(rollout_actor)
            raise
        self.weights: dict[int, ray.ObjectRef] = {}  # version -> ObjectRef[FlatWeights]
        self.failure: RewardFailure | None = None  # seen during an update, raised by gather

    def publish(self, version: int) -> float:
        """Store weights ``version`` once and push the ref to every rollout actor.

        Returns the seconds until the buffer is in the object store. The pushes are not
        waited for: actor calls run in order, so every sample call submitted after them
        uses the new version, and a failed load surfaces in that call.
        """
        t0 = time.perf_counter()
        ref = self.learner.publish(version)
        ray.wait([ref], fetch_local=False)  # stored by rank 0; the driver never copies it
        seconds = time.perf_counter() - t0
        for actor in self.rollout_actors:
            actor.set_weights.remote(ref)
        self.weights[version] = ref
        # Keep the versions that in-flight rollouts may still need (sampling, scoring).
        for old in [v for v in self.weights if v < version - self.cfg.learner.max_staleness]:
            del self.weights[old]
        return seconds

    def restore_weights(self, version: int, flat) -> None:
        """Put an older version's weights (from a checkpoint) back in the object store, for
        the steps a resumed run must sample with it (``max_staleness >= 1``)."""
        self.weights[version] = ray.put(flat)

    def launch(self, step: int, version: int, picked: list[tuple[int, dict]]) -> StepWork:
        """Sample the step's groups on the rollout actors and queue them for scoring."""
        groups = [(index, row["prompt"]) for index, row in picked]
        chunks = [list(c) for c in np.array_split(np.arange(len(groups)), len(self.rollout_actors))
                  if len(c)]
        work = StepWork(step, version, [], [])
        for actor, chunk in zip(self.rollout_actors, chunks, strict=False):
            call_groups = [groups[i] for i in chunk]
            ref = actor.sample.remote(call_groups, step, self.cfg.grpo.group_size,
                                      weights=self.weights[version])
            for pool in self.pools.values():  # scored as soon as this rollout exists
                pool.submit(ref, self.weights[version], key=(step, len(work.refs)))
            work.refs.append(ref)
            work.groups.append(call_groups)
        return work

    def launch_eval(self, version: int, jobs: list[tuple[int, str, int]], seed: int,
                    offset: int, score: bool) -> tuple[StepWork, list[ray.ObjectRef]]:
        """Evaluate weights ``version`` on ``jobs`` (prompt ids ``offset`` past the training
        prompts) across the rollout actors.

        Returns the work (its scores arrive through :meth:`gather` under the key
        ``("eval", version)``, scored by every pool when ``score``) and one
        ``ObjectRef[uint8 images]`` per call, in job order.
        """
        key = ("eval", version)
        chunks = [c for c in np.array_split(np.arange(len(jobs)), len(self.rollout_actors)) if len(c)]
        work, images = StepWork(key, version, [], [], scored=score), []
        for actor, chunk in zip(self.rollout_actors, chunks, strict=False):
            ref, image_ref = actor.evaluate.options(num_returns=2).remote(
                [jobs[i] for i in chunk], seed, offset, weights=self.weights[version])
            for pool in self.pools.values() if score else ():
                pool.submit(ref, self.weights[version], key=(key, len(work.refs)))
            work.refs.append(ref)
            images.append(image_ref)
        return work, images

    def gather(self, inflight: dict, step: int | tuple[str, int],
               stop: Callable[[], bool] = lambda: False) -> None:
        """Collect scores (of any step) until every call of ``step`` has every reward.

        Raises :class:`RewardFailure` naming the reward whose pool gave up on a call,
        :class:`RolloutFailure` when the rollout it was given had failed,
        :class:`StepTimeout` after ``rollout.timeout_s``, and :class:`StopRequested` as
        soon as ``stop()`` is true.
        """
        if self.failure is not None:  # seen while an update was running
            failure, self.failure = self.failure, None
            raise failure
        work = inflight[step]
        want = len(work.refs)
        names = self.pools if work.scored else ()
        deadline = time.monotonic() + self.cfg.rollout.timeout_s
        while any(len(work.scores[name]) < want for name in names):
            if stop():
                raise StopRequested
            if time.monotonic() > deadline:
                missing = {n: want - len(work.scores[n]) for n in names if len(work.scores[n]) < want}
                raise StepTimeout(
                    f"step {work.step}: rollouts and scores not all in after rollout.timeout_s = "
                    f"{self.cfg.rollout.timeout_s:g} s (calls still missing per reward: {missing}); "
                    "raise rollout.timeout_s if steps are this slow, or check the actors' logs")
            self.collect(inflight, timeout=0.05)
        if not names:  # an evaluation scored by no reward: wait for its rollouts alone
            self.wait_refs(work.refs, deadline, stop, f"evaluation {work.step}")

    def wait_refs(self, refs: list, deadline: float, stop: Callable[[], bool], what: str) -> None:
        """Wait until ``refs`` are done, checking ``stop`` and the deadline meanwhile."""
        while len(ray.wait(refs, num_returns=len(refs), timeout=0.05, fetch_local=False)[0]) < len(refs):
            if stop():
                raise StopRequested
            if time.monotonic() > deadline:
                raise StepTimeout(f"{what}: not done after rollout.timeout_s = "
                                  f"{self.cfg.rollout.timeout_s:g} s")

    def collect(self, inflight: dict[int, StepWork], timeout: float) -> None:
        """One round over the pools: dispatch queued calls, file the scores that are in."""
        for name, pool in self.pools.items():
            try:
                done = pool.collect(timeout=timeout)
            except RewardError as e:
                self.raise_rollout_failure(inflight)  # the reward's input had failed?
                raise RewardFailure(name, e) from e
            for (s, call), scores in done:
                inflight[s].scores[name][call] = scores

    @staticmethod
    def raise_rollout_failure(inflight: dict[int, StepWork]) -> None:
        """Raise :class:`RolloutFailure` if a finished rollout of the work in flight is an
        error: a reward call fails when its input does, and must not take the blame."""
        for work in inflight.values():
            for call, ref in enumerate(work.refs):
                if not ray.wait([ref], timeout=0, fetch_local=False)[0]:
                    continue
                try:
                    ray.get(ref, timeout=5)
                except ray.exceptions.RayError as e:
                    raise RolloutFailure(
                        f"rollout of step {work.step} (call {call}) failed for good: "
                        f"{type(e).__name__}: {str(e).splitlines()[0][:300]}. A rollout actor is "
                        "restarted rollout.max_restarts times; past that the run stops") from e
                except Exception:  # slow to fetch: not evidence either way
                    continue

    def wait_update(self, refs: list[ray.ObjectRef], inflight: dict[int, StepWork]) -> None:
        """Wait for the learner's update while the reward pools keep working.

        A pool hands a finished rollout to a reward actor only while it is pumped, so
        without this the next step's rollouts would wait for the update to end before
        being scored. A reward failure seen here is raised by the next :meth:`gather`,
        once the update is complete.
        """
        deadline = time.monotonic() + self.cfg.learner.update_timeout_s
        while len(ray.wait(refs, num_returns=len(refs), timeout=0.02, fetch_local=False)[0]) < len(refs):
            if time.monotonic() > deadline:
                raise StepTimeout(
                    f"the learner's update did not finish within learner.update_timeout_s = "
                    f"{self.cfg.learner.update_timeout_s:g} s; raise it if updates are this "
                    "slow, or check the DeepSpeed ranks' logs")
            if self.failure is None:
                try:
                    self.collect(inflight, timeout=0.02)
                except RewardFailure as failure:
                    self.failure = failure

    def drop(self, name: str) -> None:
        """Stop scoring with reward ``name``: its pool and its actors go."""
        self.pools.pop(name).shutdown()

    def close(self) -> None:
        for pool in self.pools.values():
            pool.shutdown()
        self.learner.shutdown()


def step_scores_of(work: StepWork) -> np.ndarray:
    """Self-confidence along each sample's trajectory ``[N, S+1]`` (grpo.credit per_step)."""
    scored = work.scores.get(SC, {})
    parts = [scored[c].step_scores if c in scored else None for c in range(len(work.refs))]
    if any(p is None for p in parts):
        raise RuntimeError(f"step {work.step}: no self-confidence step scores for some rollouts "
                           "(the reward was dropped, or its workers were started without "
                           "grpo.credit per_step); per-step credit cannot train this step")
    return np.concatenate(parts)


def rewards_of(work: StepWork, names: list[str]) -> dict[str, np.ndarray]:
    """Each reward over the step's samples, in rollout-call order."""
    return {n: np.concatenate([work.scores[n][c].reward for c in range(len(work.refs))])
            for n in names}


def check_versions(work: StepWork) -> None:
    """Every score must be of the samples of the version that made them (self-confidence
    scores with that version's weights; external scores carry the rollout's version)."""
    for name, calls in work.scores.items():
        for call, scores in calls.items():
            if scores.weight_version != work.version:
                raise RuntimeError(f"step {work.step} call {call}: {name} scored weight version "
                                   f"{scores.weight_version}, sampled with {work.version}")
