"""Throughput and latency of the reward server (``rewards.serve``) with ShapesEval.

    python -m bench.reward_server [--requests 400] [--concurrency 8] [--images 16] [--size 64]
                                  [--repeats 3] [--client raw|scorer] [--max-wait-ms 5]

Starts a real ``python -m rewards.serve`` child with ``ShapesReward`` and a token on a
free port, then ``--concurrency`` client threads send ``--requests`` requests of
``--images`` rendered shapes-world images (test-split prompts) each. ``--client raw``
sends one pre-encoded body over kept-alive connections (the server's cost alone);
``--client scorer`` calls ``rewards.http.HttpScorer``, which PNG-encodes every call, as
a reward actor does. Prints requests/s, images/s, p50/p99 latency and images per scorer
call for each repetition, then their medians. Client and server share the machine.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import secrets
import statistics
import threading
import time
from urllib.parse import urlsplit

import numpy as np

from rewards.http import HttpScorer
from rewards.serve import ServerProcess
from rewards.wire import encode_png
from shapes.world import load_split, render


def make_batch(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, list[str], list[dict]]:
    """``n`` rendered test-split images with their prompts and metadata."""
    rows = load_split("test")
    rng = np.random.default_rng(seed)
    metadata = [rows[i % len(rows)] for i in range(n)]
    images = np.stack([render(m, rng, size) for m in metadata])
    return images, [m["prompt"] for m in metadata], metadata


def run_once(url: str, token: str, batch: tuple, requests: int, concurrency: int,
             client: str) -> dict[str, float]:
    """Send ``requests`` requests from ``concurrency`` threads; returns the figures."""
    images, prompts, metadata = batch
    body = json.dumps({"prompts": prompts, "metadata": metadata,
                       "images": [encode_png(im) for im in images]}).encode()
    parts = urlsplit(url)
    latencies: list[float] = []
    errors: list[str] = []
    left = [requests]
    lock = threading.Lock()

    def take() -> bool:
        with lock:
            left[0] -= 1
            return left[0] >= 0

    def raw_worker() -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        while take():
            t0 = time.perf_counter()
            conn.request("POST", "/score", body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
            latencies.append(time.perf_counter() - t0)
            if response.status != 200 or len(json.loads(data)["scores"]) != len(images):
                errors.append(f"{response.status}: {data[:200]!r}")
        conn.close()

    def scorer_worker() -> None:
        with HttpScorer(url, timeout_s=60) as scorer:
            while take():
                t0 = time.perf_counter()
                scores = scorer(images, prompts, metadata)
                latencies.append(time.perf_counter() - t0)
                if len(scores) != len(images):
                    errors.append(f"{len(scores)} scores for {len(images)} images")

    target = raw_worker if client == "raw" else scorer_worker
    threads = [threading.Thread(target=target) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} bad answers, first: {errors[0]}")
    ms = np.array(latencies) * 1000
    return {"req_s": requests / wall, "img_s": requests * len(images) / wall,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def health(url: str, token: str) -> dict:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.request("GET", "/health", headers={"Authorization": f"Bearer {token}"})
    data = json.loads(conn.getresponse().read())
    conn.close()
    return data


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=400, help="requests per repetition")
    p.add_argument("--concurrency", type=int, default=8, help="client threads")
    p.add_argument("--images", type=int, default=16, help="images per request")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--repeats", type=int, default=3, help="repetitions (medians are reported)")
    p.add_argument("--client", choices=("raw", "scorer"), default="raw",
                   help="raw: one pre-encoded body; scorer: HttpScorer, PNG-encoding each call")
    p.add_argument("--max-batch", type=int, default=64, help="server --max-batch")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="server --max-wait-ms")
    args = p.parse_args(argv)
    token = secrets.token_hex(16)
    os.environ["SOLACE_REWARD_TOKEN"] = token  # HttpScorer reads it (--client scorer)
    batch = make_batch(args.images, args.size)
    server_args = ("--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms))
    with ServerProcess("rewards.shapes:ShapesReward", token=token, args=server_args) as server:
        run_once(server.url, token, batch, 2 * args.concurrency, args.concurrency, args.client)
        print(f"server {server.url}, {args.requests} requests x {args.images} images of "
              f"{args.size} px, {args.concurrency} clients ({args.client}), {os.cpu_count()} CPUs")
        runs = []
        for i in range(args.repeats):
            before = health(server.url, token)
            run = run_once(server.url, token, batch, args.requests, args.concurrency, args.client)
            after = health(server.url, token)
            run["img_per_call"] = ((after["images"] - before["images"])
                                   / max(after["scorer_calls"] - before["scorer_calls"], 1))
            runs.append(run)
            print(f"  run {i + 1}: {run['req_s']:7.1f} req/s {run['img_s']:8.0f} img/s  "
                  f"p50 {run['p50_ms']:6.1f} ms  p99 {run['p99_ms']:6.1f} ms  "
                  f"{run['img_per_call']:5.1f} images per scorer call")
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(f"median of {args.repeats}: {med['req_s']:.1f} req/s, {med['img_s']:.0f} images/s, "
          f"p50 {med['p50_ms']:.1f} ms, p99 {med['p99_ms']:.1f} ms, "
          f"{med['img_per_call']:.1f} images per scorer call")


if __name__ == "__main__":
    main()
