"""The reward pool's books of scoring calls: which keys wait, run, finished or failed.

:class:`Calls` holds every submitted key from ``submit`` until ``collect`` returns it
(or raises its :class:`RewardError`), dispatches jobs to actors (least loaded first,
work stealing by idle actors) and charges retries. It never blocks: the waiting
(``ray.wait``, ``ray.get``) is ``actors.pool.RewardPool``'s, and the actors' health
(pings, restarts, replacement) is ``actors.pool_actors``'.

The records shared by the pool's modules live here too: :class:`Job` (one key),
:class:`Slot` (one actor and the calls it has in flight) and :class:`Attempt` (one
call of a job on a slot).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

logger = logging.getLogger(__name__)


class RewardError(RuntimeError):
    """A key could not be scored (retries used up), or the actors cannot start."""

    def __init__(self, message: str, key: Hashable | None = None, last_error: str = "") -> None:
        super().__init__(message)
        self.key, self.last_error = key, last_error


def describe(error: BaseException | str) -> str:
    """One line: the scorer's own exception, without Ray's traceback wrapper."""
    if isinstance(error, str):
        return error
    if isinstance(error, RayActorError) and error.actor_init_failed:
        # The message ends with the constructor's exception, after its traceback.
        return f"the scorer's constructor raised {str(error).strip().splitlines()[-1]}"
    if isinstance(error, RayTaskError) and error.cause is not None:
        error = error.cause
    return f"{type(error).__name__}: {error}".splitlines()[0]


@dataclass
class PoolStats:
    """Cumulative counters since the pool started."""

    submitted: int = 0
    completed: int = 0
    failed: int = 0  # keys given up on (RewardError raised)
    retries: int = 0
    timeouts: int = 0
    actor_errors: int = 0
    scorer_errors: int = 0
    stolen: int = 0  # queued calls moved to an idle actor
    replaced: int = 0  # actors dead for good, replaced by new ones


@dataclass(eq=False)
class Job:
    key: Hashable
    rollout: Any
    weights: Any
    failures: int = 0
    tried: set[int] = field(default_factory=set)  # slot ids this job failed on
    last_error: str = ""


@dataclass(eq=False)
class Slot:
    id: int
    handle: Any
    ready: bool = False  # answered ready() since it was created or last failed
    ever_ready: bool = False
    draining: bool = False
    calls: list[Attempt] = field(default_factory=list)  # in flight, in submission order
    head_since: float = 0.0  # when calls[0] started running (as far as the driver knows)
    ping: Any = None  # ObjectRef of the pending ready() call
    ping_since: float = 0.0


@dataclass(eq=False)
class Attempt:
    job: Job
    slot: Slot
    ref: Any


class Calls:
    """Every key from ``submit`` until ``collect`` hands it back; see the module docstring."""

    def __init__(self, max_in_flight: int, max_retries: int, stats: PoolStats,
                 name: str = "reward") -> None:
        self.max_in_flight, self.max_retries, self.stats = max_in_flight, max_retries, stats
        self.name = name  # the reward's, in the driver's log lines
        self.jobs: dict[Hashable, Job] = {}  # submitted, not yet finished
        self.waiting: dict[Any, list[Job]] = {}  # rollout ref -> jobs waiting for it
        self.queue: deque[Job] = deque()  # inputs ready, not dispatched
        self.running: dict[Any, Attempt] = {}  # live attempt refs
        self.finished: deque[tuple[Hashable, Any]] = deque()
        self.errors: deque[RewardError] = deque()  # raised by the pool's next collect

    def submit(self, rollout_ref: Any, weights_ref: Any, key: Hashable) -> None:
        if key in self.jobs or any(k == key for k, _ in self.finished):
            raise ValueError(f"key {key!r} is already pending; keys must be unique")
        job = Job(key, rollout_ref, weights_ref)
        self.jobs[key] = job
        self.stats.submitted += 1
        if isinstance(rollout_ref, ray.ObjectRef):
            self.waiting.setdefault(rollout_ref, []).append(job)
        else:
            self.queue.append(job)

    def finish(self, job: Job, scores: Any) -> None:
        del self.jobs[job.key]
        self.finished.append((job.key, scores))
        self.stats.completed += 1

    # -- dispatch ----------------------------------------------------------------------

    def pick(self, job: Job, slots: dict[int, Slot]) -> Slot | None:
        serving = [s for s in slots.values() if s.ready and not s.draining]
        free = [s for s in serving if len(s.calls) < self.max_in_flight]
        untried = [s for s in free if s.id not in job.tried]
        if untried:
            return min(untried, key=lambda s: len(s.calls))
        if any(s.id not in job.tried for s in slots.values() if not s.draining):
            return None  # an actor it has not failed on exists: wait for it
        return min(free, key=lambda s: len(s.calls)) if free else None

    def start(self, job: Job, slot: Slot) -> None:
        ref = slot.handle.score.remote(job.rollout, job.weights)
        if not slot.calls:
            slot.head_since = time.monotonic()
        attempt = Attempt(job, slot, ref)
        slot.calls.append(attempt)
        self.running[ref] = attempt

    def dispatch(self, slots: dict[int, Slot]) -> None:
        """Start queued jobs where there is room, then let idle actors steal."""
        for job in list(self.queue):
            slot = self.pick(job, slots)
            if slot is not None:
                self.queue.remove(job)
                self.start(job, slot)
        if self.queue:
            return
        # Work stealing: an idle actor takes the not-yet-started tail call of a busy one.
        for idle in [s for s in slots.values() if s.ready and not s.draining and not s.calls]:
            busy = [s for s in slots.values() if len(s.calls) >= 2]
            if not busy:
                return
            victim = max(busy, key=lambda s: len(s.calls))
            attempt = victim.calls[-1]
            if idle.id in attempt.job.tried:
                continue
            ray.cancel(attempt.ref)  # not started yet; if it did, its result is ignored
            self.drop(attempt)
            self.stats.stolen += 1
            self.start(attempt.job, idle)

    def drop(self, attempt: Attempt) -> None:
        """Forget an attempt: its ref is no longer watched, so its result is never read."""
        self.running.pop(attempt.ref, None)
        calls = attempt.slot.calls
        if attempt in calls:
            was_head = calls[0] is attempt
            calls.remove(attempt)
            if was_head:
                attempt.slot.head_since = time.monotonic()

    def retry(self, job: Job, slot: Slot, error: BaseException | str) -> None:
        """Charge ``job`` a failure on ``slot``: re-queue it first, or give up on it."""
        job.failures += 1
        job.tried.add(slot.id)
        job.last_error = f"{describe(error)} (on actor {slot.id})"
        if job.failures > self.max_retries:
            del self.jobs[job.key]
            self.stats.failed += 1
            failure = RewardError(
                f"reward for key {job.key!r} failed {job.failures} times (max_retries="
                f"{self.max_retries}); last error: {job.last_error}",
                key=job.key, last_error=job.last_error)
            if isinstance(error, BaseException):
                failure.__cause__ = error  # the full remote traceback
            self.errors.append(failure)
        else:
            self.stats.retries += 1
            logger.warning("reward %r: call %r failed, retry %d of %d: %s", self.name, job.key,
                           job.failures, self.max_retries, job.last_error[:300])
            self.queue.appendleft(job)  # retried work first
