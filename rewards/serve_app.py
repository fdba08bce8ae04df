"""The reward server's aiohttp application: token check, body limits, schema validation,
``/score`` and ``/health`` (the routes and status codes are listed in ``rewards.serve``).

Nothing a client sends is echoed whole: error bodies and log lines quote at most
``wire.CLIP_CHARS`` characters of input, bearer tokens are redacted from every log line of
the server's loggers, and a request aiohttp cannot parse (a header over
``MAX_HEADER_BYTES``) is answered without quoting its bytes (aiohttp's own answer and log
line quote the first 100 bytes of the offending line: the token, for ``Authorization``).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler
from pydantic import ValidationError

from rewards.serve_batch import Batcher, InputRefused
from rewards.wire import (
    MAX_REQUEST_PIXELS,
    Health,
    ScoreRequest,
    TooLarge,
    WireError,
    clip,
    decode_images,
    describe_validation_error,
)

logger = logging.getLogger("rewards.serve")

MAX_TOKEN_CHARS = 4096  # longer tokens are refused at start-up: they could not fit a header
MAX_HEADER_BYTES = 16384  # aiohttp's limit per header line (its default is 8190)
ERROR_CHARS = 500  # an error body's message at most
DECODE_THREADS = min(4, os.cpu_count() or 1)  # PNG decoding, off the event loop
# The loggers whose lines a request can reach: aiohttp's protocol and access loggers, ours,
# and asyncio's (an exception never retrieved is logged with its message).
REDACTED_LOGGERS = ("rewards.serve", "aiohttp.server", "aiohttp.web", "aiohttp.access",
                    "aiohttp.internal", "asyncio")
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s'\",;]+")


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": clip(message, ERROR_CHARS)}, status=status, headers=headers)


def check_token(token: str | None) -> None:
    """A token the server can be given: non-empty, and short enough to fit a header."""
    if token is not None and not 0 < len(token) <= MAX_TOKEN_CHARS:
        raise ValueError(f"the token must have 1 to {MAX_TOKEN_CHARS} characters, "
                         f"it has {len(token)}")


def token_matches(header: str, expected: bytes) -> bool:
    """``Authorization: Bearer <token>`` against the token, in constant time.

    aiohttp decodes header bytes as UTF-8 with ``surrogateescape``, so a non-ASCII header
    round-trips to its bytes the same way; ``hmac.compare_digest`` compares bytes only
    (on ``str`` it refuses non-ASCII, which was a 500).
    """
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    try:
        given_bytes = given.strip().encode("utf-8", "surrogateescape")
    except UnicodeError:  # a lone surrogate that did not come from the header's bytes
        return False
    return hmac.compare_digest(given_bytes, expected)


# -- no secret in the logs -----------------------------------------------------------


def redact(text: str, secret: str | None) -> str:
    """``text`` without the token (whole, or from its first 16 characters on, as a cut
    quote would have it) and without anything following ``Bearer``."""
    if secret:
        text = text.replace(secret, "<redacted>")
        if len(secret) >= 16:
            text = re.sub(re.escape(secret[:16]) + r"\S*", "<redacted>", text)
    return _BEARER.sub(r"\1<redacted>", text)


class RedactingFilter(logging.Filter):
    """Rewrites a log record (message and traceback) whose text holds a secret."""

    _formatter = logging.Formatter()

    def __init__(self, secret: str | None) -> None:
        super().__init__()
        self.secret = secret

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + self._formatter.formatException(record.exc_info)
            clean = redact(text, self.secret)
        except Exception:  # a broken record: logging reports it itself, later
            return True
        if clean != text:
            record.msg, record.args, record.exc_info, record.exc_text = clean, None, None, None
        return True


# -- requests aiohttp cannot parse ---------------------------------------------------


def describe_protocol_error(exc: HttpProcessingError) -> tuple[int, str]:
    """``(status, message)`` for a request aiohttp's parser refused, quoting none of it."""
    if isinstance(exc, LineTooLong):
        return 431, (f"a header or the request line is over {exc.args[1]} bytes "
                     f"(tokens have at most {MAX_TOKEN_CHARS} characters)")
    return 400, f"malformed HTTP request ({type(exc).__name__})"


