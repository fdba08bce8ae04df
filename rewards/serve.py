"""The reward server: any scorer class over HTTP, behind a token, micro-batched.

    SOLACE_REWARD_TOKEN=... python -m rewards.serve --scorer rewards.shapes:ShapesReward \\
        --port 8765 --token-env SOLACE_REWARD_TOKEN [--kwargs JSON] [--host 127.0.0.1]
        [--token-file F] [--cert C --key K] [--max-batch 64] [--max-body-mb 32]
        [--max-wait-ms 5] [--max-pixels-per-request 67108864] [--body-timeout-s 60]

Routes (``rewards/wire.py`` has the JSON schema):

* ``POST /score``: score images; 200 with scores, 400 (not JSON, or an unparsable HTTP
  request), 401 (token), 408 (the body did not arrive within ``--body-timeout-s``), 413
  (body over ``--max-body-mb``, refused from its ``Content-Length`` before reading; or
  images over ``--max-pixels-per-request`` or ``wire.MAX_IMAGE_PIXELS`` per image), 415
  (not ``application/json``), 422 (schema, naming the field; non-finite numbers anywhere;
  or the scorer refused the input, raising ``ValueError``/``KeyError``/``TypeError``), 431
  (a header over ``serve_app.MAX_HEADER_BYTES``), 500 (the scorer raised anything else; the
  server keeps serving). Clients retry 5xx only.
* ``GET /health``: the scorer's name and version and counters. It needs the token too, so
  a client's preflight checks its token.

Security: every request must carry ``Authorization: Bearer <token>`` (compared as bytes
with ``hmac.compare_digest``); the server refuses to start without a token unless given
``--insecure-no-token``. Bodies are parsed as JSON with a strict schema, never unpickled
(docs/design.md trap 9). ``--cert``/``--key`` serve HTTPS. PNG sizes are checked from their
headers, for all images of a request, before any pixel is decoded. No log line or error
body holds the token, or more than ``wire.CLIP_CHARS`` characters of any input.

Batching: handlers validate and decode (on decoding threads, so the event loop keeps
answering ``/health`` while 4 images of 4096x4096 decode), then queue their images in chunks
of at most ``--max-batch``; one batching task takes queued chunks (same image size, up to
``--max-batch`` images, waiting at most ``--max-wait-ms`` for more after the first) and runs
the scorer on one thread. When a batched call raises, each chunk of it is scored alone, so
one bad request fails only itself.

The app is ``rewards.serve_app``, the batcher ``rewards.serve_batch``; this module holds the
CLI, the token, and the in-thread and child-process servers for tests and benchmarks.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import inspect
import json
import logging
import math
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from rewards.serve_app import MAX_TOKEN_CHARS, AppRunner, make_app
from rewards.wire import MAX_REQUEST_PIXELS, import_scorer

logger = logging.getLogger("rewards.serve")
READY_LINE = "rewards.serve listening on "  # ServerProcess waits for this line on stdout


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
    if len(token) > MAX_TOKEN_CHARS:  # it could not fit the server's header limit
        raise SystemExit(f"{source}: the token has {len(token)} characters, more than "
                         f"{MAX_TOKEN_CHARS}")
    return token


def _number(kind: type, minimum: float, inclusive: bool):
    """An argparse ``type``: a finite ``kind`` above ``minimum`` (or at it, if inclusive).

    argparse then names the flag in its one-line error: ``float("nan")`` parses, and would
    otherwise end in a traceback far from the command line.
    """
    bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"

    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or (kind is float and not math.isfinite(value)) or value < minimum or (
                value == minimum and not inclusive):
            raise argparse.ArgumentTypeError(
                f"must be a finite {'integer' if kind is int else 'number'} {bound}, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse's message for a failed type names it
    return parse


async def _start(app: web.Application, sock: socket.socket,
                 ssl_context: ssl.SSLContext | None) -> web.AppRunner:
    runner = AppRunner(app)  # no access log, the header limit, quiet answers to bad requests
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
    p.add_argument("--max-batch", type=_number(int, 1, True), default=64,
                   help="images per scorer call at most (larger requests are split)")
    p.add_argument("--max-body-mb", type=_number(float, 0, False), default=32.0,
                   help="request body limit (413 above)")
    p.add_argument("--max-wait-ms", type=_number(float, 0, True), default=5.0,
                   help="how long a batch waits for more requests after its first")
    p.add_argument("--max-pixels-per-request", type=_number(int, 1, True),
                   default=MAX_REQUEST_PIXELS,
                   help="pixels of all images of one request at most (413 above; default "
                        "4 images of 4096x4096)")
    p.add_argument("--body-timeout-s", type=_number(float, 0, False), default=60.0,
                   help="seconds to receive a request's body (408 after)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if bool(args.cert) != bool(args.key):
        p.error("--cert and --key go together")
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
    # The port first: a taken one fails in a line, before a scorer spends minutes loading.
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    try:
        sock = socket.create_server((args.host, args.port), family=family)
    except OSError as e:
        p.error(f"--host {args.host} --port {args.port}: cannot listen there ({e.strerror}); "
                "choose another port (0: any free one) or stop what holds it")
    scorer = import_scorer(args.scorer, kwargs)
    ssl_context = None
    if args.cert:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(args.cert, args.key)
    host, port = sock.getsockname()[:2]
    host = f"[{host}]" if family == socket.AF_INET6 else host
    url = f"{'https' if ssl_context else 'http'}://{host}:{port}"
    logger.info("serving %s (version %s), max batch %d images, body limit %g MB, "
                "%d pixels per request, body timeout %g s", args.scorer, scorer_version(scorer),
                args.max_batch, args.max_body_mb, args.max_pixels_per_request,
                args.body_timeout_s)
    app = make_app(scorer, args.scorer, scorer_version(scorer), token, max_batch=args.max_batch,
                   max_body_bytes=max(1, int(args.max_body_mb * (1 << 20))),
                   max_wait_s=args.max_wait_ms / 1000,
                   max_pixels_per_request=args.max_pixels_per_request,
                   body_timeout_s=args.body_timeout_s)
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
