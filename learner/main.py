"""The solace-rl service driver: Flow-GRPO + SOLACE on Ray actors.

    python -m learner.main [--config FILE] [--set section.field=value ...] [--address ADDR]
                           [--run-dir DIR] [--resume RUN_DIR]

With no arguments it trains ``configs/tiny_solace.yaml`` on a new local Ray instance.
Under ``ray job submit`` (or with ``RAY_ADDRESS``/``--address``) it joins that cluster.

One step of :func:`train`, the loop in one place:

    prompts -> rollouts (rollout actors) -> scores (reward pools, as rollouts finish)
    -> advantages -> update (DeepSpeed ranks) -> publish weights v+1 -> log

Rollouts for step k+1 are sampled while the learner trains on step k whenever
``learner.max_staleness >= 1``; with 0 every step samples with the newest weights.
A group is sampled with one weight version and scored with that same version (the
reward pool is handed that version's weight ref with each call). Only this process
calls ``ray.get``; rollouts travel actor to actor as ``ObjectRef``s.

External rewards of kind ``http`` are checked before any actor starts (``GET /health``
with the token). A reward whose pool gives up mid-run (``RewardError``: retries used up,
server gone, circuit open) is handled by its ``on_failure``: ``stop`` saves a checkpoint
and raises :class:`RewardStopped`; ``drop`` stops scoring with it and trains on with the
other rewards, their weights rescaled to the original total (:func:`on_reward_failure`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import ray
import torch
import yaml
from tqdm import tqdm

from actors.pool import RewardError, RewardPool
from actors.reward import ExternalRewardWorker, Scores, SelfConfidenceWorker
from actors.rollout import RolloutWorker
from learner.config import Config, ConfigError, load_config
from learner.engine import LearnerGroup
from learner.grpo import advantage_metrics, combine_advantages
from learner.metrics import PrometheusMetrics
from learner.prompts import PromptCursor, load_prompts
from policy.grid import prompt_lines, save_grid
from policy.pipeline import save_lora_state
from policy.sampler import suffix_window
from rewards.http import HttpScorer

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny_solace.yaml"
SC = "self_confidence"
HTTP_SCORER = "rewards.http:HttpScorer"  # the scorer of kind-http external rewards
logger = logging.getLogger(__name__)


class RewardFailure(RuntimeError):
    """A reward's pool gave up on a call mid-run; ``reward`` names it."""

    def __init__(self, reward: str, error: RewardError) -> None:
        super().__init__(f"reward {reward!r}: {error}")
        self.reward, self.error = reward, error


class RewardStopped(RuntimeError):
    """The run stopped because a reward failed (``on_failure: stop``), after a checkpoint."""

    def __init__(self, message: str, reward: str, checkpoint: Path) -> None:
        super().__init__(message)
        self.reward, self.checkpoint = reward, checkpoint


@dataclass
class StepWork:
    """The rollouts of one step in flight: their refs, version and scores as they arrive."""

    step: int
    version: int
    refs: list[ray.ObjectRef]  # one ObjectRef[Rollout] per rollout call, in order
    groups: list[list[tuple[int, str]]]  # the (prompt index, prompt) groups of each call
    scores: dict[str, dict[int, Scores]] = field(default_factory=lambda: defaultdict(dict))
    started: float = field(default_factory=time.perf_counter)


