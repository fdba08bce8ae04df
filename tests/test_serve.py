"""The reward server (rewards.serve): scores, token, limits, schema, batching, TLS.

ShapesReward runs in a real ``python -m rewards.serve`` child, as a user starts it; the
batching tests run recording scorers in this process (``serve_in_thread``) so they can
look at every scorer call.
"""

import base64
import datetime
import io
import ipaddress
import json
import os
import pickle
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rewards.http import HttpScorer, RewardUnavailable
from rewards.serve import ServerProcess, make_app, serve_in_thread
from rewards.shapes import ShapesReward
from rewards.wire import encode_png
from shapes.world import load_split, perturb, render

REPO = Path(__file__).resolve().parents[1]
TOKEN = "test-token-0123456789"
SHAPES = "rewards.shapes:ShapesReward"


def _post(url: str, body: bytes, token: str | None = TOKEN, content_type="application/json",
          path="/score") -> tuple[int, dict]:
    headers = {"Content-Type": content_type}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url + path, data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _get(url: str, token: str | None = TOKEN, path="/health") -> tuple[int, dict]:
    req = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _batch(n: int = 8, seed: int = 0):
    """Rendered, perturbed images graded against the *next* prompt: scores that vary."""
    rows = load_split("test")[:n + 1]
    rng = np.random.default_rng(seed)
    images = np.stack([perturb(render(m, rng), rng) for m in rows[:n]])
    metadata = rows[1:n + 1]
    return images, [m["prompt"] for m in metadata], metadata


def _body(images, prompts, metadata, **change) -> bytes:
    doc = {"prompts": prompts, "metadata": metadata, "images": [encode_png(im) for im in images]}
    doc.update(change)
    return json.dumps(doc).encode()


@pytest.fixture(scope="module")
def shapes_url():
    with ServerProcess(SHAPES, token=TOKEN, args=("--max-body-mb", "1")) as server:
        yield server.url


@pytest.fixture(scope="module")
def good(shapes_url):
    images, prompts, metadata = _batch()
    return _body(images, prompts, metadata), ShapesReward()(images, prompts, metadata)


def _still_serving(url: str, good) -> None:
    status, answer = _post(url, good[0])
    assert status == 200, answer
    np.testing.assert_array_equal(np.float32(answer["scores"]), good[1])


def test_scores_equal_the_in_process_scorer(shapes_url, good):
    status, answer = _post(shapes_url, good[0])
    assert status == 200, answer
    expected = good[1]
    assert len(set(expected.tolist())) > 1, "the batch should not score uniformly"
    np.testing.assert_array_equal(np.float32(answer["scores"]), expected)  # float32 round trip
    assert answer["name"] == SHAPES and answer["version"].startswith("sha256:")
    assert answer["details"] == [{}] * len(expected)
    status, health = _get(shapes_url)
    assert status == 200 and health["name"] == SHAPES and health["requests"] >= 1


@pytest.mark.parametrize("auth", [None, "Bearer wrong-token", f"Basic {TOKEN}", "Bearer ",
                                  f"Bearer {TOKEN}x"])
def test_wrong_or_missing_token_is_401(shapes_url, good, auth):
    headers = {"Content-Type": "application/json"} | ({"Authorization": auth} if auth else {})
    for path, data in (("/score", good[0]), ("/health", None)):
        req = urllib.request.Request(shapes_url + path, data=data, headers=headers)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 401 and e.value.headers["WWW-Authenticate"] == "Bearer"
    _still_serving(shapes_url, good)


