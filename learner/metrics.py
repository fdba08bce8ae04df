"""The driver's Prometheus endpoint: the step's metrics as gauges, counters and a histogram.

Names match deploy/grafana-dashboard.json. The server is prometheus-client's own HTTP
server on ``metrics.host:metrics.port`` (port 0 disables it); each step's flat metrics
dict updates it.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from learner.config import SC

PHASES = {"rollout": "timing/wait_scores_s", "update": "timing/update_s",
          "publish": "timing/publish_s"}


class PrometheusMetrics:
    """Serves the run's metrics on ``host:port`` (nothing at all when ``port == 0``).

    ``host`` defaults to 127.0.0.1: prometheus-client's own default, 0.0.0.0, would expose
    the endpoint on every interface; a cluster run that is scraped from another machine
    asks for 0.0.0.0 in its config (``metrics.host``).
    """

    def __init__(self, port: int, reward_names: list[str], host: str = "127.0.0.1"):
        self.enabled = port != 0
        self.registry = CollectorRegistry()  # private: tests may start several runs
        r = self.registry
        self.steps = Counter("solace_steps", "training steps done", registry=r)
        self.samples_per_s = Gauge("solace_samples_per_second", "samples per second", registry=r)
        self.reward = Gauge("solace_reward_mean", "mean reward of the step", ["reward"], registry=r)
        self.adv_mean = Gauge("solace_advantage_mean", "mean advantage (kept samples)", registry=r)
        self.adv_std = Gauge("solace_advantage_std", "advantage std (kept samples)", registry=r)
        self.ratio = Gauge("solace_ratio_mean", "mean importance ratio", registry=r)
        self.clip = Gauge("solace_clip_fraction", "share of clipped ratios", registry=r)
        self.staleness = Gauge("solace_staleness", "weight versions the step's rollouts lag", registry=r)
        self.push = Histogram("solace_weight_push_seconds", "weight publication time", registry=r,
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.queue = Gauge("solace_queue_depth", "steps sampling ahead of the learner", registry=r)
        self.alive = Gauge("solace_reward_actors_alive", "self-confidence actors alive", registry=r)
        self.phase = Gauge("solace_step_seconds", "seconds per phase of the step", ["phase"], registry=r)
        self.pool = Gauge("solace_reward_pool", "a reward pool's counters since the run started "
                          "(submitted, completed, failed, retries, timeouts, actor_errors, "
                          "scorer_errors, ...) and its size, alive and pending",
                          ["reward", "counter"], registry=r)
        self.train = Gauge("solace_train", "the update's numbers: loss/total, loss/policy, "
                           "loss/kl, loss/grad_norm, loss/ratio_min and _max, ...", ["metric"],
                           registry=r)
        self.eval = Gauge("solace_eval", "held-out evaluation of the latest weights", ["metric"],
                          registry=r)
        self.reward_names = reward_names
        self.server = None  # (server, thread) of the endpoint while it serves
        if self.enabled:
            self.server = start_http_server(port, addr=host, registry=self.registry)

    def drop_reward(self, name: str) -> None:
        """Stop reporting reward ``name`` (dropped mid-run): its series goes, not stays stale."""
        self.reward_names.remove(name)
        self.reward.remove(name)

    def update(self, m: dict[str, float]) -> None:
        self.steps.inc()
        self.samples_per_s.set(m["rollout/samples_per_s"])
        for name in self.reward_names:
            self.reward.labels(reward=name).set(m[f"reward/{name}/mean"])
        self.adv_mean.set(m["reward/adv_mean"])
        self.adv_std.set(m["reward/adv_std"])
        self.ratio.set(m.get("loss/ratio_mean", 1.0))
        self.clip.set(m.get("loss/clip_fraction", 0.0))
        self.staleness.set(m["rollout/staleness"])
        self.push.observe(m["timing/publish_s"])
        self.queue.set(m["system/queue_depth"])
        self.alive.set(m.get("reward/pool/alive", 0.0))
        for phase, key in PHASES.items():
            self.phase.labels(phase=phase).set(m[key])
        for key, value in m.items():  # the update's: every loss/* key, under its own name
            if key.startswith("loss/") and isinstance(value, int | float):
                self.train.labels(metric=key[len("loss/"):]).set(value)
        for key, value in m.items():  # reward/pool/* (self-confidence), reward/<name>/pool/*
            parts = key.split("/")
            if parts[0] == "reward" and "pool" in parts[1:3] and len(parts) in (3, 4):
                reward = SC if parts[1] == "pool" else parts[1]
                self.pool.labels(reward=reward, counter=parts[-1]).set(value)

    def update_eval(self, summary: dict[str, float]) -> None:
        """The latest held-out evaluation, one series per ``eval/...`` metric."""
        for key, value in summary.items():
            if key.startswith("eval/"):
                self.eval.labels(metric=key[len("eval/"):]).set(value)
