"""The reward server's micro-batcher: queued, decoded requests scored together on one thread.

Requests of the same image size are merged up to ``max_batch`` images, waiting at most
``max_wait_s`` for more after the first; a request of more than ``max_batch`` images is
queued as chunks of at most ``max_batch``, so no scorer call ever gets more (a GPU scorer
sized for 64 images must not get 2,000). When a merged call raises, each chunk is scored
alone, so one bad request fails only itself.

A scorer raising ``ValueError``, ``KeyError`` or ``TypeError`` is refusing its input (a
metadata row it cannot read): that becomes :class:`InputRefused`, which the server
answers with 422, so clients do not retry it. Anything else is the server's failure (500).
"""

from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from rewards.wire import clip, details_of, reward_array

INPUT_ERRORS = (ValueError, KeyError, TypeError)  # raised by a scorer: it refuses the input


class InputRefused(Exception):
    """The scorer raised one of :data:`INPUT_ERRORS` for this input; the message is the
    original's type and (clipped) text."""


@dataclass(eq=False)
class _Pending:
    images: np.ndarray  # [n, H, W, 3] uint8
    prompts: list[str]
    metadata: list[dict]
    future: asyncio.Future


@dataclass
class _Stats:
    requests: int = 0
    images: int = 0
    scorer_calls: int = 0


class Batcher:
    """Queues decoded requests and scores them in batches on one scorer thread."""

    def __init__(self, scorer: Any, name: str, max_batch: int, max_wait_s: float) -> None:
        self.scorer, self.name = scorer, name
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self.stats = _Stats()
        # One thread: scorers need not be thread-safe, and the loop stays free.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scorer")
        self._queue: deque[_Pending] = deque()
        self._arrived = asyncio.Event()
        self.arriving = 0  # requests being read or decoded: worth waiting for

    async def score(self, images: np.ndarray, prompts: list[str], metadata: list[dict]
                    ) -> tuple[np.ndarray, list[dict], int]:
        """``(scores [n], details, images in the largest scorer call that scored them)``;
        raises what the scorer raised (:class:`InputRefused` when it refused the input)."""
        loop = asyncio.get_running_loop()
        chunks = [_Pending(images[i:i + self.max_batch], prompts[i:i + self.max_batch],
                           metadata[i:i + self.max_batch], loop.create_future())
                  for i in range(0, len(images), self.max_batch)]
        self._queue.extend(chunks)
        self._arrived.set()
        try:
            results = await asyncio.gather(*(c.future for c in chunks))
        except BaseException:  # one chunk failed, or the client went away: skip the rest
            for c in chunks:
                c.future.cancel()
            raise
        if len(results) == 1:
            return results[0]
        return (np.concatenate([r[0] for r in results]), [d for r in results for d in r[1]],
                max(r[2] for r in results))

    async def run(self) -> None:
        """The batching task: take a batch, score it on the thread, answer, repeat."""
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch(loop)
            results = await loop.run_in_executor(self.executor, self._score_batch, batch)
            for pending, result in zip(batch, results, strict=True):
                if pending.future.done():  # the client went away
                    continue
                if isinstance(result, BaseException):
                    pending.future.set_exception(result)
                else:
                    pending.future.set_result(result)

    def _discard_abandoned(self) -> None:
        """Drop queued chunks nobody waits for (their request failed or went away)."""
        while self._queue and self._queue[0].future.done():
            self._queue.popleft()

    async def _next_batch(self, loop: asyncio.AbstractEventLoop) -> list[_Pending]:
        self._discard_abandoned()
        while not self._queue:
            self._arrived.clear()
            await self._arrived.wait()
            self._discard_abandoned()
        first = self._queue.popleft()
        batch, n = [first], len(first.images)
        deadline = loop.time() + self.max_wait_s
        while n < self.max_batch:
            self._discard_abandoned()
            if self._queue:  # requests stay queued until taken: a timeout never loses one
                nxt = self._queue[0]
                if n + len(nxt.images) > self.max_batch or nxt.images.shape[1:] != first.images.shape[1:]:
                    break
                batch.append(self._queue.popleft())
                n += len(nxt.images)
                continue
            remaining = deadline - loop.time()
            if remaining <= 0 or not self.arriving:  # nothing on its way: do not wait
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                break
        return batch

    def _score_batch(self, batch: list[_Pending]) -> list[Any]:
        """On the scorer thread: one call for the batch; if it raises, each request alone."""
        try:
            return self._call(batch)
        except Exception as e:
            if len(batch) == 1:
                return [e]
        out = []
        for pending in batch:
            try:
                out += self._call([pending])
            except Exception as e:
                out.append(e)
        return out

    def _call(self, batch: list[_Pending]) -> list[tuple[np.ndarray, list[dict], int]]:
        images = np.concatenate([p.images for p in batch]) if len(batch) > 1 else batch[0].images
        prompts = [s for p in batch for s in p.prompts]
        metadata = [m for p in batch for m in p.metadata]
        n = len(images)
        try:
            out = self.scorer(images, prompts, metadata)
        except INPUT_ERRORS as e:
            raise InputRefused(f"{type(e).__name__}: {clip(e)}") from e
        self.stats.scorer_calls += 1
        scores, details = reward_array(out, n, self.name), details_of(out, n)
        results, start = [], 0
        for p in batch:
            stop = start + len(p.images)
            results.append((scores[start:stop], details[start:stop], n))
            start = stop
        return results
