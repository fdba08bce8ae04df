"""The reward pool: scores whole groups on a resizable set of Ray actors, as they finish.

``RewardPool`` lives in the driver and is the only place here that calls ``ray.get``.
Each actor is :class:`ScorerActor`, a thin shell around a plain scorer (e.g.
``actors.reward.SelfConfidenceWorker``) that a picklable zero-argument ``factory``
builds inside the actor. Why not Ray's ``ActorPool`` (DESIGN.md trap 10): it keeps one
task per actor and has no timeouts, retries or health handling.

How a key flows (every submitted key is returned by ``collect`` exactly once, or its
failure is raised as :class:`RewardError`):

* ``submit`` queues a job; it is dispatched once its rollout exists (``ray.wait`` on
  the rollout ref), so a call's time limit never counts time spent waiting for the
  rollout actor.
* Dispatch goes to the least loaded ready actor, preferring actors the job has not
  failed on, up to ``max_in_flight`` calls per actor (1 running + 1 queued by default,
  so an actor does not idle between calls). An idle actor steals the queued (not
  started) tail call of a busy one, so a slow call does not hold up the call behind it.
* A job has at most one live attempt, and only the live attempt's ``ObjectRef`` is
  watched: a call that is timed out, stolen or abandoned is dropped from the books
  before it is retried, so its late result is never read (no double counting).
* Failure (actor died, exception in the scorer) or no result ``timeout_s`` after the
  call started running: the job is retried on another actor, at most ``max_retries``
  times. A running call of a synchronous actor cannot be interrupted (``ray.cancel``
  only sets a flag), so a timed-out actor is restarted with ``ray.kill(no_restart=
  False)``; calls queued behind it are re-queued without being charged a retry.
* An actor that errored, or was restarted, must answer ``ready()`` before it gets work
  again; one that is dead for good (restarts used up) is replaced by a new actor.
* ``resize`` shrinks by draining: a removed actor gets no new work, finishes what it
  has, and is then killed. The desired size can be set from outside the job through
  the named ``actors.scale.PoolControl`` actor (``python -m actors.scale``); the
  driver applies it with ``sync_control()`` once per step.
* ``wait_ready()`` at setup surfaces a scorer whose constructor fails as a
  ``RewardError`` (after ``max_retries`` replacement actors also failed).

Placement: each actor asks for ``{resource: 1}`` if the cluster declares that custom
resource when the pool is created (``ray start --resources='{"reward": 4}'`` on the
scoring nodes), plus ``num_cpus``/``num_gpus``; if no node declares it, the resource
is left out and placement falls back to ``num_cpus``/``num_gpus`` alone (a
single-machine run needs no setup). ``require_resource=True`` always asks for it, so an
autoscaling cluster starts reward nodes for pending actors. ``pool.placement`` says which
was used.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, fields
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

from actors.scale import NAMESPACE, PoolControl

logger = logging.getLogger(__name__)


class RewardError(RuntimeError):
    """A key could not be scored (retries used up), or the actors cannot start."""

    def __init__(self, message: str, key: Hashable | None = None, last_error: str = "") -> None:
        super().__init__(message)
        self.key, self.last_error = key, last_error


def _describe(error: BaseException | str) -> str:
    """One line: the scorer's own exception, without Ray's traceback wrapper."""
    if isinstance(error, str):
        return error
    if isinstance(error, RayActorError) and error.actor_init_failed:
        # The message ends with the constructor's exception, after its traceback.
        return f"the scorer's constructor raised {str(error).strip().splitlines()[-1]}"
    if isinstance(error, RayTaskError) and error.cause is not None:
        error = error.cause
    return f"{type(error).__name__}: {error}".splitlines()[0]


class ScorerActor:
    """Actor shell: builds one plain scorer with ``factory()`` and forwards to it."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        self.worker = factory()

    def ready(self) -> bool:
        return True

    def score(self, rollout: Any, weights: Any) -> Any:
        # ObjectRefs passed as top-level arguments arrive resolved (numpy zero-copy).
        return self.worker.score(rollout, weights)


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
class _Job:
    key: Hashable
    rollout: Any
    weights: Any
    failures: int = 0
    tried: set[int] = field(default_factory=set)  # slot ids this job failed on
    last_error: str = ""


