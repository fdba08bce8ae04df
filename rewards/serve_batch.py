"""The reward server's micro-batcher: queued, decoded requests scored together on one thread.

Requests of the same image size are merged up to ``max_batch`` images, waiting at most
``max_wait_s`` for more after the first; when a merged call raises, each request is scored
alone, so one bad request fails only itself.
"""

from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from rewards.wire import details_of, reward_array


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
        """``(scores [n], details, images in the scorer call)``; raises what the scorer raised."""
        pending = _Pending(images, prompts, metadata, asyncio.get_running_loop().create_future())
        self._queue.append(pending)
        self._arrived.set()
        return await pending.future

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

    async def _next_batch(self, loop: asyncio.AbstractEventLoop) -> list[_Pending]:
        while not self._queue:
            self._arrived.clear()
            await self._arrived.wait()
        first = self._queue.popleft()
        batch, n = [first], len(first.images)
        deadline = loop.time() + self.max_wait_s
        while n < self.max_batch:
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
        out = self.scorer(images, prompts, metadata)
        self.stats.scorer_calls += 1
        scores, details = reward_array(out, n, self.name), details_of(out, n)
        results, start = [], 0
        for p in batch:
            stop = start + len(p.images)
            results.append((scores[start:stop], details[start:stop], n))
            start = stop
        return results