class _QuietRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering unparsable requests without quoting them."""

    __slots__ = ()

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError) or request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        status, text = describe_protocol_error(exc)
        self.logger.warning("%d for an unparsable request from %s: %s", status, request.remote, text)
        response = _error(status, text)
        response.force_close()
        return response


class _QuietServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _QuietRequestHandler(self, loop=self._loop, **self._kwargs)


class AppRunner(web.AppRunner):
    """``web.AppRunner`` with the server's header limit, no access log (a line per request
    costs ~10 % throughput), and :class:`_QuietRequestHandler` for its connections.

    aiohttp has no public hook for the handler class; the server it builds is made a
    :class:`_QuietServer` (``tests/test_serve_limits.py`` fails if aiohttp changes that).
    """

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        kwargs.setdefault("access_log", None)
        kwargs.setdefault("max_field_size", MAX_HEADER_BYTES)
        kwargs.setdefault("max_line_size", MAX_HEADER_BYTES)
        super().__init__(app, **kwargs)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _QuietServer
        return server


# -- the application -----------------------------------------------------------------


def make_app(scorer: Any, name: str, version: str, token: str | None, *, max_batch: int = 64,
             max_body_bytes: int = 32 << 20, max_wait_s: float = 0.005,
             max_pixels_per_request: int = MAX_REQUEST_PIXELS,
             body_timeout_s: float = 60.0) -> web.Application:
    """The aiohttp application serving ``scorer``; ``token=None`` accepts any request.

    Serve it with :class:`AppRunner` (``rewards.serve`` does) for the header limits and
    the quiet answers to unparsable requests.
    """
    check_token(token)
    batcher = Batcher(scorer, name, max_batch, max_wait_s)
    decoder = ThreadPoolExecutor(max_workers=DECODE_THREADS, thread_name_prefix="decode")
    expected = token.encode() if token is not None else None

    @web.middleware
    async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
        if expected is not None and not token_matches(request.headers.get("Authorization", ""),
                                                      expected):
            logger.warning("401 for %s %s from %s", request.method, clip(request.path, 100),
                           request.remote)
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

    def parse(body: bytes) -> tuple[ScoreRequest, Any]:
        """On a decode thread: the JSON schema, then the PNGs (headers checked first)."""
        req = ScoreRequest.model_validate_json(body)
        return req, decode_images(req.images, max_pixels_per_request)

    async def read_request(request: web.Request) -> tuple[ScoreRequest, Any] | web.Response:
        """The request and its decoded images, or the 4xx answer."""
        declared = request.content_length
        if declared is not None and declared > max_body_bytes:  # refused without reading it
            return _error(413, f"body size {declared} bytes is over the limit of "
                               f"{max_body_bytes} bytes (--max-body-mb)")
        try:
            body = await asyncio.wait_for(request.read(), body_timeout_s)  # 413 past the limit
        except TimeoutError:
            response = _error(408, f"the body did not arrive within {body_timeout_s:g} s "
                                   "(--body-timeout-s)")
            response.force_close()  # the rest of a body that slow is not worth waiting for
            return response
        try:
            return await asyncio.get_running_loop().run_in_executor(decoder, parse, body)
        except ValidationError as e:
            invalid_json = any(err["type"] == "json_invalid" for err in e.errors())
            return _error(400 if invalid_json else 422,
                          ("body is not valid JSON: " if invalid_json else "")
                          + describe_validation_error(e))
        except TooLarge as e:
            return _error(413, str(e))
        except WireError as e:
            return _error(422, str(e))

    async def score(request: web.Request) -> web.Response:
        if request.content_type != "application/json":
            return _error(415, "content type must be application/json, got "
                               f"{clip(request.content_type, 100)!r}")
        batcher.arriving += 1
        try:
            parsed = await read_request(request)
        finally:
            batcher.arriving -= 1
        if isinstance(parsed, web.Response):
            return parsed
        req, images = parsed
        batcher.stats.requests += 1
        batcher.stats.images += len(images)
        try:
            scores, details, batch_images = await batcher.score(images, req.prompts, req.metadata)
        except InputRefused as e:  # the message is clipped already
            logger.info("422: the scorer refused the input: %s", e)
            return _error(422, f"scorer refused the input: {e}")
        except Exception as e:
            logger.warning("scorer raised %s: %s", type(e).__name__, clip(e))
            return _error(500, f"scorer raised {type(e).__name__}: {clip(e)}")
        # Plain json.dumps: the answer is built from checked floats, no model needed.
        return web.Response(body=json.dumps({
            "scores": scores.tolist(), "details": details, "name": name, "version": version,
            "batch_images": batch_images}), content_type="application/json")

    async def batching(app: web.Application):
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()
        batcher.executor.shutdown(wait=False, cancel_futures=True)
        decoder.shutdown(wait=False, cancel_futures=True)

    async def redacting_logs(app: web.Application):
        log_filter = RedactingFilter(token)
        for name_ in REDACTED_LOGGERS:
            logging.getLogger(name_).addFilter(log_filter)
        yield
        for name_ in REDACTED_LOGGERS:
            logging.getLogger(name_).removeFilter(log_filter)

    app = web.Application(client_max_size=max_body_bytes, middlewares=[guard])
    app.router.add_get("/health", health)
    app.router.add_post("/score", score)
    app.cleanup_ctx.append(redacting_logs)
    app.cleanup_ctx.append(batching)
    return app
