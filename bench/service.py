"""End to end (part 4), overheads (part 5) and scaling (part 6): the Ray service on this machine.

Both loops run with the same config and seed for the same number of steps, in this
process: ``learner.main.train`` on a new local Ray instance per run (shut down after it),
and ``learner.sequential.train``. A step ends when its line of ``metrics.jsonl`` is
written: at the service's ``time`` (wall clock), and for the sequential loop, which
writes no clock, after its ``timing/rollout_s + timing/score_s + timing/update_s`` (its
whole step but the writing of the line). The first ``warmup`` steps and the last one
are not counted (the service has no next step to overlap its last step with):

    trained samples/s = sum(loss/samples of the timed steps) / (end of the last - end of the step before)

Checkpoints and sample grids are put outside that window (``save_every`` and
``grid_every`` past the last step, so they happen after it, as in the sequential loop,
which saves once at the end).

Where the service's time goes comes from Ray's own task timeline (``ray.timeline()``):
each actor call is split by Ray into ``deserialize_arguments`` (object store -> actor),
``execute`` and ``store_outputs`` (actor -> object store). Transport is the first and
the last of these over the sample, score and train calls; publication is the whole of
the learner's ``weights`` calls and the rollout actors' ``set_weights`` calls.
"""

from __future__ import annotations

import contextlib
import io
import json
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from itertools import accumulate
from pathlib import Path

import numpy as np

from learner.config import Config

# Ray task names -> the phase of a step they do.
COMPUTE = {"RolloutWorker.sample": "rollout", "ScorerActor.score": "scoring",
           "LearnerRank.train_step": "update"}
PUBLISH = ("LearnerRank.weights", "RolloutWorker.set_weights")
PHASES = ("rollout", "scoring", "update", "transport", "publication")


@dataclass
class Run:
    """One run of a loop: when each step ended, its metrics, and where its time went."""

    kind: str  # "service" or "sequential"
    label: str
    overrides: list[str]
    warmup: int
    stamps: list[float]  # the end of each step, seconds (time.time() for the service)
    metrics: list[dict]
    phases: dict[str, float] = field(default_factory=dict)  # seconds per step, after warm-up
    gantt: list[tuple[str, str, float, float]] = field(default_factory=list)  # row, phase, t0, t1
    utilisation: dict[str, float] = field(default_factory=dict)  # actor row -> busy share
    extra: dict = field(default_factory=dict)
    cooldown: int = 1  # the last step: the service has no next step's work to overlap it with

    def trained(self, i: int) -> float:
        return float(self.metrics[i].get("loss/samples", 0.0))

    @property
    def timed(self) -> range:
        """The steps counted: after the warm-up, before the cool-down."""
        return range(self.warmup, len(self.stamps) - self.cooldown)

    @property
    def window(self) -> tuple[float, float]:
        return self.stamps[self.timed.start - 1], self.stamps[self.timed.stop - 1]

    @property
    def rate(self) -> float:
        t0, t1 = self.window
        return sum(self.trained(i) for i in self.timed) / (t1 - t0)

    @property
    def step_s(self) -> list[float]:
        return [self.stamps[i] - self.stamps[i - 1] for i in self.timed]

    @property
    def step_rates(self) -> list[float]:
        return [self.trained(i) / s for i, s in zip(self.timed, self.step_s, strict=True)]

    def summary(self) -> dict:
        return {"kind": self.kind, "label": self.label, "overrides": self.overrides,
                "warmup": self.warmup, "cooldown": self.cooldown, "steps": len(self.metrics), "rate": self.rate,
                "step_rates": self.step_rates, "step_s": self.step_s, "phases": self.phases,
                "utilisation": self.utilisation, "extra": self.extra,
                "window": list(self.window), "gantt": self.gantt}


def _median_key(run: Run, key: str) -> float:
    values = [run.metrics[i][key] for i in run.timed if key in run.metrics[i]]
    return statistics.median(values) if values else 0.0


def run_sequential(cfg: Config, label: str, overrides: list[str], warmup: int) -> Run:
    """``learner.sequential.train`` in this process; a step ends after its three timed stages."""
    from learner import sequential

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        with contextlib.redirect_stdout(io.StringIO()):
            sequential.train(cfg, run_dir)
        metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ends = accumulate(m["timing/rollout_s"] + m["timing/score_s"] + m["timing/update_s"]
                      for m in metrics)
    run = Run("sequential", label, overrides, warmup, list(ends), metrics)
    for phase, key in (("rollout", "timing/rollout_s"), ("scoring", "timing/score_s"),
                       ("update", "timing/update_s")):
        run.phases[phase] = _median_key(run, key)
    return run


