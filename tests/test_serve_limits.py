"""The reward server's limits: secrets kept out of logs and error bodies, bounded input,
clipped echoes, decoding off the event loop, chunked scorer calls, and validated flags.

Every server here is ``rewards.serve``'s app on a real aiohttp server in this process
(``serve_in_thread``), with small recording scorers; malformed HTTP goes over a raw socket.
"""

import asyncio
import base64
import http.client
import io
import json
import logging
import math
import secrets
import socket
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image, ImageFile

from rewards import serve_app
from rewards.serve import main, read_token, serve_in_thread
from rewards.serve_app import MAX_TOKEN_CHARS, make_app
from rewards.serve_batch import Batcher
from rewards.wire import encode_png

TOKEN = secrets.token_urlsafe(3000)[:4000]  # long, random: any quoted piece of it is findable


class Brightness:
    """Mean brightness per image; records each call's size; raises on request."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, images, prompts, metadata):
        self.batches.append(len(images))
        for m in metadata:
            if "raise" in m:
                raise {"value": ValueError, "runtime": RuntimeError}[m["raise"]](
                    f"cannot grade {prompts[0]}")
        return images.reshape(len(images), -1).mean(axis=1) / 255.0


def _app(scorer=None, token=TOKEN, **kw):
    return make_app(scorer or Brightness(), "brightness", "1", token, **kw)


def _doc(n: int = 2, value: int = 51, size: int = 8, **change) -> dict:
    images = np.full((n, size, size, 3), value, dtype=np.uint8)
    doc = {"prompts": ["p"] * n, "metadata": [{"prompt": "p"}] * n,
           "images": [encode_png(im) for im in images]}
    return doc | change


def _post(url: str, body: bytes | dict, token: str | None = TOKEN, timeout: float = 30
          ) -> tuple[int, dict]:
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url + "/score", data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _raw(url: str, request: bytes, timeout: float = 5.0) -> tuple[int, bytes]:
    """Send ``request`` bytes as they are; the status and body of the answer."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(request)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, response.read()


def _head(path: str, *headers: bytes, method: bytes = b"GET") -> bytes:
    return b"\r\n".join([method + b" " + path.encode() + b" HTTP/1.1", b"Host: x", *headers,
                         b"", b""])


