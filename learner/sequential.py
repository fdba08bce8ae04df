"""Flow-GRPO with the SOLACE reward in one process: sample, then score, then train.

This is the loop the reference implementations run, with no Ray and no DeepSpeed. It
is the readable statement of what the distributed service computes, and the baseline
it is benchmarked against.

    python -m learner.sequential [--config FILE] [--set section.field=value ...]

With no ``--config`` it runs ``configs/tiny_solace.yaml``, the CPU-sized tiny default.

Deviations from the reference (Flow-GRPO's train_sd3.py):

* One optimizer step per training step and inner epoch: gradients accumulate over all
  (micro-batch x trained step) pairs of the step; ``micro_batch`` only bounds memory.
* Groups whose rewards are all equal are not trained on (counted in the metrics).

Rewards: self-confidence (unless disabled) and every ``external_rewards`` entry, each
scorer built in this process (kind ``http`` through the same client as the service),
combined by ``grpo.combine`` as in ``learner.main``; ``samples.jsonl`` records every
sample's rewards, so the two loops can be compared sample by sample.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import yaml

from learner.config import HTTP_SCORER, SC, Config, load_config
from learner.grpo import (
    advantage_metrics,
    combine_advantages,
    group_spreads,
    shuffle_within_groups,
)
from learner.prompts import PromptCursor, load_prompts, select_tags
from learner.update import accumulate_grpo_gradients, recompute_old_log_probs
from policy.logprob import trained_steps
from policy.merged import merged_lora
from policy.pipeline import adapter_disabled, add_lora, build_pipeline, save_lora
from policy.sampler import (
    SHUFFLE_STREAM,
    Conditioning,
    Rollout,
    decode_images,
    derive_seed,
    encode_prompts,
    sample_rollout,
    sample_seed,
)
from rewards.self_confidence import score_rollout
from rewards.wire import import_scorer, reward_array

DEFAULT_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tiny_solace.yaml")


@dataclass
class Batch:
    """One step's samples: the rollout, its conditioning and its group ids."""

    rollout: Rollout
    cond: Conditioning
    group_ids: torch.Tensor  # [N]


def sample_step(pipe, cfg: Config, cursor: PromptCursor, step: int, negative: Conditioning) -> Batch:
    """Draw ``prompts_per_step`` prompts and sample ``group_size`` trajectories of each."""
    g = cfg.grpo.group_size
    picked = cursor.take(cfg.grpo.prompts_per_step, step)
    prompts = [row["prompt"] for _, row in picked for _ in range(g)]
    ids = torch.tensor([index for index, _ in picked for _ in range(g)])
    seeds = torch.tensor(
        [sample_seed(cfg.seed, step, index, i) for index, _ in picked for i in range(g)]
    )
    cond = encode_prompts(pipe, prompts, cfg.model.max_sequence_length)
    rollout = sample_rollout(pipe, prompts, seeds, cfg.sampler.spec(), prompt_ids=ids, cond=cond,
                             negative=negative, weight_version=step)
    # Group ids are positions within the step, so a prompt drawn twice forms two groups.
    group_ids = torch.arange(len(picked)).repeat_interleave(g)
    return Batch(rollout, cond, group_ids)


def build_scorers(cfg: Config) -> dict:
    """The external rewards' scorers, ``{name: scorer}``, built here (no actors)."""
    out = {}
    for ext in cfg.external_rewards:
        target, kwargs = ((HTTP_SCORER, ext.http_kwargs()) if ext.kind == "http"
                          else (ext.target, ext.kwargs))
        out[ext.name] = import_scorer(target, kwargs)
    return out


def score_step(pipe, cfg: Config, batch: Batch, negative: Conditioning, scorers: dict,
               rows: list[dict]) -> dict[str, torch.Tensor]:
    """Every reward of every sample: self-confidence (by default with the current policy, no
    CFG) and each external scorer on the decoded images with the prompts' metadata."""
    out = {}
    sc = cfg.self_confidence
    if sc.enabled:
        if sc.policy == "base":
            context = adapter_disabled(pipe.transformer)
        else:  # not in the ratio: merged forwards are safe (policy.merged)
            context = merged_lora(pipe.transformer) if sc.merge_lora else nullcontext()
        with context:
            out[SC], _ = score_rollout(pipe.transformer, batch.rollout, batch.cond, cfg.seed,
                                       sc.num_probes, sc.probe_fraction, sc.delta,
                                       sc.aggregation, sc.guidance_scale, negative)
    if scorers:
        images = decode_images(pipe, batch.rollout.final, cfg.rollout.decode_batch)
        metadata = [rows[i] for i in batch.rollout.prompt_ids.tolist()]
        for name, scorer in scorers.items():
            values = scorer(images, list(batch.rollout.prompts), metadata)
            out[name] = torch.from_numpy(reward_array(values, len(images), name))
    return out


def update_step(pipe, cfg: Config, batch: Batch, advantages, negative, optimizer, params) -> dict:
    """One Flow-GRPO update per inner epoch over the step's kept samples and trained steps."""
    gr = cfg.grpo
    keep = advantages.keep.nonzero().flatten()
    steps = trained_steps(batch.rollout, gr.train_fraction)
    recompute_s = 0.0
    if cfg.learner.recompute_old_logprobs:  # on-policy here: the weights that sampled
        t0 = time.perf_counter()
        batch = replace(batch, rollout=recompute_old_log_probs(
            pipe.transformer, batch.rollout, batch.cond, negative, keep, steps, gr))
        recompute_s = time.perf_counter() - t0
    for epoch in range(gr.inner_epochs):
        optimizer.zero_grad(set_to_none=True)
        metrics = accumulate_grpo_gradients(
            pipe.transformer, batch.rollout, batch.cond, negative, advantages.values, keep,
            steps, gr, torch.Tensor.backward, global_count=len(keep),
        )
        norm = torch.nn.utils.clip_grad_norm_(params, gr.max_grad_norm)
        optimizer.step()
        if epoch == 0:  # before any update this step: on-policy this is exactly 0
            first_dev = metrics["loss/first_ratio_max_dev"]
    metrics["loss/first_ratio_max_dev"] = first_dev
    metrics["loss/grad_norm"] = float(norm)
    if cfg.learner.recompute_old_logprobs:
        metrics["timing/recompute_s"] = recompute_s
    return metrics


