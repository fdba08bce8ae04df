"""The reward pool: scores whole groups on a resizable set of Ray actors, as they finish.

``RewardPool`` lives in the driver and is the only place here that calls ``ray.get``.
Each actor is :class:`ScorerActor`, a thin shell around a plain scorer (e.g.
``actors.reward.SelfConfidenceWorker``) that a picklable zero-argument ``factory``
builds inside the actor. Why not Ray's ``ActorPool`` (docs/design.md trap 10): it keeps one
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

The pool is in three files: this one waits for events and routes them (the only
``ray.wait`` and ``ray.get`` calls); ``actors.pool_calls`` keeps the books of calls
(dispatch, stealing, retries); ``actors.pool_actors`` keeps the actors (start, health,
restart, replacement, draining).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import fields
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

from actors.pool_actors import ScorerActor, ScorerActors
from actors.pool_calls import Calls, PoolStats, RewardError, Slot, describe
from actors.scale import NAMESPACE, PoolControl

__all__ = ["PoolStats", "RewardError", "RewardPool", "ScorerActor"]

logger = logging.getLogger(__name__)


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
        name: str = "reward",
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
        self._calls = Calls(max_in_flight, max_retries, self.stats, name=name)
        self._actors = ScorerActors(factory, options, calls=self._calls, stats=self.stats,
                                    timeout_s=timeout_s, ready_timeout_s=ready_timeout_s,
                                    max_retries=max_retries)
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
        return sum(s.ready and not s.draining for s in self._actors.slots.values())

    @property
    def pending(self) -> int:
        """Submitted keys not yet returned by ``collect``."""
        return len(self._calls.jobs) + len(self._calls.finished)

    def actor_handles(self) -> list[Any]:
        """Handles of the actors taking work (for tests and diagnostics)."""
        return [s.handle for s in self._actors.slots.values() if not s.draining]

    def metrics(self) -> dict[str, float]:
        out = {f"reward/pool/{f.name}": float(getattr(self.stats, f.name))
               for f in fields(self.stats)}
        out.update({"reward/pool/size": self.size, "reward/pool/alive": self.alive,
                    "reward/pool/pending": self.pending})
        return out

    def submit(self, rollout_ref: Any, weights_ref: Any, key: Hashable) -> None:
        """Queue one call: score ``rollout_ref`` (whole groups) with ``weights_ref``."""
        self._calls.submit(rollout_ref, weights_ref, key)

    def collect(self, timeout: float | None = None) -> list[tuple[Hashable, Any]]:
        """Results ``(key, Scores)`` that finished, in completion order.

        Waits up to ``timeout`` seconds (None: until something finishes) and returns as
        soon as at least one result is in; returns ``[]`` on timeout or when nothing is
        pending. Raises :class:`RewardError` for a key whose retries are used up
        (results that finished meanwhile are kept for the next call).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        calls = self._calls
        while True:
            calls.dispatch(self._actors.slots)
            if calls.errors:
                raise calls.errors.popleft()
            if calls.finished or not calls.jobs:
                out = list(calls.finished)
                calls.finished.clear()
                return out
            if not self._pump(deadline):
                return []

    def wait_ready(self, timeout: float | None = None) -> int:
        """Block until every actor has answered ``ready()``; returns ``alive``.

        Call it at setup to fail loudly (``RewardError``) when the actors cannot start.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while any(not s.ready for s in self._actors.slots.values() if not s.draining):
            if self._calls.errors:
                raise self._calls.errors.popleft()
            if not self._pump(deadline):
                break
        return self.alive

    def resize(self, n: int) -> None:
        """Grow or shrink to ``n`` actors; removed actors drain before they are killed."""
        if n < 0:
            raise ValueError(f"pool size must be >= 0, got {n}")
        self._actors.resize(n)
        self._target = n
        if self._control is not None:
            self._control.set_size.remote(n)  # fire and forget: keep the control in step
        self._actors.reap_drained()

    def sync_control(self) -> int:
        """Apply a size set through the control actor (call once per step); returns it."""
        if self._control is None:
            return self._target
        try:
            desired = ray.get(self._control.get_size.remote(), timeout=30)
        except (RayActorError, GetTimeoutError) as e:  # never stop training for this
            logger.warning("reward pool control actor did not answer (%s); size stays %d",
                           describe(e), self._target)
            return self._target
        if desired != self._target:
            self.resize(desired)
        return desired

    def shutdown(self) -> None:
        """Kill every actor (and the control actor); pending work is dropped."""
        self._actors.kill_all()
        if self._control is not None:
            ray.kill(self._control, no_restart=True)
        self._calls.running.clear()
        self._control = None

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- events ------------------------------------------------------------------------

    def _pump(self, deadline: float | None) -> bool:
        """Wait for the next event (up to ``deadline``) and handle all that are in.

        Returns False once ``deadline`` has passed.
        """
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            return False
        refs = [*self._calls.running, *self._actors.pings, *self._calls.waiting]
        budget = self._actors.next_deadline(now)
        if deadline is not None:
            budget = deadline - now if budget is None else min(budget, deadline - now)
        if not refs:
            if budget is None:
                raise RewardError(f"{len(self._calls.jobs)} keys pending but the pool has no "
                                  f"actors (size {self.size}); resize it first")
            time.sleep(budget)
            return True
        done, rest = ray.wait(refs, num_returns=1, timeout=budget, fetch_local=False)
        if done and rest:  # take everything that is finished, not just the first
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0, fetch_local=False)
            done += more
        for ref in done:
            self._on_ready(ref)
        self._actors.check_deadlines(time.monotonic())
        self._actors.reap_drained()
        return True

    def _on_ready(self, ref: Any) -> None:
        if ref in self._calls.waiting:
            self._calls.queue.extend(self._calls.waiting.pop(ref))
        elif ref in self._actors.pings:
            self._on_ping(self._actors.pings.pop(ref), ref)
        elif ref in self._calls.running:
            self._on_result(ref)

    def _on_result(self, ref: Any) -> None:
        attempt = self._calls.running[ref]
        self._calls.drop(attempt)
        job, slot = attempt.job, attempt.slot
        try:
            scores = ray.get(ref)
        except RayActorError as e:
            self.stats.actor_errors += 1
            if slot.ready and slot.id in self._actors.slots:
                self._actors.send_ping(slot)  # restarted or dead: it must answer before serving
            self._calls.retry(job, slot, e)
        except Exception as e:  # the scorer raised (RayTaskError), or a bad argument
            self.stats.scorer_errors += 1
            self._calls.retry(job, slot, e)
        else:
            self._calls.finish(job, scores)

    def _on_ping(self, slot: Slot, ref: Any) -> None:
        slot.ping = None
        try:
            ray.get(ref)
        except ActorUnavailableError:  # restarting: ask again, same ready_timeout_s clock
            self._actors.send_ping(slot, since=slot.ping_since)
        except Exception as e:  # dead for good, or its constructor raised
            self._actors.replace(slot, e)
        else:
            self._actors.came_up(slot)