def _health_ok(url: str) -> None:
    req = urllib.request.Request(url + "/health", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200


# -- 1, 2: the token ------------------------------------------------------------------


def test_an_oversized_authorization_header_is_431_and_no_log_or_body_holds_the_token(caplog):
    caplog.set_level(logging.DEBUG)
    with serve_in_thread(_app()) as url:
        assert _post(url, _doc())[0] == 200  # a 4000-character token fits the header limit
        header = b"Authorization: Bearer " + (TOKEN * 5).encode()  # 20 KB: over the limit
        status, body = _raw(url, _head("/health", header))
        _health_ok(url)
        # aiohttp's own logger, as its parser would log an exception quoting the token:
        logging.getLogger("aiohttp.server").error(
            "Error handling request", exc_info=ValueError(f"b'Bearer {TOKEN[:93]}...'"))
    assert status == 431, body
    assert "header" in json.loads(body)["error"]
    logged = caplog.text + "".join(r.getMessage() for r in caplog.records)
    assert "431 for an unparsable request" in logged
    for text in (body.decode("utf-8", "replace"), logged):
        assert TOKEN[:12] not in text and TOKEN[-12:] not in text


def test_a_token_too_long_for_a_header_is_refused_at_start(monkeypatch):
    monkeypatch.setenv("LONG_TOKEN", "t" * (MAX_TOKEN_CHARS + 1))
    with pytest.raises(SystemExit, match=f"more than {MAX_TOKEN_CHARS}"):
        read_token(None, "LONG_TOKEN")
    with pytest.raises(ValueError, match="the token must have"):
        _app(token="t" * (MAX_TOKEN_CHARS + 1))


@pytest.mark.parametrize("given", ["tökén".encode(), b"\xe9\xff\xfe", "Bearer ☃".encode()])
def test_a_non_ascii_token_is_401_not_500(given, caplog):
    with serve_in_thread(_app()) as url:
        status, body = _raw(url, _head("/health", b"Authorization: Bearer " + given))
        _health_ok(url)
    assert status == 401, body
    assert not any(r.levelno >= logging.ERROR for r in caplog.records), caplog.text


# -- 3: the scorer refusing its input ---------------------------------------------------


def test_metadata_the_scorer_refuses_is_422_and_fails_only_its_request():
    scorer = Brightness()
    with serve_in_thread(_app(scorer)) as url:
        status, answer = _post(url, _doc(metadata=[{"raise": "value"}] * 2))
        assert status == 422, answer
        assert answer["error"] == "scorer refused the input: ValueError: cannot grade p"
        status, answer = _post(url, _doc(metadata=[{"raise": "runtime"}] * 2))
        assert status == 500 and "scorer raised RuntimeError" in answer["error"]  # its bug
        assert _post(url, _doc())[0] == 200


# -- 4: decoding off the loop, pixel limits from the headers ------------------------------


def test_png_decoding_does_not_hold_the_event_loop(monkeypatch):
    real = serve_app.decode_images

    def slow(*args, **kw):  # as 4 images of 4096x4096 would be
        time.sleep(1.5)
        return real(*args, **kw)

    monkeypatch.setattr(serve_app, "decode_images", slow)
    with serve_in_thread(_app()) as url:
        result = []
        thread = threading.Thread(target=lambda: result.append(_post(url, _doc())))
        thread.start()
        time.sleep(0.3)  # the request is decoding now
        started = time.monotonic()
        _health_ok(url)
        health_s = time.monotonic() - started
        thread.join(30)
    assert result[0][0] == 200
    assert health_s < 0.8, f"/health waited {health_s:.2f} s for a decode"


def _png_claiming(width: int, height: int) -> str:
    buf = io.BytesIO()
    Image.new("1", (width, height)).save(buf, format="PNG")  # 1 bit per pixel: tiny file
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("limit, claims", [
    (None, [(4000, 4000)] * 8),  # 128 M pixels in a ~40 KB body, against the default 64 M
    (10_000, [(64, 64)] * 3),  # 12,288 pixels against a limit of 10,000: the third is over
])
def test_pixels_over_the_request_limit_are_413_before_any_decoding(monkeypatch, limit, claims):
    loads = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load",
                        lambda im: loads.append(im.size) or real_load(im))
    kw = {} if limit is None else {"max_pixels_per_request": limit}
    doc = _doc(len(claims), images=[_png_claiming(w, h) for w, h in claims])
    with serve_in_thread(_app(**kw)) as url:
        started = time.monotonic()
        status, answer = _post(url, doc)
        seconds = time.monotonic() - started
    assert status == 413, answer
    assert "--max-pixels-per-request" in answer["error"]
    assert loads == [], "pixels were decoded before the sizes were checked"
    assert seconds < 1.0


# -- 5: --max-batch per scorer call ------------------------------------------------------


def test_a_request_over_max_batch_reaches_the_scorer_in_chunks():
    scorer = Brightness()
    n = 2000
    values = np.arange(n) % 251
    images = np.repeat(values.astype(np.uint8)[:, None, None, None], 8, axis=1)
    images = np.repeat(np.repeat(images, 8, axis=2), 3, axis=3)
    doc = {"prompts": ["p"] * n, "metadata": [{}] * n, "images": [encode_png(im) for im in images]}
    with serve_in_thread(_app(scorer, max_batch=64)) as url:
        status, answer = _post(url, doc, timeout=60)
    assert status == 200, answer
    assert max(scorer.batches) <= 64 and sum(scorer.batches) == n, scorer.batches
    np.testing.assert_allclose(answer["scores"], values / 255.0, rtol=1e-6)
    assert answer["batch_images"] == 64


# -- 6: metadata values ----------------------------------------------------------------


@pytest.mark.parametrize("row, where", [
    ({"x": math.nan}, "metadata[0].x: nan is not a finite number"),
    ({"x": {"y": [1.0, math.inf]}}, "metadata[0].x.y[1]: inf"),
    ({"x": -math.inf}, "metadata[0].x: -inf"),
    ({"include": [{"class": "dog", "count": math.nan}]}, "metadata[0].include[0].count"),
    ({"include": [{"class": "dog", "count": -2}]}, "metadata[0].include[0].count"),
    ({"include": [{"class": "dog", "count": 0}]}, "metadata[0].include[0].count"),
    ({"exclude": [{"class": "dog", "count": 10 ** 30}]}, "metadata[0].exclude[0].count"),
    ({"include": [{"class": "dog", "count": 2.5}]}, "metadata[0].include[0].count"),
    ({"include": [{"class": "dog", "count": True}]}, "metadata[0].include[0].count"),
])
def test_non_finite_numbers_and_absurd_counts_are_422_before_the_scorer(row, where):
    scorer = Brightness()
    with serve_in_thread(_app(scorer)) as url:
        status, answer = _post(url, _doc(metadata=[row, {"prompt": "p"}]))
        assert _post(url, _doc(metadata=[{"include": [{"class": "dog", "count": 3}]}] * 2)
                     )[0] == 200  # a sane count passes
    assert status == 422, answer
    assert where in answer["error"], answer["error"]
    assert scorer.batches == [2]  # only the sane request reached the scorer