def train(cfg: Config, run_dir: Path | None = None) -> Path:
    """Run ``cfg.train.steps`` Flow-GRPO steps; returns the run directory."""
    if cfg.grpo.credit != "trajectory":
        raise ValueError("learner.sequential trains trajectory-level advantages only; "
                         "grpo.credit per_step runs in the service (python -m learner.main)")
    torch.manual_seed(cfg.seed)
    run_dir = run_dir or Path(cfg.train.out_dir) / time.strftime("sequential-%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))

    pipe = build_pipeline(cfg.model.path, cfg.model.dtype, cfg.model.device, cfg.model.num_threads)
    params_names = add_lora(pipe.transformer, cfg.lora.spec(cfg.seed))
    if cfg.learner.gradient_checkpointing:
        pipe.transformer.enable_gradient_checkpointing()
    named = dict(pipe.transformer.named_parameters())
    params = [named[n] for n in params_names]
    optimizer = torch.optim.AdamW(params, lr=cfg.grpo.lr, weight_decay=cfg.grpo.weight_decay)
    rows = select_tags(load_prompts(cfg.train.prompts), cfg.train.tags, cfg.train.prompts)
    cursor = PromptCursor(rows, cfg.seed, mix=cfg.train.prompt_mix, floor=cfg.train.spread_floor)
    negative = encode_prompts(pipe, [""], cfg.model.max_sequence_length)
    scorers = build_scorers(cfg)
    weights = ({SC: cfg.self_confidence.weight} if cfg.self_confidence.enabled else {}) | {
        e.name: e.weight for e in cfg.external_rewards}

    with open(run_dir / "metrics.jsonl", "w") as log, open(run_dir / "samples.jsonl", "w") as samples:
        for step in range(cfg.train.steps):
            t0 = time.perf_counter()
            batch = sample_step(pipe, cfg, cursor, step, negative)  # prompts -> rollouts
            t1 = time.perf_counter()
            rewards = score_step(pipe, cfg, batch, negative, scorers, rows)  # rollouts -> rewards
            t2 = time.perf_counter()
            trained_on = rewards
            if cfg.grpo.shuffle_rewards:  # the random-reward control, as in learner.main
                trained_on = shuffle_within_groups(rewards, batch.group_ids,
                                                   derive_seed(cfg.seed, SHUFFLE_STREAM, step))
            adv = combine_advantages(  # rewards -> advantages
                trained_on, weights, batch.group_ids, cfg.grpo.combine, cfg.grpo.std_mode,
                cfg.grpo.adv_clip, cfg.grpo.adv_eps,
            )
            train_now = adv.keep.any() and not cfg.grpo.frozen  # a frozen control never moves
            metrics = update_step(pipe, cfg, batch, adv, negative, optimizer, params) if train_now else {}
            t3 = time.perf_counter()
            cursor.observe(step, zip(batch.rollout.prompt_ids[::cfg.grpo.group_size].tolist(),
                                     group_spreads(adv.values, batch.group_ids).tolist(),
                                     strict=True))
            metrics.update(advantage_metrics(adv))
            for name, r in rewards.items():
                metrics[f"reward/{name}/mean"] = float(r.mean())
                metrics[f"reward/{name}/std"] = float(r.std(unbiased=False))
            write_samples(samples, step, batch.rollout, rewards, adv)
            metrics.update({
                "step": step,
                "timing/rollout_s": t1 - t0, "timing/score_s": t2 - t1, "timing/update_s": t3 - t2,
                "rollout/samples_per_s": len(batch.group_ids) / (t3 - t0),
            })
            log.write(json.dumps(metrics) + "\n")
            log.flush()
            main = next(iter(rewards))
            print(f"step {step:4d}  {main} {metrics[f'reward/{main}/mean']:+.4f}  "
                  f"loss {metrics.get('loss/total', float('nan')):+.5f}  "
                  f"kl {metrics.get('loss/kl', 0.0):.2e}  {metrics['rollout/samples_per_s']:.1f} samples/s",
                  flush=True)
    save_lora(pipe, run_dir / "lora")
    return run_dir


def write_samples(log, step: int, rollout: Rollout, rewards: dict[str, torch.Tensor], adv) -> None:
    """One samples.jsonl line per sample, with the keys ``learner.main`` writes."""
    for i, (pid, seed) in enumerate(zip(rollout.prompt_ids.tolist(), rollout.seeds.tolist(),
                                        strict=True)):
        row = {"step": step, "prompt_id": pid, "seed": seed, "sample_version": step,
               "advantage": float(adv.values[i]), "kept": bool(adv.keep[i])}
        row.update({f"reward/{k}": float(v[i]) for k, v in rewards.items()})
        log.write(json.dumps(row) + "\n")
    log.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML preset (default: {DEFAULT_CONFIG})")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="dotted override, e.g. train.steps=5")
    parser.add_argument("--run-dir", type=Path, help="where to write (default: runs/<time>)")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    run_dir = train(cfg, args.run_dir)
    print(f"run directory: {run_dir}")


if __name__ == "__main__":
    main()
