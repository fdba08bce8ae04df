"""The scorer contract, in process and on the wire (shared by rewards.serve and rewards.http).

In process, a scorer is a class named ``"package.module:Class"``; an instance is called
as ``scorer(images uint8 [N,H,W,3], prompts, metadata) -> [N]`` (or an object with
``.reward`` or ``.partial``, and optionally ``.strict`` and ``.details``).

On the wire (``POST /score``, JSON only; nothing here ever unpickles, docs/design.md trap 9)::

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
import math
from typing import Any

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Decompression bombs: a tiny PNG can claim a huge image, so sizes are checked from the
# header, before any pixel is decoded.
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_REQUEST_PIXELS = 64 * 1024 * 1024  # default for all images of one request (192 MiB as RGB)
# GenEval-style clauses (metadata[i].include[j].count, .exclude[j].count) count objects in one
# image: a few, never millions. Bounding them keeps a scorer from looping or allocating on
# a count nobody could draw.
MAX_CLAUSE_COUNT = 1000
CLIP_CHARS = 200  # input-derived text in error bodies and log lines is cut to this length


def clip(text: object, limit: int = CLIP_CHARS) -> str:
    """``str(text)`` cut to ``limit`` characters, saying how long it was: a 20 MB prompt in
    an exception must not be echoed whole into an error body or a log line."""
    text = str(text)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


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

    @model_validator(mode="after")
    def _sane_metadata(self) -> ScoreRequest:
        for i, row in enumerate(self.metadata):
            _check_finite(row, f"metadata[{i}]")
            _check_clause_counts(row, f"metadata[{i}]")
        return self


def _check_finite(value: Any, where: str) -> None:
    """Refuse NaN and infinities anywhere in a JSON value (Python's and pydantic's JSON
    parsers accept ``NaN``, ``Infinity`` and ``1e999``): a scorer comparing with NaN
    silently scores nonsense, or raises deep inside. Nesting is bounded by the JSON
    parser's recursion limit."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}: {value} is not a finite number")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, f"{where}.{clip(key, 40)}")
    elif isinstance(value, list):
        for j, item in enumerate(value):
            _check_finite(item, f"{where}[{j}]")


def _check_clause_counts(row: dict[str, Any], where: str) -> None:
    """GenEval-style ``include``/``exclude`` clauses: each ``count`` an integer in
    ``1..MAX_CLAUSE_COUNT`` (a negative, zero, fractional or huge count divides by zero,
    slices oddly, or loops in the scorer)."""
    for key in ("include", "exclude"):
        clauses = row.get(key)
        if not isinstance(clauses, list):
            continue  # absent, or not GenEval-style: the scorer checks what it needs
        for j, clause in enumerate(clauses):
            if not isinstance(clause, dict) or "count" not in clause:
                continue
            count = clause["count"]
            if (isinstance(count, bool) or not isinstance(count, int)
                    or not 1 <= count <= MAX_CLAUSE_COUNT):
                raise ValueError(f"{where}.{key}[{j}].count: must be an integer in "
                                 f"1..{MAX_CLAUSE_COUNT}, got {clip(count, 40)}")


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


class TooLarge(WireError):
    """A request whose images are over the pixel limits (the server answers 413)."""


def describe_validation_error(error: ValidationError, max_errors: int = 5) -> str:
    """Pydantic's errors as ``field[i]: message; ...``: the first ``max_errors``, each part
    clipped (an extra key's name comes from the request and may be megabytes long)."""
    parts = []
    errors = error.errors(include_input=False, include_url=False)
    for err in errors[:max_errors]:
        loc = ""
        for p in err["loc"]:
            loc += f"[{p}]" if isinstance(p, int) else (f".{clip(p, 40)}" if loc else clip(p, 40))
        msg = clip(err["msg"].removeprefix("Value error, "))
        if not loc and err["type"] not in ("value_error", "json_invalid"):
            loc = "body"  # e.g. a JSON array where an object belongs
        parts.append(f"{loc}: {msg}" if loc and not msg.startswith(loc) else msg)
    if len(errors) > max_errors:
        parts.append(f"and {len(errors) - max_errors} more errors")
    return "; ".join(parts)


def encode_png(image: np.ndarray) -> str:
    """uint8 ``[H, W, 3]`` -> base64 PNG. Level 1: a 64 px image is ~3x faster than at 6."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [H,W,3], got {image.dtype} {image.shape}")
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_images(encoded: list[str], max_request_pixels: int = MAX_REQUEST_PIXELS) -> np.ndarray:
    """Base64 PNGs -> uint8 ``[N, H, W, 3]`` (converted to RGB); raises WireError naming images[i]
    (:class:`TooLarge` over the pixel limits).

    Two passes: every PNG's header (its declared size) is read and checked first, and only
    then are pixels decoded, so a small body claiming huge images costs no decoding.
    """
    opened = [_open_png(i, text) for i, text in enumerate(encoded)]
    _check_sizes(opened, max_request_pixels)
    return np.stack([_pixels(i, im) for i, im in enumerate(opened)])


def _open_png(i: int, text: str) -> Image.Image:
    """images[i] opened lazily: PIL reads the header (size, mode), not the pixel data."""
    field = f"images[{i}]"
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise WireError(f"{field}: not valid base64") from None
    if not raw.startswith(PNG_SIGNATURE):
        raise WireError(f"{field}: not a PNG (the decoded bytes lack the PNG signature)")
    try:
        return Image.open(io.BytesIO(raw), formats=("PNG",))
    except Image.DecompressionBombError:  # PIL's own limit, far above ours
        raise TooLarge(f"{field}: over the limit of {MAX_IMAGE_PIXELS} pixels per image") from None
    except Exception as e:  # PIL raises many types for corrupt data
        raise WireError(f"{field}: not a readable PNG ({type(e).__name__}: {clip(e)})") from None


def _check_sizes(opened: list[Image.Image], max_request_pixels: int) -> None:
    """Declared sizes against the limits, and one size for all images of the request."""
    total = 0
    for i, im in enumerate(opened):
        w, h = im.size
        total += w * h
        if w * h > MAX_IMAGE_PIXELS:
            raise TooLarge(f"images[{i}]: {w}x{h} pixels is over the limit of "
                           f"{MAX_IMAGE_PIXELS} pixels per image")
        if im.size != opened[0].size:
            w0, h0 = opened[0].size
            raise WireError(f"images[{i}]: size {w}x{h} differs from images[0] {w0}x{h0}; "
                            "send one size per request")
    if total > max_request_pixels:
        raise TooLarge(f"images: {len(opened)} images of {opened[0].size[0]}x"
                       f"{opened[0].size[1]} are {total} pixels, over the limit of "
                       f"{max_request_pixels} pixels per request (--max-pixels-per-request); "
                       "send fewer images per request")


def _pixels(i: int, im: Image.Image) -> np.ndarray:
    """images[i]'s pixels as RGB uint8 ``[H, W, 3]`` (the expensive part)."""
    try:
        return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    except Exception as e:  # PIL raises many types for corrupt data
        raise WireError(f"images[{i}]: not a readable PNG ({type(e).__name__}: {clip(e)})") from None