class Service:
    """The actors of one run and the calls that move data between them."""

    def __init__(self, cfg: Config, rows: list[dict]):
        self.cfg = cfg
        m, lora = cfg.model, cfg.lora.spec(cfg.seed)
        resources = ray.cluster_resources()
        wants = cfg.rollout.require_resource or "rollout" in resources
        rollout_res = {"rollout": 0.01} if wants else None
        actor = ray.remote(num_cpus=cfg.rollout.num_cpus, num_gpus=cfg.rollout.num_gpus,
                           resources=rollout_res)(RolloutWorker)
        self.rollout_actors = [
            actor.remote(m.path, m.dtype, m.device, cfg.rollout.num_threads, lora,
                         cfg.sampler.spec(), m.max_sequence_length, cfg.seed)
            for _ in range(cfg.rollout.num_actors)
        ]
        sc, rp = cfg.self_confidence, cfg.reward_pool
        self.pools: dict[str, RewardPool] = {}
        if sc.enabled:
            self.pools[SC] = RewardPool(
                partial(SelfConfidenceWorker, m.path, m.dtype, m.device, rp.num_threads, lora,
                        m.max_sequence_length, cfg.seed, sc.num_probes, sc.probe_fraction,
                        sc.delta, sc.aggregation, sc.guidance_scale, sc.policy),
                rp.num_actors, timeout_s=rp.timeout_s, max_retries=rp.max_retries,
                max_restarts=rp.max_restarts, num_cpus=rp.num_cpus, num_gpus=rp.num_gpus,
                require_resource=rp.require_resource, control_name=rp.control_name,
            )
        for ext in cfg.external_rewards:
            # kind http: the client actor of a reward server, the remote external reward
            target, kwargs = ((HTTP_SCORER, ext.http_kwargs()) if ext.kind == "http"
                              else (ext.target, ext.kwargs))
            self.pools[ext.name] = RewardPool(
                partial(ExternalRewardWorker, target, ext.name, m.path, "float32", m.device,
                        1, kwargs, rows),
                ext.num_actors, timeout_s=rp.timeout_s, max_retries=rp.max_retries,
                max_restarts=rp.max_restarts, num_cpus=ext.num_cpus, num_gpus=ext.num_gpus,
                control_name=f"{rp.control_name}-{ext.name}",
            )
        for name, pool in self.pools.items():
            try:
                pool.wait_ready()
            except RewardError as e:
                raise RewardError(f"reward {name!r}: {e}", last_error=e.last_error) from e
        self.learner = LearnerGroup(
            cfg.learner.num_ranks, lora=lora, grpo=cfg.grpo, model_path=m.path, dtype=m.dtype,
            device=m.device, num_threads=cfg.learner.num_threads, num_cpus=cfg.learner.num_cpus,
            zero_stage=cfg.learner.zero_stage, max_sequence_length=m.max_sequence_length,
            require_resource=cfg.learner.require_resource,
        )
        self.weights: dict[int, ray.ObjectRef] = {}  # version -> ObjectRef[FlatWeights]
        self.failure: RewardFailure | None = None  # seen during an update, raised by gather

    def publish(self, version: int) -> float:
        """Store weights ``version`` once and push the ref to every rollout actor.

        Returns the seconds until the buffer is in the object store. The pushes are not
        waited for: actor calls run in order, so every sample call submitted after them
        uses the new version, and a failed load surfaces in that call.
        """
        t0 = time.perf_counter()
        ref = self.learner.publish(version)
        ray.wait([ref], fetch_local=False)  # stored by rank 0; the driver never copies it
        seconds = time.perf_counter() - t0
        for actor in self.rollout_actors:
            actor.set_weights.remote(ref)
        self.weights[version] = ref
        # Keep the versions that in-flight rollouts may still need for scoring.
        for old in [v for v in self.weights if v < version - self.cfg.learner.max_staleness]:
            del self.weights[old]
        return seconds

    def launch(self, step: int, version: int, picked: list[tuple[int, dict]]) -> StepWork:
        """Sample the step's groups on the rollout actors and queue them for scoring."""
        groups = [(index, row["prompt"]) for index, row in picked]
        chunks = [list(c) for c in np.array_split(np.arange(len(groups)), len(self.rollout_actors))
                  if len(c)]
        work = StepWork(step, version, [], [])
        for actor, chunk in zip(self.rollout_actors, chunks, strict=False):
            call_groups = [groups[i] for i in chunk]
            ref = actor.sample.remote(call_groups, step, self.cfg.grpo.group_size)
            for pool in self.pools.values():  # scored as soon as this rollout exists
                pool.submit(ref, self.weights[version], key=(step, len(work.refs)))
            work.refs.append(ref)
            work.groups.append(call_groups)
        return work

    def gather(self, inflight: dict[int, StepWork], step: int) -> None:
        """Collect scores (of any step) until every call of ``step`` has every reward.

        Raises :class:`RewardFailure` naming the reward whose pool gave up on a call.
        """
        if self.failure is not None:  # seen while an update was running
            failure, self.failure = self.failure, None
            raise failure
        work = inflight[step]
        want = len(work.refs)
        while any(len(work.scores[name]) < want for name in self.pools):
            self.collect(inflight, timeout=0.05)

    def collect(self, inflight: dict[int, StepWork], timeout: float) -> None:
        """One round over the pools: dispatch queued calls, file the scores that are in."""
        for name, pool in self.pools.items():
            try:
                done = pool.collect(timeout=timeout)
            except RewardError as e:
                raise RewardFailure(name, e) from e
            for (s, call), scores in done:
                inflight[s].scores[name][call] = scores

    def wait_update(self, refs: list[ray.ObjectRef], inflight: dict[int, StepWork]) -> None:
        """Wait for the learner's update while the reward pools keep working.

        A pool hands a finished rollout to a reward actor only while it is pumped, so
        without this the next step's rollouts would wait for the update to end before
        being scored. A reward failure seen here is raised by the next :meth:`gather`,
        once the update is complete.
        """
        while len(ray.wait(refs, num_returns=len(refs), timeout=0.02, fetch_local=False)[0]) < len(refs):
            if self.failure is None:
                try:
                    self.collect(inflight, timeout=0.02)
                except RewardFailure as failure:
                    self.failure = failure

    def drop(self, name: str) -> None:
        """Stop scoring with reward ``name``: its pool and its actors go."""
        self.pools.pop(name).shutdown()

    def close(self) -> None:
        for pool in self.pools.values():
            pool.shutdown()
        self.learner.shutdown()