class _Evil:
    """Unpickling this runs a shell command: the server must never do it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("content_type, status", [("application/octet-stream", 415),
                                                  ("application/python-pickle", 415),
                                                  ("application/json", 400)])
def test_a_pickled_body_is_refused_and_never_unpickled(shapes_url, good, tmp_path, content_type,
                                                       status):
    marker = tmp_path / "unpickled"
    got, answer = _post(shapes_url, pickle.dumps(_Evil(marker)), content_type=content_type)
    assert got == status, answer
    time.sleep(0.2)
    assert not marker.exists(), "the server unpickled the body"
    _still_serving(shapes_url, good)


def test_server_code_never_imports_pickle():
    for module in ("rewards/serve.py", "rewards/serve_app.py", "rewards/serve_batch.py",
                   "rewards/wire.py"):
        source = (REPO / module).read_text()
        assert "import pickle" not in source and "pickle.load" not in source, module


def test_an_oversize_body_is_413(shapes_url, good):
    images, prompts, metadata = _batch(4)
    noise = base64.b64encode(os.urandom(1_200_000)).decode()  # the server's limit is 1 MB
    status, answer = _post(shapes_url, _body(images, prompts, metadata, padding=noise))
    assert status == 413 and "size" in answer["error"]
    _still_serving(shapes_url, good)


def _png_claiming(width: int, height: int) -> str:
    buf = io.BytesIO()
    Image.new("1", (width, height)).save(buf, format="PNG")  # 1 bit per pixel: tiny file
    return base64.b64encode(buf.getvalue()).decode()


def _bad_bodies():
    images, prompts, metadata = _batch(3)
    pngs = [encode_png(im) for im in images]
    small = encode_png(images[0][:32, :32].copy())
    jpeg = io.BytesIO()
    Image.fromarray(images[0]).save(jpeg, format="JPEG")
    ok = {"prompts": prompts, "metadata": metadata, "images": pngs}
    return [
        ("metadata length", ok | {"metadata": metadata[:2]}, 422, "metadata: 2 entries for 3"),
        ("images length", ok | {"images": pngs[:1]}, 422, "images: 1 entries for 3"),
        ("extra field", ok | {"weights": "x"}, 422, "weights: Extra inputs"),
        ("missing field", {"prompts": prompts, "metadata": metadata}, 422, "images: Field required"),
        ("prompt type", ok | {"prompts": [1, *prompts[1:]]}, 422, "prompts[0]"),
        ("metadata type", ok | {"metadata": ["x", *metadata[1:]]}, 422, "metadata[0]"),
        ("not base64", ok | {"images": [pngs[0], "!!not base64!!", pngs[2]]}, 422,
         "images[1]: not valid base64"),
        ("not a png", ok | {"images": [pngs[0], base64.b64encode(jpeg.getvalue()).decode(),
                                       pngs[2]]}, 422, "images[1]: not a PNG"),
        ("truncated png", ok | {"images": [pngs[0], pngs[1][:200], pngs[2]]}, 422, "images[1]"),
        ("sizes differ", ok | {"images": [pngs[0], small, pngs[2]]}, 422, "images[1]: size 32x32"),
        ("bomb", ok | {"images": [_png_claiming(5000, 5000), *pngs[1:]]}, 413,
         "images[0]: 5000x5000 pixels is over the limit"),
        ("empty", {"prompts": [], "metadata": [], "images": []}, 422, "prompts"),
        ("not an object", [1, 2], 422, "body: Input should be an object"),
    ]


@pytest.mark.parametrize("doc, status, message",
                         [pytest.param(*case[1:], id=case[0]) for case in _bad_bodies()])
def test_a_bad_field_is_4xx_naming_the_field(shapes_url, good, doc, status, message):
    got, answer = _post(shapes_url, json.dumps(doc).encode())
    assert got == status, answer
    assert message in answer["error"], answer["error"]
    _still_serving(shapes_url, good)


def test_not_json_is_400(shapes_url, good):
    status, answer = _post(shapes_url, b'{"prompts": [')
    assert status == 400 and "not valid JSON" in answer["error"]
    _still_serving(shapes_url, good)


def test_metadata_the_scorer_refuses_is_422_and_the_server_keeps_serving(shapes_url, good):
    images, prompts, metadata = _batch(2)
    status, answer = _post(shapes_url, _body(images, prompts, [{"prompt": p} for p in prompts]))
    assert status == 422  # ShapesReward raises ValueError for it: the input, not the server
    assert "scorer refused the input: ValueError" in answer["error"]
    assert "shapes-world metadata" in answer["error"]
    _still_serving(shapes_url, good)


def test_refuses_to_start_without_a_token():
    out = subprocess.run([sys.executable, "-m", "rewards.serve", "--scorer", SHAPES, "--port", "0"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "no token" in out.stderr and "--token-file" in out.stderr


class Recording:
    """Mean brightness per image, after ``delay`` s; records every call's batch size.

    Raises when a metadata row asks for it, to show one bad request fails only itself.
    """

    def __init__(self, delay: float = 0.0) -> None:
        self.delay, self.batches = delay, []

    def __call__(self, images, prompts, metadata):
        self.batches.append(len(images))
        time.sleep(self.delay)
        if any(m.get("fail") for m in metadata):
            raise ValueError("asked to fail")
        return images.reshape(len(images), -1).mean(axis=1) / 255.0


def _flat(value: int, n: int = 4) -> np.ndarray:
    return np.full((n, 8, 8, 3), value, dtype=np.uint8)


def _concurrently(url: str, bodies: list[bytes], first_alone: bool = True) -> list[tuple]:
    """POST every body at once (after the first, which occupies the scorer)."""
    results: list = [None] * len(bodies)

    def send(i: int) -> None:
        results[i] = _post(url, bodies[i], token=None)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    threads[0].start()
    if first_alone:
        time.sleep(0.1)  # the scorer is busy with the first: the rest queue up
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def test_concurrent_requests_are_batched_up_to_max_batch():
    scorer = Recording(delay=0.5)  # the queued requests have 0.4 s to arrive
    app = make_app(scorer, "recording", "1", token=None, max_batch=16, max_wait_s=0.05)
    # 6 images each: two requests make 12, a third would overflow 16.
    bodies = [_body(_flat(10 * i, 6), ["p"] * 6, [{"i": i}] * 6) for i in range(9)]
    with serve_in_thread(app) as url:
        results = _concurrently(url, bodies)
    assert all(status == 200 for status, _ in results), results
    for i, (_, answer) in enumerate(results):  # every request gets its own images' scores
        np.testing.assert_allclose(answer["scores"], [10 * i / 255.0] * 6, rtol=1e-6)
    assert scorer.batches == [6, 12, 12, 12, 12], scorer.batches
    assert sorted(a["batch_images"] for _, a in results) == [6] + [12] * 8


def test_one_bad_request_in_a_batch_fails_only_itself():
    scorer = Recording(delay=0.4)
    app = make_app(scorer, "recording", "1", token=None, max_batch=64, max_wait_s=0.05)
    bodies = [_body(_flat(10 * i), ["p"] * 4, [{"fail": i == 2}] * 4) for i in range(5)]
    with serve_in_thread(app) as url:
        results = _concurrently(url, bodies)
    assert [status for status, _ in results] == [200, 200, 422, 200, 200], results
    assert "asked to fail" in results[2][1]["error"]
    assert 16 in scorer.batches, scorer.batches  # requests 1-4 were tried together first


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    crypto = pytest.importorskip("cryptography", reason="generates the test certificate")
    del crypto
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(
                ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_with_a_self_signed_certificate(tmp_path, monkeypatch):
    cert, key = _self_signed(tmp_path)
    monkeypatch.setenv("SOLACE_REWARD_TOKEN", TOKEN)
    images, prompts, metadata = _batch(4)
    args = ("--cert", str(cert), "--key", str(key))
    with ServerProcess(SHAPES, token=TOKEN, args=args) as server:
        assert server.url.startswith("https://")
        with HttpScorer(server.url, verify_tls=str(cert)) as scorer:
            assert scorer.preflight().name == SHAPES
            np.testing.assert_array_equal(scorer(images, prompts, metadata),
                                          ShapesReward()(images, prompts, metadata))
        with pytest.raises(RewardUnavailable, match="not trusted"):  # the system CAs do not know it
            HttpScorer(server.url, verify_tls=True).preflight()
        plain = "http://" + server.url.removeprefix("https://")
        with pytest.raises(RewardUnavailable):  # plain HTTP gets no answer from the TLS port
            HttpScorer(plain, max_retries=0).preflight()
