"""The reward server: any scorer class over HTTP, behind a token, micro-batched.

    SOLACE_REWARD_TOKEN=... python -m rewards.serve --scorer rewards.shapes:ShapesReward \\
        --port 8765 --token-env SOLACE_REWARD_TOKEN [--kwargs JSON] [--host 127.0.0.1]
        [--token-file F] [--cert C --key K] [--max-batch 64] [--max-body-mb 32] [--max-wait-ms 5]

Routes (``rewards/wire.py`` has the JSON schema):

* ``POST /score``: score images; 200 with scores, 400 (not JSON), 401 (token), 413 (body
  over ``--max-body-mb``), 415 (not ``application/json``), 422 (schema, naming the field),
  500 (the scorer raised; the server keeps serving).
* ``GET /health``: the scorer's name and version and counters. It needs the token too, so
  a client's preflight checks its token.

Security: every request must carry ``Authorization: Bearer <token>`` (compared with
``hmac.compare_digest``); the server refuses to start without a token unless given
``--insecure-no-token``. Bodies are parsed as JSON with a strict schema, never unpickled
(DESIGN.md trap 9). ``--cert``/``--key`` serve HTTPS. PNG sizes are checked from their
headers before decoding (``wire.MAX_IMAGE_PIXELS``).

Batching: handlers validate and decode, then queue their images; one batching task takes
queued requests (same image size, up to ``--max-batch`` images, waiting at most
``--max-wait-ms`` for more after the first) and runs the scorer on one thread, so the event
loop keeps accepting and decoding meanwhile. When a batched call raises, each request of
it is scored alone, so one bad request fails only itself.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import inspect
import json
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web
from pydantic import ValidationError

from rewards.wire import (
    Health,
    ScoreRequest,
    WireError,
    decode_images,
    describe_validation_error,
    details_of,
    import_scorer,
    reward_array,
)

logger = logging.getLogger("rewards.serve")
READY_LINE = "rewards.serve listening on "  # ServerProcess waits for this line on stdout


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


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def make_app(scorer: Any, name: str, version: str, token: str | None, *, max_batch: int = 64,
             max_body_bytes: int = 32 << 20, max_wait_s: float = 0.005) -> web.Application:
    """The aiohttp application serving ``scorer``; ``token=None`` accepts any request."""
    batcher = Batcher(scorer, name, max_batch, max_wait_s)
    expected = token.encode() if token is not None else None

    @web.middleware
    async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
        if expected is not None:
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
                logger.warning("401 for %s %s from %s", request.method, request.path, request.remote)
                return _error(401, "missing or wrong bearer token", **{"WWW-Authenticate": "Bearer"})
        try:
            return await handler(request)
        except web.HTTPException as e:  # 404, 405, 413 from aiohttp: the same JSON shape
            if e.status < 400:
                raise
            return _error(e.status, e.text or e.reason)

    async def health(request: web.Request) -> web.Response:
        s = batcher.stats
        return web.json_response(Health(name=name, version=version, max_batch=max_batch,
                                        requests=s.requests, images=s.images,
                                        scorer_calls=s.scorer_calls).model_dump())

    async def score(request: web.Request) -> web.Response:
        if request.content_type != "application/json":
            return _error(415, f"content type must be application/json, got {request.content_type!r}")
        batcher.arriving += 1
        try:
            body = await request.read()  # raises 413 past client_max_size
            req = ScoreRequest.model_validate_json(body)
            images = decode_images(req.images)
        except ValidationError as e:
            invalid_json = any(err["type"] == "json_invalid" for err in e.errors())
            status = 400 if invalid_json else 422
            return _error(status, ("body is not valid JSON: " if invalid_json else "")
                          + describe_validation_error(e))
        except WireError as e:
            return _error(422, str(e))
        finally:
            batcher.arriving -= 1
        batcher.stats.requests += 1
        batcher.stats.images += len(images)
        try:
            scores, details, batch_images = await batcher.score(images, req.prompts, req.metadata)
        except Exception as e:
            logger.warning("scorer raised %s: %s", type(e).__name__, e)
            return _error(500, f"scorer raised {type(e).__name__}: {e}")
        # Plain json.dumps: the answer is built from checked floats, no model needed.
        return web.Response(body=json.dumps({
            "scores": scores.tolist(), "details": details, "name": name, "version": version,
            "batch_images": batch_images}), content_type="application/json")

    async def batching(app: web.Application):
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()
        batcher.executor.shutdown(wait=False, cancel_futures=True)

    app = web.Application(client_max_size=max_body_bytes, middlewares=[guard])
    app.router.add_get("/health", health)
    app.router.add_post("/score", score)
    app.cleanup_ctx.append(batching)
    return app


def scorer_version(scorer: Any) -> str:
    """The scorer's ``version`` attribute, else a hash of its module's source file."""
    if getattr(scorer, "version", None) is not None:
        return str(scorer.version)
    try:
        return "sha256:" + hashlib.sha256(Path(inspect.getfile(type(scorer))).read_bytes()).hexdigest()[:12]
    except (TypeError, OSError):
        return "unknown"


def read_token(token_file: str | None, token_env: str | None) -> str | None:
    """The bearer token from a file or an environment variable; errors name the source."""
    if token_file and token_env:
        raise SystemExit("give --token-file or --token-env, not both")
    if token_file:
        path = Path(token_file)
        if not path.is_file():
            raise SystemExit(f"--token-file {path}: no such file")
        if path.stat().st_mode & 0o077:
            logger.warning("token file %s is readable by other users (chmod 600 it)", path)
        token = path.read_text().strip()
        source = f"--token-file {path}"
    elif token_env:
        token = os.environ.get(token_env, "").strip()
        source = f"--token-env {token_env}"
    else:
        return None
    if not token:
        raise SystemExit(f"{source}: the token is empty")
    return token


async def _start(app: web.Application, sock: socket.socket,
                 ssl_context: ssl.SSLContext | None) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)  # a log line per request costs ~10 % throughput
    await runner.setup()
    await web.SockSite(runner, sock, ssl_context=ssl_context).start()
    return runner


async def _serve(app: web.Application, sock: socket.socket, ssl_context: ssl.SSLContext | None,
                 url: str) -> None:
    runner = await _start(app, sock, ssl_context)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(READY_LINE + url, flush=True)
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Serve a reward scorer class over HTTP (JSON + PNG).")
    p.add_argument("--scorer", required=True, help="'package.module:Class' of the scorer")
    p.add_argument("--kwargs", default="{}", help="JSON object of constructor arguments")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: all)")
    p.add_argument("--port", type=int, default=8765, help="port (0: any free port)")
    p.add_argument("--token-file", help="file holding the bearer token")
    p.add_argument("--token-env", help="environment variable holding the bearer token")
    p.add_argument("--insecure-no-token", action="store_true",
                   help="serve without a token (anyone who can connect may use the scorer)")
    p.add_argument("--cert", help="TLS certificate chain (PEM); with --key, serve HTTPS")
    p.add_argument("--key", help="TLS private key (PEM)")
    p.add_argument("--max-batch", type=int, default=64, help="images per scorer call at most")
    p.add_argument("--max-body-mb", type=float, default=32.0, help="request body limit (413 above)")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long a batch waits for more requests after its first")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if bool(args.cert) != bool(args.key):
        p.error("--cert and --key go together")
    if args.max_batch < 1 or args.max_body_mb <= 0 or args.max_wait_ms < 0:
        p.error("need --max-batch >= 1, --max-body-mb > 0 and --max-wait-ms >= 0")
    token = read_token(args.token_file, args.token_env)
    if token is None:
        if not args.insecure_no_token:
            p.error("no token: give --token-file F or --token-env VAR (or --insecure-no-token "
                    "to let anyone who can connect use the scorer)")
        logger.warning("serving WITHOUT a token (--insecure-no-token): anyone who can connect "
                       "may use the scorer")
    try:
        kwargs = json.loads(args.kwargs)
    except json.JSONDecodeError as e:
        p.error(f"--kwargs is not valid JSON: {e}")
    if not isinstance(kwargs, dict):
        p.error("--kwargs must be a JSON object")
    scorer = import_scorer(args.scorer, kwargs)
    ssl_context = None
    if args.cert:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(args.cert, args.key)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.create_server((args.host, args.port), family=family)
    host, port = sock.getsockname()[:2]
    host = f"[{host}]" if family == socket.AF_INET6 else host
    url = f"{'https' if ssl_context else 'http'}://{host}:{port}"
    logger.info("serving %s (version %s), max batch %d images, body limit %.0f MB",
                args.scorer, scorer_version(scorer), args.max_batch, args.max_body_mb)
    app = make_app(scorer, args.scorer, scorer_version(scorer), token, max_batch=args.max_batch,
                   max_body_bytes=int(args.max_body_mb * (1 << 20)),
                   max_wait_s=args.max_wait_ms / 1000)
    asyncio.run(_serve(app, sock, ssl_context, url))


@contextmanager
def serve_in_thread(app: web.Application, ssl_context: ssl.SSLContext | None = None
                    ) -> Iterator[str]:
    """Serve ``app`` (from :func:`make_app`) on a free localhost port from a background
    thread of this process, for tests and notebooks; yields the base URL."""
    sock = socket.create_server(("127.0.0.1", 0))
    url = f"{'https' if ssl_context else 'http'}://127.0.0.1:{sock.getsockname()[1]}"
    loop = asyncio.new_event_loop()
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        runner = loop.run_until_complete(_start(app, sock, ssl_context))
        started.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=run, daemon=True, name="rewards.serve")
    thread.start()
    if not started.wait(30):
        raise RuntimeError("the in-thread reward server did not start within 30 s")
    try:
        yield url
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)


@dataclass
class ServerProcess:
    """``python -m rewards.serve`` as a child process (benchmarks, tests, scripts).

    ``with ServerProcess("mod:Class", token="t") as server: ... server.url ...``; the token
    reaches the child through the ``SOLACE_REWARD_TOKEN`` variable of its environment.
    """

    scorer: str
    token: str | None = None
    args: tuple[str, ...] = ()  # more command-line arguments (--kwargs, --cert, ...)
    timeout_s: float = 60.0
    url: str = ""
    output: list[str] = field(default_factory=list)  # the child's stdout and stderr lines
    proc: subprocess.Popen | None = None

    def start(self) -> ServerProcess:
        env = dict(os.environ)
        cmd = [sys.executable, "-m", "rewards.serve", "--scorer", self.scorer, "--port", "0"]
        if self.token is None:
            cmd.append("--insecure-no-token")
        else:
            env["SOLACE_REWARD_TOKEN"] = self.token
            cmd += ["--token-env", "SOLACE_REWARD_TOKEN"]
        self.proc = subprocess.Popen([*cmd, *self.args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env,
                                     cwd=Path(__file__).resolve().parents[1])
        ready = threading.Event()

        def drain() -> None:  # read every line, so the pipe never fills and blocks the child
            for line in self.proc.stdout:
                self.output.append(line.rstrip())
                if line.startswith(READY_LINE):
                    self.url = line[len(READY_LINE):].strip()
                    ready.set()
            ready.set()

        threading.Thread(target=drain, daemon=True).start()
        deadline = time.monotonic() + self.timeout_s
        while not ready.wait(0.05) and time.monotonic() < deadline:
            pass
        if not self.url:
            self.stop()
            tail = "\n".join(self.output[-20:])
            raise RuntimeError(f"rewards.serve did not start within {self.timeout_s} s:\n{tail}")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    main()
