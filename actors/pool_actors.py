"""The reward pool's actors: starting them, health checks, restarts, replacement, draining.

:class:`ScorerActor` is the actor shell; :class:`ScorerActors` applies ``ray.remote`` to
it once and keeps the pool's :class:`~actors.pool_calls.Slot` records. An actor must
answer ``ready()`` before it gets work, again after it errored or was restarted. One
whose running call overran ``timeout_s`` is restarted (``ray.kill(no_restart=False)``),
one dead for good is replaced, and a removed (draining) one is killed once its calls
are done. Calls an actor loses this way go back to the pool's :class:`Calls` queue.
Nothing here blocks: ``actors.pool.RewardPool`` waits, and routes each answered
``ready()`` to :meth:`ScorerActors.came_up`, ``send_ping`` or ``replace``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import ray

from actors.pool_calls import Calls, PoolStats, RewardError, Slot, describe


class ScorerActor:
    """Actor shell: builds one plain scorer with ``factory()`` and forwards to it."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        self.worker = factory()

    def ready(self) -> bool:
        return True

    def score(self, rollout: Any, weights: Any) -> Any:
        # ObjectRefs passed as top-level arguments arrive resolved (numpy zero-copy).
        return self.worker.score(rollout, weights)


class ScorerActors:
    """The pool's actors, one :class:`Slot` each; see the module docstring."""

    def __init__(self, factory: Callable[[], Any], options: dict[str, Any], *, calls: Calls,
                 stats: PoolStats, timeout_s: float, ready_timeout_s: float,
                 max_retries: int) -> None:
        self.factory, self.calls, self.stats = factory, calls, stats
        self.timeout_s, self.ready_timeout_s = timeout_s, ready_timeout_s
        self.max_retries = max_retries
        self.actor_cls = ray.remote(**options)(ScorerActor)  # the one ray.remote for scorers
        self.slots: dict[int, Slot] = {}
        self.next_id = 0
        self.pings: dict[Any, Slot] = {}  # pending ready() refs
        self.start_failures = 0  # actors in a row that never came up

    def add(self) -> Slot:
        slot = Slot(self.next_id, self.actor_cls.remote(self.factory))
        self.next_id += 1
        self.slots[slot.id] = slot
        self.send_ping(slot)
        return slot

    def send_ping(self, slot: Slot, since: float | None = None) -> None:
        slot.ready = False
        slot.ping, slot.ping_since = slot.handle.ready.remote(), since or time.monotonic()
        self.pings[slot.ping] = slot

    def came_up(self, slot: Slot) -> None:
        """``slot`` answered ``ready()``: it takes work again."""
        slot.ready = slot.ever_ready = True
        self.start_failures = 0

    def remove(self, slot: Slot) -> None:
        ray.kill(slot.handle, no_restart=True)
        self.pings.pop(slot.ping, None)
        self.slots.pop(slot.id, None)
        for attempt in list(slot.calls):  # only after a failure; re-queue, no retry charged
            self.calls.drop(attempt)
            self.calls.queue.appendleft(attempt.job)

    def replace(self, slot: Slot, error: BaseException | str) -> None:
        """Replace an actor that is dead for good or never came up."""
        if not slot.ever_ready:
            self.start_failures += 1
            if self.start_failures > self.max_retries:
                failure = RewardError(
                    f"reward actors fail to start ({self.start_failures} in a row); last "
                    f"error: {describe(error)}", last_error=describe(error))
                if isinstance(error, BaseException):
                    failure.__cause__ = error
                self.calls.errors.append(failure)
        draining = slot.draining
        self.remove(slot)
        if not draining:
            self.stats.replaced += 1
            self.add()

    def resize(self, n: int) -> None:
        """Grow or shrink to ``n`` taking work; removed actors are marked draining."""
        live = [s for s in self.slots.values() if not s.draining]
        draining = [s for s in self.slots.values() if s.draining]
        for _ in range(n - len(live)):
            if draining:  # cheaper than starting a new actor
                draining.pop().draining = False
            else:
                self.add()
        # Remove the least useful first: not ready, then least loaded.
        for slot in sorted(live, key=lambda s: (s.ready, len(s.calls)))[:max(len(live) - n, 0)]:
            slot.draining = True

    def reap_drained(self) -> None:
        for slot in [s for s in self.slots.values() if s.draining and not s.calls]:
            self.remove(slot)

    def kill_all(self) -> None:
        for slot in list(self.slots.values()):
            ray.kill(slot.handle, no_restart=True)
        self.slots.clear()
        self.pings.clear()

    # -- deadlines ---------------------------------------------------------------------

    def next_deadline(self, now: float) -> float | None:
        """Seconds until the next running call or ``ready()`` overruns; None if none."""
        ends = [s.head_since + self.timeout_s for s in self.slots.values() if s.calls]
        ends += [s.ping_since + self.ready_timeout_s for s in self.pings.values()]
        return max(min(ends) - now, 0.0) if ends else None

    def check_deadlines(self, now: float) -> None:
        for slot in list(self.slots.values()):
            if slot.ping is not None and now - slot.ping_since > self.ready_timeout_s:
                self.replace(slot, f"no answer to ready() within {self.ready_timeout_s} s")
            elif slot.calls and now - slot.head_since > self.timeout_s:
                self.time_out(slot)

    def time_out(self, slot: Slot) -> None:
        """The running call overran: retry it elsewhere and restart the stuck actor."""
        self.stats.timeouts += 1
        head, *behind = slot.calls
        for attempt in (head, *behind):
            ray.cancel(attempt.ref)  # removes queued calls; a running one only gets a flag
            self.calls.drop(attempt)
        for attempt in reversed(behind):  # not their fault: no retry charged
            self.calls.queue.appendleft(attempt.job)
        self.calls.retry(head.job, slot,
                         f"TimeoutError: no result within timeout_s={self.timeout_s} s")
        if slot.draining:
            self.remove(slot)
        else:
            ray.kill(slot.handle, no_restart=False)  # interrupts the stuck call
            self.pings.pop(slot.ping, None)
            self.send_ping(slot)