def test_a_body_with_1e999_is_422():
    with serve_in_thread(_app()) as url:
        body = json.dumps(_doc()).replace('"metadata": [{"prompt": "p"}',
                                          '"metadata": [{"prompt": "p", "w": 1e999}')
        status, answer = _post(url, body.encode())
    assert status == 422 and "metadata[0].w: inf" in answer["error"], answer


# -- 7: input is never echoed whole ------------------------------------------------------


@pytest.mark.parametrize("case", ["scorer raises", "scorer refuses", "extra key"])
def test_a_huge_prompt_or_key_is_clipped_in_error_bodies_and_logs(case, caplog):
    caplog.set_level(logging.DEBUG)
    huge = "x" * (5 << 20)
    doc = _doc(prompts=[huge, huge])
    if case == "scorer raises":
        doc["metadata"] = [{"raise": "runtime"}] * 2
    elif case == "scorer refuses":
        doc["metadata"] = [{"raise": "value"}] * 2
    else:
        doc[huge] = 1
    with serve_in_thread(_app(max_body_bytes=64 << 20)) as url:
        status, answer = _post(url, doc)
    assert status in (422, 500), answer
    assert "characters)" in answer["error"] and len(answer["error"]) <= 500, answer["error"][:300]
    assert all(len(r.getMessage()) < 1000 for r in caplog.records)


# -- 8: bodies that do not arrive, or are declared too big ----------------------------------


def test_a_body_that_never_arrives_is_408():
    with serve_in_thread(_app(body_timeout_s=0.5)) as url:
        request = _head("/score", b"Content-Type: application/json",
                        f"Authorization: Bearer {TOKEN}".encode(), b"Content-Length: 1000",
                        method=b"POST") + b'{"prompts": '
        started = time.monotonic()
        status, body = _raw(url, request)
        assert time.monotonic() - started < 3
        _health_ok(url)
    assert status == 408 and "--body-timeout-s" in json.loads(body)["error"]


def test_a_declared_body_over_the_limit_is_413_without_reading_it():
    with serve_in_thread(_app()) as url:
        request = _head("/score", b"Content-Type: application/json",
                        f"Authorization: Bearer {TOKEN}".encode(),
                        b"Content-Length: 10000000000", method=b"POST") + b" " * 1024
        started = time.monotonic()
        status, body = _raw(url, request)
        assert time.monotonic() - started < 3
        _health_ok(url)
    assert status == 413 and "10000000000 bytes" in json.loads(body)["error"]


# -- 9: the command line ----------------------------------------------------------------


@pytest.mark.parametrize("flag, value", [
    ("--max-body-mb", "nan"), ("--max-body-mb", "-1"), ("--max-body-mb", "inf"),
    ("--max-body-mb", "0"), ("--max-batch", "0"), ("--max-batch", "1.5"),
    ("--max-wait-ms", "-1"), ("--max-wait-ms", "nan"), ("--max-pixels-per-request", "0"),
    ("--body-timeout-s", "0"), ("--body-timeout-s", "inf"),
])
def test_bad_numbers_on_the_command_line_are_one_line_errors(capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        main(["--scorer", "rewards.colorful:Colorfulness", "--insecure-no-token", flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and f"argument {flag}: must be a finite" in errors[0], err
    assert "Traceback" not in err


def test_chunks_of_an_abandoned_request_are_not_scored():
    scorer = Brightness()
    batcher = Batcher(scorer, "b", max_batch=2, max_wait_s=0)

    async def run():
        task = asyncio.create_task(batcher.run())
        images = np.zeros((6, 4, 4, 3), np.uint8)
        request = asyncio.create_task(batcher.score(images, ["p"] * 6, [{}] * 6))
        await asyncio.sleep(0)  # queued
        request.cancel()  # the client went away before its chunks were taken
        await asyncio.sleep(0.1)
        task.cancel()
        batcher.executor.shutdown(wait=False)

    asyncio.run(run())
    assert sum(scorer.batches) <= 2, scorer.batches


def test_a_taken_port_is_one_line_before_the_scorer_loads(capsys):
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    with pytest.raises(SystemExit) as e:
        main(["--scorer", "no.such.module:Scorer", "--insecure-no-token", "--port", str(port)])
    taken.close()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"--port {port}: cannot listen there" in err and "Traceback" not in err, err
