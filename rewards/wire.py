"""The scorer contract, in process and on the wire (shared by rewards.serve and rewards.http).

In process, a scorer is a class named ``"package.module:Class"``; an instance is called
as ``scorer(images uint8 [N,H,W,3], prompts, metadata) -> [N]`` (or an object with
``.reward`` or ``.partial``, and optionally ``.strict`` and ``.details``).

On the wire (``POST /score``, JSON only; nothing here ever unpickles, DESIGN.md trap 9)::

    request   {"prompts": [str] * N, "metadata": [object] * N, "images": [base64 PNG] * N}
    response  {"scores": [float] * N, "details": [object] * N, "name": str, "version": str,
               "batch_images": int}

``metadata[i]`` is the prompt's GenEval-style row (``{"tag", "include", "prompt", ...}``);
any JSON object is accepted, the scorer checks what it needs. Images are PNGs decoded to
RGB uint8; all images of one request must have the same size. ``details[i]`` holds what
the scorer's output says about image i (``strict``, ``failures``), ``{}`` when nothing.
``batch_images`` is the number of images of the scorer call that scored the request
(more than N when the server batched it with other requests).

This module imports neither torch nor ray, so the server starts in well under a second.
"""

from __future__ import annotations

import base64
import binascii
import importlib
import io
from typing import Any

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Decompression bombs: a tiny PNG can claim a huge image, so sizes are checked from the
# header, before any pixel is decoded.
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_REQUEST_PIXELS = 64 * 1024 * 1024  # all images of one request (192 MiB as RGB uint8)


# -- the scorer contract ---------------------------------------------------------------


def import_scorer(path: str, kwargs: dict[str, Any] | None = None) -> Any:
    """Build ``Class(**kwargs)`` from ``"package.module:Class"``."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"scorer must look like 'package.module:Class', got {path!r}")
    module = importlib.import_module(module_name)
    if not hasattr(module, attr):
        raise ValueError(f"scorer {path!r}: module {module_name!r} has no attribute {attr!r}")
    return getattr(module, attr)(**(kwargs or {}))


def reward_array(out: Any, n: int, name: str) -> np.ndarray:
    """A scorer's output as float32 ``[n]``: an array, or an object with ``.reward``/``.partial``."""
    for attr in ("reward", "partial"):
        if hasattr(out, attr):
            out = getattr(out, attr)
            break
    reward = np.asarray(out, dtype=np.float32)
    if reward.shape != (n,):
        raise ValueError(f"reward {name!r}: scorer returned shape {reward.shape} for {n} images")
    if not np.isfinite(reward).all():
        raise ValueError(f"reward {name!r}: scorer returned non-finite values {reward}")
    return reward


def details_of(out: Any, n: int) -> list[dict[str, Any]]:
    """Per-image JSON details of a scorer's output: ``strict`` and ``failures`` where it has them."""
    details: list[dict[str, Any]] = [{} for _ in range(n)]
    strict = getattr(out, "strict", None)
    if strict is not None:
        for row, value in zip(details, np.asarray(strict).tolist(), strict=True):
            row["strict"] = bool(value)
    items = getattr(out, "details", None)
    for row, item in zip(details, items if items is not None else [None] * n, strict=True):
        failures = item.get("failures") if isinstance(item, dict) else getattr(item, "failures", None)
        if failures is not None:
            row["failures"] = [str(f) for f in failures]
    return details


# -- the wire schema -------------------------------------------------------------------


class ScoreRequest(BaseModel):
    """``POST /score`` body. Strict: no extra keys, no type coercion, equal lengths."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompts: list[str] = Field(min_length=1, description="one prompt per image")
    metadata: list[dict[str, Any]] = Field(description="one GenEval-style row per image")
    images: list[str] = Field(description="one base64-encoded PNG per image")

    @model_validator(mode="after")
    def _same_lengths(self) -> ScoreRequest:
        n = len(self.prompts)
        for name in ("metadata", "images"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name}: {len(getattr(self, name))} entries for {n} prompts")
        return self


class ScoreResponse(BaseModel):
    """``POST /score`` answer. Unknown keys are ignored, so servers may add some."""

    scores: list[float]
    details: list[dict[str, Any]]
    name: str
    version: str
    batch_images: int = 0


class Health(BaseModel):
    """``GET /health`` answer: what is served, and counters since start."""

    name: str
    version: str
    max_batch: int = 0
    requests: int = 0
    images: int = 0
    scorer_calls: int = 0


class WireError(ValueError):
    """A request that does not follow the wire format; the message names the field."""


def describe_validation_error(error: ValidationError) -> str:
    """Pydantic's errors as ``field[i]: message; ...``."""
    parts = []
    for err in error.errors():
        loc = ""
        for p in err["loc"]:
            loc += f"[{p}]" if isinstance(p, int) else (f".{p}" if loc else str(p))
        msg = err["msg"].removeprefix("Value error, ")
        if not loc and err["type"] not in ("value_error", "json_invalid"):
            loc = "body"  # e.g. a JSON array where an object belongs
        parts.append(f"{loc}: {msg}" if loc and not msg.startswith(loc) else msg)
    return "; ".join(parts)


def encode_png(image: np.ndarray) -> str:
    """uint8 ``[H, W, 3]`` -> base64 PNG. Level 1: a 64 px image is ~3x faster than at 6."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [H,W,3], got {image.dtype} {image.shape}")
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_images(encoded: list[str]) -> np.ndarray:
    """Base64 PNGs -> uint8 ``[N, H, W, 3]`` (converted to RGB); raises WireError naming images[i]."""
    arrays, total = [], 0
    for i, text in enumerate(encoded):
        field = f"images[{i}]"
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise WireError(f"{field}: not valid base64") from None
        if not raw.startswith(PNG_SIGNATURE):
            raise WireError(f"{field}: not a PNG (the decoded bytes lack the PNG signature)")
        try:
            im = Image.open(io.BytesIO(raw), formats=("PNG",))
            w, h = im.size
            total += w * h
            if w * h > MAX_IMAGE_PIXELS or total > MAX_REQUEST_PIXELS:
                raise WireError(f"{field}: {w}x{h} pixels is over the limit ({MAX_IMAGE_PIXELS} "
                                f"per image, {MAX_REQUEST_PIXELS} per request)")
            array = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
        except WireError:
            raise
        except Exception as e:  # PIL raises many types for corrupt data
            raise WireError(f"{field}: not a readable PNG ({type(e).__name__}: {e})") from None
        if arrays and array.shape != arrays[0].shape:
            raise WireError(f"{field}: size {w}x{h} differs from images[0] "
                            f"{arrays[0].shape[1]}x{arrays[0].shape[0]}; send one size per request")
        arrays.append(array)
    return np.stack(arrays)