def rewards_of(work: StepWork, names: list[str]) -> dict[str, np.ndarray]:
    """Each reward over the step's samples, in rollout-call order."""
    return {n: np.concatenate([work.scores[n][c].reward for c in range(len(work.refs))])
            for n in names}


def check_versions(work: StepWork) -> None:
    """Every score must be of the samples of the version that made them (self-confidence
    scores with that version's weights; external scores carry the rollout's version)."""
    for name, calls in work.scores.items():
        for call, scores in calls.items():
            if scores.weight_version != work.version:
                raise RuntimeError(f"step {work.step} call {call}: {name} scored weight version "
                                   f"{scores.weight_version}, sampled with {work.version}")


def write_samples(log, work: StepWork, rewards: dict[str, np.ndarray], adv, trained_at: int,
                  missing: tuple[str, ...] = ()):
    """One line per sample: who made it, with which version, what it scored.

    ``sample_version`` is the version the step was launched with; it is the rollout's own,
    since a reward worker refuses weights of any other version than the rollout's.
    Rewards in ``missing`` (dropped, so not used for this step) are written as null.
    """
    n = 0
    first = next(iter(work.scores))  # every reward scores the same samples, in order
    for call in range(len(work.refs)):
        sc = work.scores[first][call]
        for i, (prompt_id, seed) in enumerate(sc.sample_keys):
            row = {"step": work.step, "prompt_id": prompt_id, "seed": seed,
                   "sample_version": work.version, "score_version": sc.weight_version,
                   "trained_at_version": trained_at, "advantage": float(adv.values[n + i]),
                   "kept": bool(adv.keep[n + i])}
            row.update({f"reward/{k}": float(v[n + i]) for k, v in rewards.items()})
            row.update({f"reward/{k}": None for k in missing})
            log.write(json.dumps(row) + "\n")
        n += len(sc.sample_keys)


