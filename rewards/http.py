"""The client of a reward server (``rewards.serve``): a scorer that scores over HTTP.

:class:`HttpScorer` has the common scorer call ``(images uint8 [N,H,W,3], prompts,
metadata) -> float32 [N]``, so ``actors.reward.ExternalRewardWorker`` runs it as a Ray
actor in the cluster (``external_rewards: [{kind: http, url: ...}]``): the actor decodes
latents with its own VAE and sends PNGs to the server.

Failure policy of one call:

* timeouts, connection errors, 5xx answers and 408 (the server timed out reading the
  body: a slow network) are retried ``max_retries`` times, after ``backoff_s``,
  ``2 backoff_s``, ``4 backoff_s``, ... seconds; then :class:`RewardUnavailable`;
* any other 4xx (or 3xx) answer is raised at once as :class:`RewardRejected` naming the
  server, the status and the server's message (e.g. 422: the scorer refused a metadata
  row; 413: too many pixels): the same request would be refused again. It does not count
  against the circuit: the server answered, so it is up, and the next call is let through;
* after ``circuit_failures`` calls in a row that ended in ``RewardUnavailable`` the circuit
  opens: calls fail at once (``RewardUnavailable`` naming the URL) for ``circuit_reset_s``
  seconds; then one call is let through, and a success (or a refusal) closes the circuit.

Worst case of one call: ``(max_retries + 1) timeout_s + backoff_s (2^max_retries - 1)``
seconds (``timeout_s`` bounds each socket operation). The token is read from the
environment variable ``token_env`` of the process that builds the scorer: on a cluster
that is the reward actor's node (or the job's ``runtime_env``), not only the driver.
Standard library only (``http.client``), one kept-alive connection per scorer.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import ssl
import time
from collections.abc import Sequence
from urllib.parse import urlsplit

import numpy as np
from pydantic import ValidationError

from rewards.wire import (
    Health,
    ScoreResponse,
    clip,
    describe_validation_error,
    encode_png,
    reward_array,
)

logger = logging.getLogger(__name__)
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_TRANSIENT_4XX = (408, 429)  # a slow upload, a busy server: asking again may succeed
MESSAGE_CHARS = 300  # of the server's error message, in exceptions and logs


class RewardUnavailable(RuntimeError):
    """The reward server cannot be reached or keeps failing (retries used up, or circuit open)."""


class RewardRejected(RuntimeError):
    """The reward server refused the request (4xx); retrying would not help."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class HttpScorer:
    """Scores images on a remote ``rewards.serve`` server; see the module docstring."""

    def __init__(
        self,
        url: str,
        token_env: str | None = "SOLACE_REWARD_TOKEN",
        timeout_s: float = 30.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        circuit_failures: int = 3,
        circuit_reset_s: float = 60.0,
        verify_tls: bool | str = True,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"reward server url must look like http(s)://host:port, got {url!r}")
        if timeout_s <= 0 or max_retries < 0 or backoff_s < 0 or circuit_failures < 1:
            raise ValueError("need timeout_s > 0, max_retries >= 0, backoff_s >= 0 and "
                             f"circuit_failures >= 1; got {timeout_s}, {max_retries}, "
                             f"{backoff_s}, {circuit_failures}")
        self.url = url.rstrip("/")
        self.token_env = token_env
        self.timeout_s, self.max_retries, self.backoff_s = timeout_s, max_retries, backoff_s
        self.circuit_failures, self.circuit_reset_s = circuit_failures, circuit_reset_s
        self._host, self._port = parts.hostname, parts.port
        self._base = parts.path.rstrip("/")
        self._tls = _tls_context(verify_tls) if parts.scheme == "https" else None
        self._token = None
        if token_env:
            self._token = os.environ.get(token_env, "").strip()
            if not self._token:
                raise ValueError(
                    f"reward server {self.url}: environment variable {token_env} (the bearer "
                    "token) is not set in this process; set it where the reward actors run "
                    "(on the reward nodes, or in the job's runtime_env env_vars)")
            if parts.scheme == "http" and parts.hostname not in _LOOPBACK:
                logger.warning("sending the token to %s over plain http; serve with --cert/--key "
                               "and use https:// off this machine", self.url)
        self._conn: http.client.HTTPConnection | None = None
        self._failures = 0  # calls in a row that ended in RewardUnavailable
        self._opened_at: float | None = None
        self._last_error = ""

    # -- the scorer call ---------------------------------------------------------------

    def __call__(self, images: np.ndarray, prompts: Sequence[str], metadata: Sequence[dict]
                 ) -> np.ndarray:
        """Scores of ``images`` (uint8 [N,H,W,3]) as float32 [N]."""
        images = np.asarray(images)
        if images.ndim != 4 or len(images) != len(prompts) or len(prompts) != len(metadata):
            raise ValueError(f"need images [N,H,W,3] with N prompts and N metadata rows; got "
                             f"{images.shape}, {len(prompts)} prompts, {len(metadata)} rows")
        body = json.dumps({"prompts": list(prompts), "metadata": list(metadata),
                           "images": [encode_png(im) for im in images]}).encode()
        data = self._call("POST", "/score", body)
        try:
            answer = ScoreResponse.model_validate_json(data)
        except ValidationError as e:
            raise RewardUnavailable(f"reward server {self.url}/score answered something that is "
                                    f"not a score response: {describe_validation_error(e)}") from None
        return reward_array(answer.scores, len(images), self.url)

    def preflight(self) -> Health:
        """``GET /health`` with the token: fails fast, naming the URL and the status."""
        data = self._call("GET", "/health", None)
        return Health.model_validate_json(data)

    # -- retries and the circuit -------------------------------------------------------

    def _call(self, method: str, path: str, body: bytes | None) -> bytes:
        now = time.monotonic()
        if self._opened_at is not None and now - self._opened_at < self.circuit_reset_s:
            raise RewardUnavailable(
                f"reward server {self.url}: circuit open after {self._failures} failed calls in "
                f"a row, failing fast for {self.circuit_reset_s - (now - self._opened_at):.0f} s "
                f"more; last error: {self._last_error}")
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                status, data = self._send(method, path, body)
            except ssl.SSLCertVerificationError as e:  # configuration, not a transient failure
                raise RewardUnavailable(
                    f"reward server {self.url}: TLS certificate not trusted ({e.verify_message}); "
                    "set verify_tls to the server's certificate or CA file") from None
            except (OSError, http.client.HTTPException) as e:  # timeouts are OSErrors too
                self._last_error = f"{type(e).__name__}: {e}"
                continue
            if status < 300:
                self._failures, self._opened_at = 0, None
                return data
            message = _server_message(data)
            if status < 500 and status not in _TRANSIENT_4XX:
                # 3xx and 4xx: asking again would get the same answer. The server is up,
                # so the circuit closes: a bad request must not make good ones fail fast.
                self._failures, self._opened_at = 0, None
                raise RewardRejected(self._rejection(status, path, message), status)
            self._last_error = f"HTTP {status}: {message}"
        self._failures += 1
        if self._failures >= self.circuit_failures:
            self._opened_at = time.monotonic()
        raise RewardUnavailable(f"reward server {self.url}{path}: {attempts} attempts failed "
                                f"(failed calls in a row: {self._failures}); last error: "
                                f"{self._last_error}")

    def _rejection(self, status: int, path: str, message: str) -> str:
        text = f"reward server {self.url}{path} answered {status}: {message}"
        if status == 401:
            source = (f"environment variable {self.token_env}" if self.token_env
                      else "nowhere (token_env is null)")
            text += (f". The token sent comes from {source}; it must equal the server's "
                     "(rewards.serve --token-file/--token-env): fix one of them")
        return text

    def _send(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        """One request on the kept-alive connection; a stale one is replaced once, at once."""
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        while True:
            reused = self._conn is not None
            if self._conn is None:
                self._conn = self._connect()
            try:
                self._conn.request(method, self._base + path, body=body, headers=headers)
                response = self._conn.getresponse()
                data = response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if reused:  # the server closed an idle connection: not a failure
                    continue
                raise
            except BaseException:
                self.close()
                raise
            if response.will_close:
                self.close()
            return response.status, data

    def _connect(self) -> http.client.HTTPConnection:
        if self._tls is not None:
            return http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout_s,
                                               context=self._tls)
        return http.client.HTTPConnection(self._host, self._port, timeout=self.timeout_s)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> HttpScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _tls_context(verify: bool | str) -> ssl.SSLContext:
    """``True``: the system's CAs; a path: that certificate or CA file; ``False``: no check."""
    if verify is False:
        logger.warning("TLS certificate checks are off (verify_tls: false): the token goes to "
                       "whoever answers")
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    if verify is True:
        return ssl.create_default_context()
    if not os.path.isfile(verify):
        raise ValueError(f"verify_tls: {verify!r} is not a file (give a PEM certificate or CA file)")
    return ssl.create_default_context(cafile=verify)


def _server_message(data: bytes) -> str:
    """The ``error`` of a JSON error body, else the body's start; clipped either way."""
    try:
        return clip(json.loads(data)["error"], MESSAGE_CHARS)
    except (ValueError, KeyError, TypeError):
        return data[:MESSAGE_CHARS].decode("utf-8", "replace").strip() or "(empty body)"