@dataclass(eq=False)
class _Slot:
    id: int
    handle: Any
    ready: bool = False  # answered ready() since it was created or last failed
    ever_ready: bool = False
    draining: bool = False
    calls: list[_Attempt] = field(default_factory=list)  # in flight, in submission order
    head_since: float = 0.0  # when calls[0] started running (as far as the driver knows)
    ping: Any = None  # ObjectRef of the pending ready() call
    ping_since: float = 0.0


@dataclass(eq=False)
class _Attempt:
    job: _Job
    slot: _Slot
    ref: Any


class RewardPool:
    """Scores whole groups on ``num_actors`` actors; see the module docstring."""

    def __init__(
        self,
        factory: Callable[[], Any],
        num_actors: int,
        *,
        timeout_s: float = 600.0,
        max_retries: int = 2,
        max_in_flight: int = 2,
        max_restarts: int = 2,
        resource: str | None = "reward",
        require_resource: bool = False,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        ready_timeout_s: float = 600.0,
        control_name: str | None = None,
    ) -> None:
        if num_actors < 0 or max_retries < 0 or max_in_flight < 1 or timeout_s <= 0:
            raise ValueError("need num_actors >= 0, max_retries >= 0, max_in_flight >= 1 and "
                             f"timeout_s > 0; got {num_actors}, {max_retries}, {max_in_flight}, "
                             f"{timeout_s}")
        self.factory, self.timeout_s, self.max_retries = factory, timeout_s, max_retries
        self.max_in_flight, self.ready_timeout_s = max_in_flight, ready_timeout_s
        self.stats = PoolStats()
        options: dict[str, Any] = dict(num_cpus=num_cpus, num_gpus=num_gpus,
                                       max_restarts=max_restarts, max_task_retries=0)
        # The custom resource if required (an autoscaler then starts nodes that have it),
        # or if the cluster has it now; else CPU/GPU placement.
        self.placement = "cpu"
        if resource and (require_resource or ray.cluster_resources().get(resource, 0) > 0):
            options["resources"] = {resource: 1}
            self.placement = resource
        self._actor_cls = ray.remote(**options)(ScorerActor)  # the one ray.remote for scorers
        self._slots: dict[int, _Slot] = {}
        self._next_id = 0
        self._jobs: dict[Hashable, _Job] = {}  # submitted, not yet finished
        self._waiting: dict[Any, list[_Job]] = {}  # rollout ref -> jobs waiting for it
        self._queue: deque[_Job] = deque()  # inputs ready, not dispatched
        self._running: dict[Any, _Attempt] = {}  # live attempt refs
        self._pings: dict[Any, _Slot] = {}
        self._finished: deque[tuple[Hashable, Any]] = deque()
        self._errors: deque[RewardError] = deque()
        self._start_failures = 0
        self._target = 0
        self._control = None
        if control_name:
            try:
                self._control = ray.remote(PoolControl).options(
                    name=control_name, namespace=NAMESPACE, num_cpus=0
                ).remote(num_actors)
            except ValueError as e:
                raise RewardError(f"a pool control actor named {control_name!r} already exists "
                                  f"in namespace {NAMESPACE!r}; give this pool another "
                                  f"control_name ({e})") from None
        self.resize(num_actors)

    # -- public API --------------------------------------------------------------------

    @property
    def size(self) -> int:
        """The target number of actors."""
        return self._target

    @property
    def alive(self) -> int:
        """Actors that are up and taking work (not starting, failed or draining)."""
        return sum(s.ready and not s.draining for s in self._slots.values())

    @property
    def pending(self) -> int:
        """Submitted keys not yet returned by ``collect``."""
        return len(self._jobs) + len(self._finished)

    def actor_handles(self) -> list[Any]:
        """Handles of the actors taking work (for tests and diagnostics)."""
        return [s.handle for s in self._slots.values() if not s.draining]

    def metrics(self) -> dict[str, float]:
        out = {f"reward/pool/{f.name}": float(getattr(self.stats, f.name))
               for f in fields(self.stats)}
        out.update({"reward/pool/size": self.size, "reward/pool/alive": self.alive,
                    "reward/pool/pending": self.pending})
        return out

    def submit(self, rollout_ref: Any, weights_ref: Any, key: Hashable) -> None:
        """Queue one call: score ``rollout_ref`` (whole groups) with ``weights_ref``."""
        if key in self._jobs or any(k == key for k, _ in self._finished):
            raise ValueError(f"key {key!r} is already pending; keys must be unique")
        job = _Job(key, rollout_ref, weights_ref)
        self._jobs[key] = job
        self.stats.submitted += 1
        if isinstance(rollout_ref, ray.ObjectRef):
            self._waiting.setdefault(rollout_ref, []).append(job)
        else:
            self._queue.append(job)

    def collect(self, timeout: float | None = None) -> list[tuple[Hashable, Any]]:
        """Results ``(key, Scores)`` that finished, in completion order.

        Waits up to ``timeout`` seconds (None: until something finishes) and returns as
        soon as at least one result is in; returns ``[]`` on timeout or when nothing is
        pending. Raises :class:`RewardError` for a key whose retries are used up
        (results that finished meanwhile are kept for the next call).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._dispatch()
            if self._errors:
                raise self._errors.popleft()
            if self._finished or not self._jobs:
                out = list(self._finished)
                self._finished.clear()
                return out
            if not self._pump(deadline):
                return []

    def wait_ready(self, timeout: float | None = None) -> int:
        """Block until every actor has answered ``ready()``; returns ``alive``.

        Call it at setup to fail loudly (``RewardError``) when the actors cannot start.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while any(not s.ready for s in self._slots.values() if not s.draining):
            if self._errors:
                raise self._errors.popleft()
            if not self._pump(deadline):
                break
        return self.alive

    def _pump(self, deadline: float | None) -> bool:
        """Wait for the next event (up to ``deadline``) and handle all that are in.

        Returns False once ``deadline`` has passed.
        """
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            return False
        refs = [*self._running, *self._pings, *self._waiting]
        budget = self._next_deadline(now)
        if deadline is not None:
            budget = deadline - now if budget is None else min(budget, deadline - now)
        if not refs:
            if budget is None:
                raise RewardError(f"{len(self._jobs)} keys pending but the pool has no "
                                  f"actors (size {self.size}); resize it first")
            time.sleep(budget)
            return True
        done, rest = ray.wait(refs, num_returns=1, timeout=budget, fetch_local=False)
        if done and rest:  # take everything that is finished, not just the first
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0, fetch_local=False)
            done += more
        for ref in done:
            self._on_ready(ref)
        self._check_deadlines(time.monotonic())
        self._reap_drained()
        return True

    def resize(self, n: int) -> None:
        """Grow or shrink to ``n`` actors; removed actors drain before they are killed."""
        if n < 0:
            raise ValueError(f"pool size must be >= 0, got {n}")
        live = [s for s in self._slots.values() if not s.draining]
        draining = [s for s in self._slots.values() if s.draining]
        for _ in range(n - len(live)):
            if draining:  # cheaper than starting a new actor
                draining.pop().draining = False
            else:
                self._add_slot()
        # Remove the least useful first: not ready, then least loaded.
        for slot in sorted(live, key=lambda s: (s.ready, len(s.calls)))[:max(len(live) - n, 0)]:
            slot.draining = True
        self._target = n
        if self._control is not None:
            self._control.set_size.remote(n)  # fire and forget: keep the control in step
        self._reap_drained()

    def sync_control(self) -> int:
        """Apply a size set through the control actor (call once per step); returns it."""
        if self._control is None:
            return self._target
        try:
            desired = ray.get(self._control.get_size.remote(), timeout=30)
        except (RayActorError, GetTimeoutError) as e:  # never stop training for this
            logger.warning("reward pool control actor did not answer (%s); size stays %d",
                           _describe(e), self._target)
            return self._target
        if desired != self._target:
            self.resize(desired)
        return desired

    def shutdown(self) -> None:
        """Kill every actor (and the control actor); pending work is dropped."""
        for slot in list(self._slots.values()):
            ray.kill(slot.handle, no_restart=True)
        if self._control is not None:
            ray.kill(self._control, no_restart=True)
        self._slots.clear()
        self._running.clear()
        self._pings.clear()
        self._control = None

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- actors ------------------------------------------------------------------------

    def _add_slot(self) -> _Slot:
        slot = _Slot(self._next_id, self._actor_cls.remote(self.factory))
        self._next_id += 1
        self._slots[slot.id] = slot
        self._send_ping(slot)
        return slot

    def _send_ping(self, slot: _Slot, since: float | None = None) -> None:
        slot.ready = False
        slot.ping, slot.ping_since = slot.handle.ready.remote(), since or time.monotonic()
        self._pings[slot.ping] = slot

    def _remove_slot(self, slot: _Slot) -> None:
        ray.kill(slot.handle, no_restart=True)
        self._pings.pop(slot.ping, None)
        self._slots.pop(slot.id, None)
        for attempt in list(slot.calls):  # only after a failure; re-queue, no retry charged
            self._drop(attempt)
            self._queue.appendleft(attempt.job)

    def _replace(self, slot: _Slot, error: BaseException | str) -> None:
        """Replace an actor that is dead for good or never came up."""
        if not slot.ever_ready:
            self._start_failures += 1
            if self._start_failures > self.max_retries:
                failure = RewardError(
                    f"reward actors fail to start ({self._start_failures} in a row); last "
                    f"error: {_describe(error)}", last_error=_describe(error))
                if isinstance(error, BaseException):
                    failure.__cause__ = error
                self._errors.append(failure)
        draining = slot.draining
        self._remove_slot(slot)
        if not draining:
            self.stats.replaced += 1
            self._add_slot()

    # -- dispatch ----------------------------------------------------------------------

    def _pick(self, job: _Job) -> _Slot | None:
        serving = [s for s in self._slots.values() if s.ready and not s.draining]
        free = [s for s in serving if len(s.calls) < self.max_in_flight]
        untried = [s for s in free if s.id not in job.tried]
        if untried:
            return min(untried, key=lambda s: len(s.calls))
        if any(s.id not in job.tried for s in self._slots.values() if not s.draining):
            return None  # an actor it has not failed on exists: wait for it
        return min(free, key=lambda s: len(s.calls)) if free else None

    def _start(self, job: _Job, slot: _Slot) -> None:
        ref = slot.handle.score.remote(job.rollout, job.weights)
        if not slot.calls:
            slot.head_since = time.monotonic()
        attempt = _Attempt(job, slot, ref)
        slot.calls.append(attempt)
        self._running[ref] = attempt

    def _dispatch(self) -> None:
        for job in list(self._queue):
            slot = self._pick(job)
            if slot is not None:
                self._queue.remove(job)
                self._start(job, slot)
        if self._queue:
            return
        # Work stealing: an idle actor takes the not-yet-started tail call of a busy one.
        for idle in [s for s in self._slots.values()
                     if s.ready and not s.draining and not s.calls]:
            busy = [s for s in self._slots.values() if len(s.calls) >= 2]
            if not busy:
                return
            victim = max(busy, key=lambda s: len(s.calls))
            attempt = victim.calls[-1]
            if idle.id in attempt.job.tried:
                continue
            ray.cancel(attempt.ref)  # not started yet; if it did, its result is ignored
            self._drop(attempt)
            self.stats.stolen += 1
            self._start(attempt.job, idle)

    def _drop(self, attempt: _Attempt) -> None:
        """Forget an attempt: its ref is no longer watched, so its result is never read."""
        self._running.pop(attempt.ref, None)
        calls = attempt.slot.calls
        if attempt in calls:
            was_head = calls[0] is attempt
            calls.remove(attempt)
            if was_head:
                attempt.slot.head_since = time.monotonic()

    # -- events ------------------------------------------------------------------------

    def _on_ready(self, ref: Any) -> None:
        if ref in self._waiting:
            self._queue.extend(self._waiting.pop(ref))
        elif ref in self._pings:
            self._on_ping(self._pings.pop(ref), ref)
        elif ref in self._running:
            attempt = self._running[ref]
            self._drop(attempt)
            job, slot = attempt.job, attempt.slot
            try:
                scores = ray.get(ref)
            except RayActorError as e:
                self.stats.actor_errors += 1
                if slot.ready and slot.id in self._slots:
                    self._send_ping(slot)  # restarted or dead: it must answer before serving
                self._retry(job, slot, e)
            except Exception as e:  # the scorer raised (RayTaskError), or a bad argument
                self.stats.scorer_errors += 1
                self._retry(job, slot, e)
            else:
                del self._jobs[job.key]
                self._finished.append((job.key, scores))
                self.stats.completed += 1

    def _on_ping(self, slot: _Slot, ref: Any) -> None:
        slot.ping = None
        try:
            ray.get(ref)
        except ActorUnavailableError:  # restarting: ask again, same ready_timeout_s clock
            self._send_ping(slot, since=slot.ping_since)
        except Exception as e:  # dead for good, or its constructor raised
            self._replace(slot, e)
        else:
            slot.ready = slot.ever_ready = True
            self._start_failures = 0

    def _retry(self, job: _Job, slot: _Slot, error: BaseException | str) -> None:
        job.failures += 1
        job.tried.add(slot.id)
        job.last_error = f"{_describe(error)} (on actor {slot.id})"
        if job.failures > self.max_retries:
            del self._jobs[job.key]
            self.stats.failed += 1
            failure = RewardError(
                f"reward for key {job.key!r} failed {job.failures} times (max_retries="
                f"{self.max_retries}); last error: {job.last_error}",
                key=job.key, last_error=job.last_error)
            if isinstance(error, BaseException):
                failure.__cause__ = error  # the full remote traceback
            self._errors.append(failure)
        else:
            self.stats.retries += 1
            self._queue.appendleft(job)  # retried work first

    def _next_deadline(self, now: float) -> float | None:
        ends = [s.head_since + self.timeout_s for s in self._slots.values() if s.calls]
        ends += [s.ping_since + self.ready_timeout_s for s in self._pings.values()]
        return max(min(ends) - now, 0.0) if ends else None

    def _check_deadlines(self, now: float) -> None:
        for slot in list(self._slots.values()):
            if slot.ping is not None and now - slot.ping_since > self.ready_timeout_s:
                self._replace(slot, f"no answer to ready() within {self.ready_timeout_s} s")
            elif slot.calls and now - slot.head_since > self.timeout_s:
                self._time_out(slot)

    def _time_out(self, slot: _Slot) -> None:
        """The running call overran: retry it elsewhere and restart the stuck actor."""
        self.stats.timeouts += 1
        head, *behind = slot.calls
        for attempt in (head, *behind):
            ray.cancel(attempt.ref)  # removes queued calls; a running one only gets a flag
            self._drop(attempt)
        for attempt in reversed(behind):  # not their fault: no retry charged
            self._queue.appendleft(attempt.job)
        self._retry(head.job, slot, f"TimeoutError: no result within timeout_s={self.timeout_s} s")
        if slot.draining:
            self._remove_slot(slot)
        else:
            ray.kill(slot.handle, no_restart=False)  # interrupts the stuck call
            self._pings.pop(slot.ping, None)
            self._send_ping(slot)

    def _reap_drained(self) -> None:
        for slot in [s for s in self._slots.values() if s.draining and not s.calls]:
            self._remove_slot(slot)