def save_checkpoint(run_dir: Path, service: Service, cursor: PromptCursor, step: int) -> Path:
    """``checkpoints/step_N``: LoRA (diffusers format), optimizer states, loop state.

    Written to a temporary directory and renamed into place, so a crash never leaves a
    half-written checkpoint; ``lora/`` at the top of the run dir is the latest LoRA.
    """
    state = service.learner.state_dict()
    final = run_dir / "checkpoints" / f"step_{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_lora_state(state["lora"], service.cfg.lora.spec(service.cfg.seed), tmp / "lora")
    torch.save({"learner": state, "step": step, "cursor": cursor.position}, tmp / "trainer.pt")
    if final.exists():  # a resumed run re-saving a step
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest = run_dir / "lora"
    shutil.rmtree(latest, ignore_errors=True)
    shutil.copytree(final / "lora", latest)
    return final


def check_http_rewards(cfg: Config) -> None:
    """``GET /health`` with the token on every kind-http reward: fails fast, before any actor."""
    for ext in cfg.external_rewards:
        if ext.kind == "http":
            try:
                with HttpScorer(**ext.http_kwargs()) as scorer:
                    health = scorer.preflight()
            except Exception as e:  # the message names the URL and the status or the cause
                raise RuntimeError(f"external reward {ext.name!r}: preflight failed: {e}") from None
            print(f"reward {ext.name!r}: {ext.url} serves {health.name} (version "
                  f"{health.version})", flush=True)


def on_reward_failure(failure: RewardFailure, cfg: Config, service: Service,
                      weights: dict[str, float], run_dir: Path, cursor: PromptCursor,
                      step: int) -> dict[str, float]:
    """Apply the failed reward's ``on_failure``; returns the weights to train on with.

    * ``drop``: the reward's pool is shut down; the remaining rewards' weights are rescaled
      to sum to the original total (so the advantage keeps its scale); steps not trained
      yet use them, and their samples record the dropped reward as null.
    * ``stop`` (and always for self-confidence, or when nothing is left to rescale):
      checkpoint at ``step`` (the steps trained so far), then raise :class:`RewardStopped`.
    """
    name = failure.reward
    ext = next((e for e in cfg.external_rewards if e.name == name), None)
    where = f" ({ext.url})" if ext is not None and ext.kind == "http" else ""
    rest = {k: w for k, w in weights.items() if k != name}
    total, kept = sum(weights.values()), sum(rest.values())
    if ext is not None and ext.on_failure == "drop" and kept != 0 and total != 0:
        service.drop(name)
        renormalised = {k: w * total / kept for k, w in rest.items()}
        logger.warning("reward %r%s failed for good at step %d: %s; on_failure=drop: training "
                       "on without it, remaining weights renormalised to %s (total %g)",
                       name, where, step, failure.error, renormalised, total)
        return renormalised
    reason = ("self-confidence cannot be dropped" if ext is None
              else "on_failure=stop" if ext.on_failure == "stop"
              else "on_failure=drop, but the remaining weights sum to 0")
    checkpoint = save_checkpoint(run_dir, service, cursor, step)
    raise RewardStopped(
        f"reward {name!r}{where} failed for good at step {step}: {failure.error}. {reason}: "
        f"saved checkpoint {checkpoint}; continue with `python -m learner.main --resume "
        f"{run_dir}` once the reward works again (or set on_failure: drop)", name, checkpoint,
    ) from failure


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = sorted(p for p in (run_dir / "checkpoints").glob("step_*") if not p.name.endswith(".tmp"))
    return done[-1] if done else None


def init_ray(cfg: Config, address: str | None) -> None:
    """Join ``address``/RAY_ADDRESS (as under ``ray job submit``) or start a local instance."""
    address = address or cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, namespace=cfg.ray.namespace, log_to_driver=True)
    else:  # "local" never attaches to a cluster that happens to run on this machine
        ray.init(address="local", num_cpus=cfg.ray.num_cpus or local_cpus(cfg),
                 namespace=cfg.ray.namespace, include_dashboard=False)


