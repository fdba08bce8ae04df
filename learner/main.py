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
import math
import os
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import ray
import torch
import yaml
from PIL import Image
from tqdm import tqdm

from actors.pool import RewardError
from learner import console, evaluation, reaper
from learner.charts import plot_training
from learner.config import SC, Config, ConfigError, load_config
from learner.console import quiet_env, quiet_this_process
from learner.ema import WeightsEMA
from learner.engine import PlacementTimeout
from learner.grpo import (
    advantage_metrics,
    combine_advantages,
    group_spreads,
    shuffle_within_groups,
    step_advantages,
)
from learner.metrics import PrometheusMetrics
from learner.preflight import PreflightError, check_cluster_resources, preflight
from learner.prompts import PromptCursor, load_prompts, select_tags
from learner.rundir import (
    latest_checkpoint,
    log_sizes,
    restore_logs,
    save_checkpoint,
    write_samples,
)
from learner.service import (
    RewardFailure,
    RolloutFailure,
    Service,
    StepTimeout,
    StepWork,
    StopRequested,
    check_versions,
    rewards_of,
    step_scores_of,
)
from learner.stopping import RunStopped, StopSignals
from learner.tracking import Tracker
from policy.grid import prompt_lines, save_grid
from policy.logprob import window_steps
from policy.sampler import SHUFFLE_STREAM, derive_seed
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
                      weights: dict[str, float], checkpoint: Callable[[], Path],
                      step: int) -> dict[str, float]:
    """Apply the failed reward's ``on_failure``; returns the weights to train on with.

    * ``drop``: the reward's pool is shut down; the remaining rewards' weights are rescaled
      to sum to the original total (so the advantage keeps its scale); steps not trained
      yet use them, and their samples record the dropped reward as null.
    * ``stop`` (and always for self-confidence, or when nothing is left to rescale):
      ``checkpoint()`` (of the ``step`` steps done), then raise :class:`RewardStopped`.
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
    saved = checkpoint()
    raise RewardStopped(
        f"reward {name!r}{where} failed for good at step {step}: {failure.error}. {reason}: "
        f"saved checkpoint {saved}; continue with `python -m learner.main --resume "
        f"{saved.parents[1]}` once the reward works again (or set on_failure: drop)", name, saved,
    ) from failure


def init_ray(cfg: Config, address: str | None, verbose: bool = False) -> None:
    """Join ``address``/RAY_ADDRESS (as under ``ray job submit``) or start a local instance.

    A local instance gets the quiet environment of ``learner.console`` for every actor
    (unless ``verbose``), and the dashboard when ``ray.dashboard``; its URL is printed.
    """
    address = address or cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        context = ray.init(address=address, namespace=cfg.ray.namespace, log_to_driver=True)
    else:  # "local" never attaches to a cluster that happens to run on this machine
        env = {"SOLACE_VERBOSE": "1"} if verbose else quiet_env(cfg.model.device)
        context = ray.init(address="local", num_cpus=cfg.ray.num_cpus or local_cpus(cfg),
                           namespace=cfg.ray.namespace, include_dashboard=cfg.ray.dashboard,
                           runtime_env={"env_vars": env},
                           logging_level=logging.INFO if verbose else logging.WARNING)
        reaper.start()  # if this process is SIGKILLed, the instance's agents go with it
    url = getattr(context, "dashboard_url", None)
    if url:
        print(f"Ray dashboard: http://{url}" if "://" not in url else f"Ray dashboard: {url}",
              flush=True)


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


class RunFailed(RuntimeError):
    """The run stopped on a fault it cannot recover from; the message says what happened,
    which checkpoint stands and how to go on."""


class NonFinite(RuntimeError):
    """An advantage or a loss is NaN or infinite: the step is not trained on (or, for a
    loss, its weights are not published)."""


def check_finite_advantages(step: int, adv: np.ndarray, rewards: dict[str, np.ndarray]) -> None:
    """Refuse to train step ``step`` on a NaN or infinite advantage, naming the reward."""
    if np.isfinite(adv).all():
        return
    bad = [name for name, r in rewards.items() if not np.isfinite(r).all()]
    raise NonFinite(f"step {step}: {int((~np.isfinite(adv)).sum())} non-finite advantages "
                    f"(non-finite rewards: {bad or 'none'}); the step was not trained on")


def check_finite_update(step: int, metrics: dict[str, float], run_dir: Path) -> None:
    """A NaN or infinite loss or gradient norm: the new weights are not published."""
    bad = {k: v for k, v in metrics.items() if k in ("loss/total", "loss/grad_norm")
           and isinstance(v, float) and not math.isfinite(v)}
    if bad:
        raise RunFailed(
            f"step {step}: the update gave {bad}; its weights were not published or saved. "
            f"The last checkpoint ({latest_checkpoint(run_dir)}) stands; lower grpo.lr or "
            "raise grpo.max_grad_norm before resuming from it")


def pool_metrics(name: str, pool) -> dict[str, float]:
    """A reward pool's retries, failures, timeouts and size: ``reward/pool/*`` for
    self-confidence (as the dashboard has always charted it), ``reward/<name>/pool/*`` for
    every external reward."""
    prefix = "reward/pool/" if name == SC else f"reward/{name}/pool/"
    return {prefix + k.removeprefix("reward/pool/"): v for k, v in pool.metrics().items()}


def first_line(error: BaseException, limit: int = 400) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:limit]


def checkpoint_steps(path: Path | None) -> int | None:
    return int(path.name.removeprefix("step_")) if path is not None else None


def try_checkpoint(checkpoint: Callable[[int], Path], steps: int) -> Path | None:
    """A checkpoint after a fault, if the actors it needs still answer."""
    try:
        return checkpoint(steps)
    except Exception as e:  # the fault took the learner (or the object store) with it
        logger.warning("no checkpoint after the fault: %s", first_line(e))
        return None


def train(cfg: Config, run_dir: Path, resume: bool = False) -> Path:
    """Run the service for ``cfg.train.steps`` steps; returns the run directory.

    Raises :class:`RunStopped` after a SIGTERM/SIGINT (a checkpoint of the steps done is
    written first), :class:`RewardStopped` when a reward fails for good with
    ``on_failure: stop``, and :class:`RunFailed` on a fault the run cannot recover from.
    """
    preflight(cfg)  # (main() ran it before Ray started; callers of train() get it here)
    rows = select_tags(load_prompts(cfg.train.prompts), cfg.train.tags, cfg.train.prompts)
    check_http_rewards(cfg)  # an unreachable server or a wrong token fails here, not mid-run
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = latest_checkpoint(run_dir) if resume else None
    saved = torch.load(ckpt / "trainer.pt", weights_only=False) if ckpt is not None else None
    if saved is None or "logs" in saved:  # (checkpoints before log lengths: append as is)
        restore_logs(run_dir, saved["logs"] if saved else None)
    resolved = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    (run_dir / "config.yaml").write_text(resolved)
    eval_set = (evaluation.eval_rows(load_prompts(cfg.eval.prompts), cfg.eval.prompts_per_tag)
                if cfg.eval.every else [])
    try:
        service = Service(cfg, rows, eval_set)
    except (RewardError, PlacementTimeout) as e:  # actors that could not start or be placed
        raise RunFailed(f"{e}; the run did not start (no step was taken)") from e
    cursor = PromptCursor(rows, cfg.seed, mix=cfg.train.prompt_mix,
                          lag=cfg.learner.max_staleness, floor=cfg.train.spread_floor)
    start = 0
    if saved is not None:
        service.learner.load_state_dict(saved["learner"])
        start = saved["step"]
        cursor.load_state_dict(saved["cursor"])
        for v, flat in saved.get("stale_weights", {}).items():
            service.restore_weights(v, flat)
        print(f"resuming {run_dir} at step {start} from {ckpt.name}", flush=True)
    metrics_server = PrometheusMetrics(cfg.metrics.port, list(service.pools),
                                       host=cfg.metrics.host)
    if start:
        metrics_server.steps.inc(start)  # the counter counts the run's steps, not the process's
    version = start  # weight version v = optimizer steps taken
    service.publish(version)
    ema = None  # the LoRA's moving average (ema.decay > 0): what evaluations see
    if cfg.ema.decay:
        ema = WeightsEMA(cfg.ema.decay, ray.get(service.weights[version],
                                                timeout=cfg.rollout.timeout_s))
        if saved is not None and saved.get("ema"):
            ema.load_state_dict(saved["ema"])
    last_eval: dict[str, float] = {}
    names = list(service.pools)
    weights = ({SC: cfg.self_confidence.weight} if cfg.self_confidence.enabled else {}) | {
        e.name: e.weight for e in cfg.external_rewards}
    # the last train_fraction of the SDE window's steps, as learner.sequential trains
    steps_trained = window_steps(cfg.sampler.spec(), cfg.grpo.train_fraction)
    lag, steps = cfg.learner.max_staleness, cfg.train.steps
    inflight: dict[int | tuple[str, int], StepWork] = {}
    launched_at: dict[int, int] = {}  # step -> the prompt cursor before its prompts
    # Open for the whole run and closed in the finally below, after the last checkpoint
    # (which a handler of the loop's exceptions may write).
    files = ExitStack()
    log = files.enter_context(open(run_dir / "metrics.jsonl", "a"))  # noqa: SIM115
    samples = files.enter_context(open(run_dir / "samples.jsonl", "a"))  # noqa: SIM115
    # TensorBoard (and W&B by config): the same names as metrics.jsonl, from one call site
    tracker = files.enter_context(Tracker(run_dir, cfg, start_step=start))
    tracker.log_text("config", resolved)
    pending: dict | None = None  # the last step's metrics line, written once complete
    steps_done = start  # steps whose update, samples and metrics are in

    def launch(step: int, with_version: int) -> None:
        launched_at[step] = cursor.position
        picked = cursor.take(cfg.grpo.prompts_per_step, step)
        inflight[step] = service.launch(step, with_version, picked)

    def write_metrics() -> None:
        nonlocal pending
        if pending is not None:
            log.write(json.dumps(pending) + "\n")
            log.flush()
            metrics_server.update(pending)
            tracker.log(pending["step"], pending)
            pending = None

    def checkpoint(done: int) -> Path:
        """Checkpoint after ``done`` steps, with the loop state that makes resume exact."""
        write_metrics()
        samples.flush()
        versions = [v for v in service.weights if v < done]
        stale = dict(zip(versions, ray.get([service.weights[v] for v in versions],
                                           timeout=cfg.rollout.timeout_s), strict=True))
        position = {"position": launched_at.get(done, cursor.position),
                    "spreads": {s: v for s, v in cursor.spreads.items() if s < done}}
        path = save_checkpoint(run_dir, service, position, done,
                               logs=log_sizes(run_dir), stale=stale, ema=ema)
        plot_training(run_dir)  # training.png, refreshed at every checkpoint
        return path

    def wait_for(key) -> None:
        """Wait for every reward of ``inflight[key]``; a reward failing for good: its on_failure."""
        nonlocal weights
        while True:
            try:
                return service.gather(inflight, key, stop)
            except RewardFailure as failure:  # on_failure: stop (raises) or drop
                weights = on_reward_failure(failure, cfg, service, weights,
                                            lambda: checkpoint(steps_done), steps_done)
                metrics_server.drop_reward(failure.reward)

    def evaluate(version: int, step: int) -> dict[str, float]:
        """Evaluate weights ``version`` (published), or their EMA, on the held-out prompts;
        log and plot it."""
        t = time.perf_counter()
        jobs = evaluation.eval_jobs(eval_set, cfg.eval.per_prompt, offset=len(rows))
        served = version
        if ema is not None:  # the average travels under its own id, never a version's
            flat = ema.flat()
            served = flat.version
            service.weights[served] = ray.put(flat)
        work, image_refs = service.launch_eval(served, jobs, cfg.eval.seed, len(rows),
                                               cfg.eval.rewards)
        inflight[work.step] = work
        try:
            wait_for(work.step)
        finally:
            inflight.pop(work.step)
            if ema is not None:
                service.weights.pop(served, None)
        check_versions(work)
        scores = rewards_of(work, list(service.pools)) if work.scored else {}
        images = ray.get(image_refs, timeout=cfg.rollout.timeout_s)
        result = evaluation.grade(version, step, eval_set, cfg.eval.per_prompt,
                                  np.concatenate(images), scores)
        result.summary["timing/eval_s"] = time.perf_counter() - t
        if ema is not None:
            result.summary["eval/ema_decay"] = ema.decay
        evaluation.write(run_dir, result)
        last_eval.clear()
        last_eval.update(result.summary)
        evaluation.plot(run_dir)
        metrics_server.update_eval(result.summary)
        shown = {k: v for k, v in result.summary.items()
                 if k.endswith(("/strict", "/mean")) and k.count("/") == 2}
        tqdm.write(f"eval at version {version}{' (EMA)' if ema else ''}: " + ", ".join(
            f"{k[5:]} {v:.4f}" for k, v in shown.items()))
        return result.summary

    # A resumed run first samples again what the stopped one had sampled ahead, with the
    # older versions it used there (saved in the checkpoint): step j went out with
    # version max(0, j - max_staleness).
    for j in range(start, min(start + lag, steps)) if start else ():
        older = max(0, j - lag)
        if older not in service.weights:  # a checkpoint without them: the newest instead
            logger.warning("checkpoint has no weights of version %d: step %d is sampled with "
                           "version %d, not as the uninterrupted run did", older, j, version)
            older = version
        launch(j, older)
    next_launch = max(inflight, default=start - 1) + 1

    bar = tqdm(range(start, steps), initial=start, total=steps, desc="train")
    stop = StopSignals(cfg.train.stop_timeout_s)
    updating = False
    try:
        with stop:
            if cfg.eval.every and version not in evaluation.read_evals(run_dir):
                evaluate(version, start)  # the starting point of every paired gain
            for step in bar:
                if stop():
                    raise StopRequested
                t0 = time.perf_counter()
                # prompts -> rollouts: keep up to max_staleness steps sampling ahead
                while next_launch <= step + lag and next_launch < steps:
                    launch(next_launch, version)
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
                if cfg.grpo.credit == "per_step":  # self-confidence's gain step by step
                    trained_on = {SC: torch.from_numpy(step_scores_of(work))}  # [N, S+1]
                if cfg.grpo.shuffle_rewards:  # the random-reward control
                    trained_on = shuffle_within_groups(trained_on, group_ids,
                                                       derive_seed(cfg.seed, SHUFFLE_STREAM, step))
                if cfg.grpo.credit == "per_step":
                    adv = step_advantages(trained_on[SC], group_ids, cfg.grpo.adv_clip,
                                          cfg.grpo.adv_eps)  # values [N, S]
                else:
                    adv = combine_advantages(trained_on, weights, group_ids, cfg.grpo.combine,
                        cfg.grpo.std_mode, cfg.grpo.adv_clip, cfg.grpo.adv_eps)
                check_finite_advantages(step, adv.values.numpy(), rewards)
                # the groups' spread, for prompt_mix spread's later draws
                cursor.observe(step, zip([i for call in work.groups for i, _ in call],
                                         group_spreads(adv.values, group_ids).tolist(), strict=True))
                # advantages -> update (DeepSpeed ranks take the rollouts by reference)
                staleness = version - work.version
                metrics = {}
                if adv.keep.any() and not cfg.grpo.frozen:
                    updating = True  # from here to the new version, no checkpoint is whole
                    compute_s, first = 0.0, None
                    # grpo.inner_epochs optimizer steps on the step's samples (PPO's epochs;
                    # the clipped objective keeps them near the sampling policy)
                    for _ in range(cfg.grpo.inner_epochs):
                        pending_update = service.learner.submit_train_step(
                            work.refs, adv.values.numpy(), adv.keep.numpy(), steps_trained,
                            sizes=work.sizes(), behaviour=service.weights[work.version]
                            if cfg.learner.recompute_old_logprobs else None)
                        service.wait_update(pending_update, inflight)  # scoring goes on
                        metrics = service.learner.finish_train_step(pending_update)
                        check_finite_update(step, metrics, run_dir)
                        compute_s += metrics.pop("timing/update_s")
                        first = first or metrics
                    # the first epoch's ratio is the on-policy check; the rest: the last epoch's
                    metrics["loss/first_ratio_max_dev"] = first["loss/first_ratio_max_dev"]
                    metrics["loss/inner_epochs"] = cfg.grpo.inner_epochs
                    # the ranks' own compute time; timing/update_s below is the driver's wait
                    metrics["timing/learner_compute_s"] = compute_s
                t2 = time.perf_counter()
                # update -> publish weights v+1 to every rollout actor
                version += 1
                push_s = service.publish(version)
                updating = False
                if ema is not None and (step + 1) % cfg.ema.every == 0:
                    ema.update(ray.get(service.weights[version], timeout=cfg.rollout.timeout_s))
                last = step == steps - 1
                # log: the samples now, the metrics line once the evaluation is in
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
                for name, pool in service.pools.items():
                    pool.sync_control()  # a size set from outside (python -m actors.scale)
                    metrics.update(pool_metrics(name, pool))
                metrics.update({
                    "step": step, "time": time.time(), "rollout/staleness": staleness,
                    "rollout/samples": n,
                    "rollout/samples_per_s": n / (time.perf_counter() - t0),
                    "timing/wait_scores_s": t1 - t0, "timing/update_s": t2 - t1,
                    "timing/publish_s": push_s, "system/queue_depth": len(inflight),
                    "system/weight_version": version,
                })
                pending, steps_done = metrics, step + 1
                # evaluate held-out prompts with fixed noise (every eval.every steps)
                # (a frozen control's later versions hold the base weights: nothing to see)
                if (cfg.eval.every and ((step + 1) % cfg.eval.every == 0 or last) and not stop()
                        and not cfg.grpo.frozen):
                    metrics.update(evaluate(version, step + 1))
                write_metrics()
                shown = {"reward": f"{metrics[f'reward/{main_reward}/mean']:+.4f}"}
                score = next((last_eval[k] for k in ("eval/shapes/strict", f"eval/{main_reward}/mean")
                              if k in last_eval), None)
                if score is not None:
                    shown["eval"] = f"{score:.4f}"
                bar.set_postfix(shown | {"sps": f"{metrics['rollout/samples_per_s']:.1f}",
                                         "stale": staleness})
                if (step + 1) % cfg.train.save_every == 0 or last or stop():
                    checkpoint(step + 1)
                if (step + 1) % cfg.metrics.grid_every == 0 or last:
                    images = ray.get(service.rollout_actors[0].decode.remote(work.refs[0]),
                                     timeout=cfg.rollout.timeout_s)
                    prompts = [p for _, p in work.groups[0] for _ in range(cfg.grpo.group_size)]
                    label = "sc" if main_reward == SC else main_reward[:6]
                    captions = [prompt_lines(p) + [f"{label} {r:+.3f}"]
                                for p, r in zip(prompts, rewards[main_reward], strict=False)]
                    grid = save_grid(run_dir / "grids" / f"step_{step:06d}.png", images, captions)
                    tracker.log_images(step, "samples", Image.open(grid))
            if stop():  # the signal came during the last step: it is checkpointed
                raise StopRequested
    except StopRequested:
        path = latest_checkpoint(run_dir)
        if checkpoint_steps(path) != steps_done:
            path = checkpoint(steps_done)
        raise RunStopped(stop.requested, steps_done, path, run_dir) from None
    except (RolloutFailure, StepTimeout, NonFinite, ray.exceptions.RayError) as e:
        path = None if updating else try_checkpoint(checkpoint, steps_done)
        path = path or latest_checkpoint(run_dir)
        where = (f"during the learner's (DeepSpeed ranks') update of step {steps_done}"
                 if updating else f"after {steps_done} steps")
        raise RunFailed(
            f"{type(e).__name__} {where}: {first_line(e)}\n"
            + (f"checkpoint {path} stands; continue with `python -m learner.main --resume "
               f"{run_dir}`" if path else "no checkpoint was written; start again")) from e
    finally:
        bar.close()
        files.close()
        service.close()
        stop.closed()
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
    parser.add_argument("--verbose", action="store_true",
                        help="leave the libraries' progress bars and warnings on, in every actor")
    args = parser.parse_args(argv)
    if args.verbose:
        os.environ["SOLACE_VERBOSE"] = "1"
    if args.resume and not (args.resume / "config.yaml").is_file():
        parser.error(f"--resume {args.resume}: no run there (a run directory holds the "
                     "config.yaml that learner.main wrote); give the directory a run printed")
    config_path = args.resume / "config.yaml" if args.resume else args.config or DEFAULT_CONFIG
    try:  # bad input fails here, before Ray or any actor starts: one message, status 2
        cfg = load_config(config_path, args.overrides)
        preflight(cfg)
    except (ConfigError, PreflightError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    run_dir = args.resume or args.run_dir or Path(cfg.train.out_dir) / time.strftime("%Y%m%d-%H%M%S")
    if not args.verbose:
        quiet_this_process(cfg.model.device)
    init_ray(cfg, args.address, verbose=args.verbose)
    try:
        check_cluster_resources(cfg, ray.cluster_resources())
    except PreflightError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        ray.shutdown()
        sys.exit(2)
    try:
        train(cfg, run_dir, resume=bool(args.resume))
    except RunStopped as e:  # a signal: checkpointed, resumable
        print(e, file=sys.stderr, flush=True)
        sys.exit(e.status)  # after the finally: the actors and Ray shut down first
    except (RunFailed, RewardStopped) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        ray.shutdown()
    for line in console.summary(run_dir, cfg.train.steps):
        print(line, flush=True)


if __name__ == "__main__":
    main()