def run_service(cfg: Config, label: str, overrides: list[str], warmup: int,
                after=None) -> Run:
    """``learner.main.train`` on a new local Ray instance; ``after()`` runs before shutdown."""
    import ray

    from learner.main import local_cpus, train

    ray.init(address="local", num_cpus=cfg.ray.num_cpus or local_cpus(cfg),
             namespace=cfg.ray.namespace, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = Path(tmp)
            with contextlib.redirect_stderr(io.StringIO()):
                train(cfg, run_dir)
            metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        time.sleep(1.0)  # actors report their task events to the GCS once a second
        events = ray.timeline()
        # time.time() when the step's line was written, the clock of Ray's timeline too
        run = Run("service", label, overrides, warmup, [m["time"] for m in metrics], metrics)
        timeline_phases(run, events)
        run.extra["publish_wait_s"] = _median_key(run, "timing/publish_s")
        run.extra["num_cpus"] = ray.cluster_resources().get("CPU", 0)
        if after is not None:
            run.extra.update(after())
    finally:
        ray.shutdown()
    return run


def timeline_phases(run: Run, events: list[dict]) -> None:
    """Seconds per step of each phase inside the run's window, from Ray's task timeline."""
    t0, t1 = run.window
    tasks = defaultdict(list)  # worker -> [(name, start, end)]
    parts = defaultdict(list)  # worker -> [(part, start, end)]
    for e in events:
        cat, start = e.get("cat", ""), e.get("ts", 0) / 1e6
        end = start + e.get("dur", 0) / 1e6
        if cat.startswith("task::"):
            tasks[e["tid"]].append((cat[len("task::"):], start, end))
        elif cat in ("task:deserialize_arguments", "task:execute", "task:store_outputs"):
            parts[e["tid"]].append((cat.split(":")[1], start, end))

    def clipped(a: float, b: float) -> float:
        return max(0.0, min(b, t1) - max(a, t0))

    total = dict.fromkeys(PHASES, 0.0)
    rows = {}
    for tid, calls in tasks.items():
        names = {name for name, _, _ in calls}
        role = next((COMPUTE[n] for n in names if n in COMPUTE), None)
        if role is None:
            continue
        row = {"rollout": "rollout actor", "scoring": "reward actor",
               "update": "learner rank"}[role]
        row = f"{row} {sum(r.startswith(row) for r in rows.values()) + 1}"
        rows[tid] = row
        busy = 0.0
        for name, a, b in calls:
            if name in PUBLISH:
                total["publication"] += clipped(a, b)
                run.gantt.append((row, "publication", a, b))
            elif name in COMPUTE:
                busy += clipped(a, b)
                for part, pa, pb in parts[tid]:
                    if a <= pa and pb <= b + 1e-6:
                        phase = COMPUTE[name] if part == "execute" else "transport"
                        total[phase] += clipped(pa, pb)
                        run.gantt.append((row, phase, pa, pb))
        run.utilisation[row] = busy / (t1 - t0)
    run.phases = {k: v / len(run.timed) for k, v in total.items()}
    run.gantt = [g for g in run.gantt if g[3] > t0 and g[2] < t1]
    run.extra["scoring_overlapping_update"] = overlap_share(run.gantt, "scoring", "update", t0, t1)


def overlap_share(gantt, phase: str, other: str, t0: float, t1: float) -> float:
    """Share of ``phase``'s time (in the window) during which some ``other`` call ran."""
    span = lambda p: [(max(a, t0), min(b, t1)) for _, q, a, b in gantt if q == p]  # noqa: E731
    mine, theirs = span(phase), span(other)
    total = sum(b - a for a, b in mine)
    both = sum(max(0.0, min(b, d) - max(a, c)) for a, b in mine for c, d in theirs)
    return both / total if total else 0.0


def publish_latency(payloads: list[tuple[str, float]], consumers: int, repeats: int) -> list[dict]:
    """Weight publication as ``Service.publish`` does it, for synthetic flat buffers.

    A learner-like actor returns a ``FlatWeights`` of the size (stored once by its task);
    the driver waits until it is stored (``fetch_local=False``) and hands the ref to
    ``consumers`` actors, which unflatten it as ``PolicyReplica.load`` does. Runs inside
    the caller's Ray instance.
    """
    import ray

    from policy.weights import FlatWeights, unflatten_weights

    @ray.remote(num_cpus=0)
    class Publisher:
        def weights(self, version: int, n: int) -> FlatWeights:
            return FlatWeights(version, np.full(n, version, np.float32), ("w",), ((n,),))

    @ray.remote(num_cpus=0)
    class Consumer:
        def set_weights(self, flat: FlatWeights) -> int:
            unflatten_weights(flat)
            return flat.version

    pub = Publisher.remote()
    subs = [Consumer.remote() for _ in range(consumers)]
    ray.get([pub.weights.remote(0, 1)] + [s.set_weights.remote(pub.weights.remote(0, 1)) for s in subs])
    out, version = [], 1
    for label, mb in payloads:
        n = int(mb * 2**20 / 4)
        stored, loaded = [], []
        for _ in range(repeats + 1):  # the first is a warm-up
            t0 = time.perf_counter()
            ref = pub.weights.remote(version, n)
            ray.wait([ref], fetch_local=False)
            t1 = time.perf_counter()
            ray.get([s.set_weights.remote(ref) for s in subs])
            t2 = time.perf_counter()
            stored.append(t1 - t0)
            loaded.append(t2 - t0)
            del ref
            version += 1
        out.append({"label": label, "mb": mb, "stored_s": stored[1:], "loaded_s": loaded[1:]})
    for actor in [pub, *subs]:
        ray.kill(actor)
    return out


def lora_megabytes(config: dict, ranks: list[int], targets) -> dict[int, float]:
    """fp32 size of the flat LoRA buffer of a transformer ``config`` for each rank (meta)."""
    import torch
    from diffusers import SD3Transformer2DModel

    from policy.pipeline import LoraSpec, add_lora

    out = {}
    for r in ranks:
        with torch.device("meta"):
            model = SD3Transformer2DModel.from_config(config)
        names = set(add_lora(model, LoraSpec(rank=r, alpha=2 * r, target_modules=targets)))
        out[r] = sum(p.numel() for n, p in model.named_parameters() if n in names) * 4 / 2**20
    return out


def run_setting(steps: int) -> list[str]:
    """What every benchmark run shares: ``steps`` steps, no Prometheus port, no mid-run saves."""
    return [f"train.steps={steps}", "metrics.port=0", f"train.save_every={steps + 1}",
            f"metrics.grid_every={steps + 1}", "eval.every=0"]  # the loop alone is measured


def run_e2e(load: Callable[[list[str]], Config], steps: int, warmup: int, runs: int, cores: int,
            payloads: list[tuple[str, float]], publish_repeats: int, log=print) -> dict:
    """Parts 4 and 5: service vs sequential, alternating, plus publication latency.

    ``load(overrides)`` gives the benchmarked config with ``overrides`` applied.
    """
    common = run_setting(steps)
    svc_o = common + ["learner.max_staleness=1"]
    seq_o = common + [f"model.num_threads={cores}"]
    seq1_o = common + ["model.num_threads=1"]
    base = load([])
    consumers = base.rollout.num_actors + base.reward_pool.num_actors
    measure_publish = partial(publish_latency, payloads, consumers, publish_repeats)
    service, sequential = [], []
    for r in range(runs):
        order = [("seq", seq_o), ("svc", svc_o)]
        for kind, o in order if r % 2 == 0 else order[::-1]:
            if kind == "seq":
                sequential.append(run_sequential(load(o), f"sequential, {cores} threads", o, warmup))
                log(f"  sequential run {r + 1}: {sequential[-1].rate:.2f} trained samples/s")
            else:
                after = None
                if r == 0 and payloads:  # in the first service run's Ray instance
                    after = lambda: {"publish": measure_publish()}  # noqa: E731
                service.append(run_service(load(o), "service, staleness 1", o, warmup, after))
                log(f"  service run {r + 1}: {service[-1].rate:.2f} trained samples/s")
    seq1 = run_sequential(load(seq1_o), "sequential, 1 thread", seq1_o, warmup)
    log(f"  sequential, 1 thread: {seq1.rate:.2f} trained samples/s")
    publish = service[0].extra.pop("publish", [])
    return {"cores": cores, "steps": steps, "warmup": warmup,
            "service": [x.summary() for x in service],
            "sequential": [x.summary() for x in sequential], "sequential_1": seq1.summary(),
            "staleness": 1, "publish": publish, "publish_consumers": consumers}


# Part 6: label -> overrides of the service of part 4.
SCALING = {
    "1 rollout, 2 reward": ["reward_pool.num_actors=2"],
    "2 rollout, 1 reward": ["rollout.num_actors=2"],
    "1 rollout, 1 reward, 2 threads each": [
        "rollout.num_threads=2", "reward_pool.num_threads=2", "learner.num_threads=2"],
}


def run_scaling(load: Callable[[list[str]], Config], steps: int, warmup: int,
                labels: list[str], log=print) -> list[dict]:
    """Part 6: the service with more rollout or reward actors (and more threads, as tried)."""
    out = []
    for label in labels:
        o = run_setting(steps) + ["learner.max_staleness=1"] + SCALING[label]
        run = run_service(load(o), label, o, warmup)
        log(f"  {label}: {run.rate:.2f} trained samples/s")
        out.append(run.summary())
    return out
