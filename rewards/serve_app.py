"""The reward server's aiohttp application: token check, body limits, schema validation,
``/score`` and ``/health`` (the routes and status codes are listed in ``rewards.serve``).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from rewards.serve_batch import Batcher
from rewards.wire import Health, ScoreRequest, WireError, decode_images, describe_validation_error

logger = logging.getLogger("rewards.serve")


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