def local_cpus(cfg: Config) -> int:
    """Logical CPUs for a local instance: at least what every actor reserves.

    Ray's CPUs are scheduling tokens; each actor sets its torch threads itself, so on a
    2-core laptop the actors share the cores rather than wait forever for a free one.
    """
    reserved = (cfg.rollout.num_actors * cfg.rollout.num_cpus
                + cfg.reward_pool.num_actors * cfg.reward_pool.num_cpus
                + sum(e.num_actors * e.num_cpus for e in cfg.external_rewards)
                + cfg.learner.num_ranks * cfg.learner.num_cpus)
    return max(os.cpu_count() or 1, int(np.ceil(reserved)) + 1)


def train(cfg: Config, run_dir: Path, resume: bool = False) -> Path:
    """Run the service for ``cfg.train.steps`` steps; returns the run directory."""
    rows = load_prompts(cfg.train.prompts)
    check_http_rewards(cfg)  # an unreachable server or a wrong token fails here, not mid-run
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    service = Service(cfg, rows)
    cursor, start = PromptCursor(rows, cfg.seed), 0
    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        saved = torch.load(ckpt / "trainer.pt", weights_only=False)
        service.learner.load_state_dict(saved["learner"])
        start, cursor.position = saved["step"], saved["cursor"]
        print(f"resuming {run_dir} at step {start} from {ckpt.name}", flush=True)
    metrics_server = PrometheusMetrics(cfg.metrics.port, list(service.pools))
    version = start  # weight version v = optimizer steps taken
    service.publish(version)
    names = list(service.pools)
    weights = ({SC: cfg.self_confidence.weight} if cfg.self_confidence.enabled else {}) | {
        e.name: e.weight for e in cfg.external_rewards}
    steps_trained = list(range(*suffix_window(cfg.sampler.num_steps - 1, cfg.grpo.train_fraction)))
    inflight: dict[int, StepWork] = {}
    next_launch = start
    mode = "a" if resume else "w"
    bar = tqdm(range(start, cfg.train.steps), initial=start, total=cfg.train.steps, desc="train")
    try:
        with open(run_dir / "metrics.jsonl", mode) as log, open(run_dir / "samples.jsonl", mode) as samples:
            for step in bar:
                t0 = time.perf_counter()
                # prompts -> rollouts: keep up to max_staleness steps sampling ahead
                while next_launch <= step + cfg.learner.max_staleness and next_launch < cfg.train.steps:
                    picked = cursor.take(cfg.grpo.prompts_per_step)
                    inflight[next_launch] = service.launch(next_launch, version, picked)
                    next_launch += 1
                # rollouts -> scores, taken as they finish
                while True:
                    try:
                        service.gather(inflight, step)
                        break
                    except RewardFailure as failure:  # on_failure: stop (raises) or drop
                        weights = on_reward_failure(failure, cfg, service, weights, run_dir,
                                                    cursor, step)
                        metrics_server.drop_reward(failure.reward)
                work = inflight.pop(step)
                check_versions(work)
                t1 = time.perf_counter()
                # scores -> advantages over the whole step (global std needs all of it)
                rewards = rewards_of(work, list(weights))  # the rewards not dropped
                main_reward = next(iter(rewards))  # self-confidence unless disabled: bar, grids
                group_ids = torch.arange(len(rewards[main_reward])) // cfg.grpo.group_size
                adv = combine_advantages(
                    {k: torch.from_numpy(v) for k, v in rewards.items()}, weights, group_ids,
                    cfg.grpo.combine, cfg.grpo.std_mode, cfg.grpo.adv_clip, cfg.grpo.adv_eps)
                # advantages -> update (DeepSpeed ranks take the rollouts by reference)
                staleness = version - work.version
                metrics = {}
                if adv.keep.any():
                    pending = service.learner.submit_train_step(
                        work.refs, adv.values.numpy(), adv.keep.numpy(), steps_trained)
                    service.wait_update(pending, inflight)  # scoring of step + 1 goes on
                    metrics = service.learner.finish_train_step(pending)
                    # the ranks' own compute time; timing/update_s below is the driver's wait
                    metrics["timing/learner_compute_s"] = metrics.pop("timing/update_s")
                t2 = time.perf_counter()
                # update -> publish weights v+1 to every rollout actor
                version += 1
                push_s = service.publish(version)
                # log
                dropped = tuple(n for n in names if n not in weights)
                write_samples(samples, work, rewards, adv, version - 1, dropped)
                samples.flush()
                n = len(rewards[main_reward])
                metrics.update(advantage_metrics(adv))
                for name, r in rewards.items():
                    metrics[f"reward/{name}/mean"] = float(r.mean())
                    metrics[f"reward/{name}/std"] = float(r.std())
                    metrics[f"reward/{name}/weight"] = weights[name]
                metrics["reward/dropped"] = len(dropped)
                for pool in service.pools.values():
                    pool.sync_control()  # a size set from outside (python -m actors.scale)
                if SC in service.pools:
                    metrics.update(service.pools[SC].metrics())
                metrics.update({
                    "step": step, "time": time.time(), "rollout/staleness": staleness,
                    "rollout/samples": n,
                    "rollout/samples_per_s": n / (time.perf_counter() - t0),
                    "timing/wait_scores_s": t1 - t0, "timing/update_s": t2 - t1,
                    "timing/publish_s": push_s, "system/queue_depth": len(inflight),
                    "system/weight_version": version,
                })
                log.write(json.dumps(metrics) + "\n")
                log.flush()
                metrics_server.update(metrics)
                bar.set_postfix(reward=f"{metrics[f'reward/{main_reward}/mean']:+.4f}",
                                sps=f"{metrics['rollout/samples_per_s']:.1f}", stale=staleness)
                last = step == cfg.train.steps - 1
                if (step + 1) % cfg.train.save_every == 0 or last:
                    save_checkpoint(run_dir, service, cursor, step + 1)
                if (step + 1) % cfg.metrics.grid_every == 0 or last:
                    images = ray.get(service.rollout_actors[0].decode.remote(work.refs[0]))
                    prompts = [p for _, p in work.groups[0] for _ in range(cfg.grpo.group_size)]
                    label = "sc" if main_reward == SC else main_reward[:6]
                    captions = [prompt_lines(p) + [f"{label} {r:+.3f}"]
                                for p, r in zip(prompts, rewards[main_reward], strict=False)]
                    save_grid(run_dir / "grids" / f"step_{step:06d}.png", images, captions)
    finally:
        bar.close()
        service.close()
    return run_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Flow-GRPO + SOLACE post-training on Ray.")
    parser.add_argument("--config", type=Path, help=f"YAML preset (default: {DEFAULT_CONFIG})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, e.g. train.steps=5 (repeatable)")
    parser.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS or a new local one)")
    parser.add_argument("--run-dir", type=Path, help="where to write (default: train.out_dir/<time>)")
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR",
                        help="continue RUN_DIR from its last checkpoint, with its config")
    args = parser.parse_args(argv)
    config_path = args.resume / "config.yaml" if args.resume else args.config or DEFAULT_CONFIG
    try:
        cfg = load_config(config_path, args.overrides)  # fails here, before any actor starts
    except ConfigError as e:
        parser.error(str(e))
    run_dir = args.resume or args.run_dir or Path(cfg.train.out_dir) / time.strftime("%Y%m%d-%H%M%S")
    init_ray(cfg, args.address)
    try:
        train(cfg, run_dir, resume=bool(args.resume))
    finally:
        ray.shutdown()
    print(f"run directory: {run_dir}")


if __name__ == "__main__":
    main()
