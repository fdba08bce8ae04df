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
import time
from pathlib import Path

import numpy as np
import ray
import torch
import yaml
from tqdm import tqdm

from learner import evaluation
from learner.config import SC, Config, ConfigError, load_config
from learner.grpo import advantage_metrics, combine_advantages, shuffle_within_groups
from learner.metrics import PrometheusMetrics
from learner.prompts import PromptCursor, load_prompts
from learner.rundir import latest_checkpoint, save_checkpoint, write_samples
from learner.service import RewardFailure, Service, StepWork, check_versions, rewards_of
from policy.grid import prompt_lines, save_grid
from policy.sampler import SHUFFLE_STREAM, derive_seed, suffix_window
from rewards.http import HttpScorer

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny_solace.yaml"
logger = logging.getLogger(__name__)


class RewardStopped(RuntimeError):
    """The run stopped because a reward failed (``on_failure: stop``), after a checkpoint."""

    def __init__(self, message: str, reward: str, checkpoint: Path) -> None:
        super().__init__(message)
        self.reward, self.checkpoint = reward, checkpoint


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
    eval_set = (evaluation.eval_rows(load_prompts(cfg.eval.prompts), cfg.eval.prompts_per_tag)
                if cfg.eval.every else [])
    service = Service(cfg, rows, eval_set)
    cursor, start = PromptCursor(rows, cfg.seed, mix=cfg.train.prompt_mix), 0
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
    inflight: dict[int | tuple[str, int], StepWork] = {}
    next_launch = start
    mode = "a" if resume else "w"
    if not resume:
        for name in ("evals.jsonl", "eval_samples.jsonl"):
            (run_dir / name).unlink(missing_ok=True)

    def wait_for(key) -> None:
        """Wait for every reward of ``inflight[key]``; a reward failing for good: its on_failure."""
        nonlocal weights
        while True:
            try:
                return service.gather(inflight, key)
            except RewardFailure as failure:  # on_failure: stop (raises) or drop
                weights = on_reward_failure(failure, cfg, service, weights, run_dir, cursor,
                                            key if isinstance(key, int) else key[1])
                metrics_server.drop_reward(failure.reward)

    def evaluate(version: int, step: int) -> dict[str, float]:
        """Evaluate weights ``version`` (published) on the held-out prompts; log and plot it."""
        t = time.perf_counter()
        jobs = evaluation.eval_jobs(eval_set, cfg.eval.per_prompt, offset=len(rows))
        work, image_refs = service.launch_eval(version, jobs, cfg.eval.seed, len(rows),
                                               cfg.eval.rewards)
        inflight[work.step] = work
        wait_for(work.step)
        inflight.pop(work.step)
        check_versions(work)
        scores = rewards_of(work, list(service.pools)) if work.scored else {}
        result = evaluation.grade(version, step, eval_set, cfg.eval.per_prompt,
                                  np.concatenate(ray.get(image_refs)), scores)
        result.summary["timing/eval_s"] = time.perf_counter() - t
        evaluation.write(run_dir, result)
        evaluation.plot(run_dir)
        metrics_server.update_eval(result.summary)
        shown = {k: v for k, v in result.summary.items()
                 if k.endswith(("/strict", "/mean")) and k.count("/") == 2}
        tqdm.write(f"eval at version {version}: " + ", ".join(
            f"{k[5:]} {v:.4f}" for k, v in shown.items()))
        return result.summary

    bar = tqdm(range(start, cfg.train.steps), initial=start, total=cfg.train.steps, desc="train")
    try:
        if cfg.eval.every and version not in evaluation.read_evals(run_dir):
            evaluate(version, start)  # the starting point of every paired gain
        with open(run_dir / "metrics.jsonl", mode) as log, open(run_dir / "samples.jsonl", mode) as samples:
            for step in bar:
                t0 = time.perf_counter()
                # prompts -> rollouts: keep up to max_staleness steps sampling ahead
                while next_launch <= step + cfg.learner.max_staleness and next_launch < cfg.train.steps:
                    picked = cursor.take(cfg.grpo.prompts_per_step)
                    inflight[next_launch] = service.launch(next_launch, version, picked)
                    next_launch += 1
                # rollouts -> scores, taken as they finish
                wait_for(step)
                work = inflight.pop(step)
                check_versions(work)
                t1 = time.perf_counter()
                # scores -> advantages over the whole step (global std needs all of it)
                rewards = rewards_of(work, list(weights))  # the rewards not dropped
                main_reward = next(iter(rewards))  # self-confidence unless disabled: bar, grids
                group_ids = torch.arange(len(rewards[main_reward])) // cfg.grpo.group_size
                trained_on = {k: torch.from_numpy(v) for k, v in rewards.items()}
                if cfg.grpo.shuffle_rewards:  # the random-reward control
                    trained_on = shuffle_within_groups(trained_on, group_ids,
                                                       derive_seed(cfg.seed, SHUFFLE_STREAM, step))
                adv = combine_advantages(trained_on, weights, group_ids,
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
                last = step == cfg.train.steps - 1
                # evaluate held-out prompts with fixed noise (every eval.every steps)
                if cfg.eval.every and ((step + 1) % cfg.eval.every == 0 or last):
                    metrics.update(evaluate(version, step + 1))
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
    for line in evaluation.report(run_dir):  # start -> end, paired image by image
        print(line, flush=True)
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
