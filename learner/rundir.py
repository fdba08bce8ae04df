"""What a run writes to its directory: samples.jsonl rows and checkpoints.

Checkpoints are written to a temporary directory and renamed into place, so a crash
never leaves a half-written one; ``lora/`` at the top of the run dir is the latest LoRA.

A checkpoint records how long each log file (:data:`LOGS`) was when it was taken. A
resumed run cuts the logs back to those lengths before it appends (:func:`restore_logs`),
so lines written after the checkpoint (the steps a killed run did not checkpoint, a
half-written last line) are dropped and written again by the resumed run, exactly once.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from learner.ema import WeightsEMA
from learner.evaluation import headline
from learner.service import Service, StepWork
from policy.pipeline import save_lora_state
from policy.weights import unflatten_weights


def write_samples(log, work: StepWork, rewards: dict[str, np.ndarray], adv, trained_at: int,
                  missing: tuple[str, ...] = ()):
    """One line per sample: its prompt, who made it, with which version, what it scored.

    ``sample_version`` is the version the step was launched with; it is the rollout's own,
    since a reward worker refuses weights of any other version than the rollout's.
    Rewards in ``missing`` (dropped, so not used for this step) are written as null.
    """
    n = 0
    first = next(iter(work.scores))  # every reward scores the same samples, in order
    text = {index: prompt for groups in work.groups for index, prompt in groups}
    for call in range(len(work.refs)):
        sc = work.scores[first][call]
        for i, (prompt_id, seed) in enumerate(sc.sample_keys):
            row = {"step": work.step, "prompt_id": prompt_id, "prompt": text.get(prompt_id),
                   "seed": seed,
                   "sample_version": work.version, "score_version": sc.weight_version,
                   "trained_at_version": trained_at, "kept": bool(adv.keep[n + i])}
            value = adv.values[n + i]
            if value.ndim:  # grpo.credit per_step: one advantage per trained step
                row["advantage"] = float(value.mean())
                row["step_advantages"] = [round(float(a), 6) for a in value]
            else:
                row["advantage"] = float(value)
            row.update({f"reward/{k}": float(v[n + i]) for k, v in rewards.items()})
            row.update({f"reward/{k}": None for k in missing})
            log.write(json.dumps(row) + "\n")
        n += len(sc.sample_keys)


LOGS = ("metrics.jsonl", "samples.jsonl", "evals.jsonl", "eval_samples.jsonl")


def log_sizes(run_dir: Path) -> dict[str, int]:
    """Bytes in each log file now (0 for one not written yet)."""
    return {name: (run_dir / name).stat().st_size if (run_dir / name).exists() else 0
            for name in LOGS}


def restore_logs(run_dir: Path, sizes: dict[str, int] | None) -> None:
    """Cut each log back to its length in ``sizes`` (a checkpoint's); None: start afresh."""
    for name in LOGS:
        path = run_dir / name
        if sizes is None:
            path.unlink(missing_ok=True)
        elif path.exists() and path.stat().st_size > sizes.get(name, 0):
            with open(path, "r+b") as f:
                f.truncate(sizes.get(name, 0))


def save_checkpoint(run_dir: Path, service: Service, position: dict, step: int,
                    logs: dict[str, int] | None = None, stale: dict | None = None,
                    ema: WeightsEMA | None = None) -> Path:
    """``checkpoints/step_N`` after ``step`` steps: LoRA (diffusers format), optimizer
    states, loop state.

    The loop state: ``position``, the prompt cursor's state before step ``step``'s
    prompts (``PromptCursor.state_dict``);
    ``logs``, the log files' lengths (:func:`log_sizes`); ``stale``, the flat weights of
    the older versions that steps ``step..`` were sampled with (``max_staleness >= 1``),
    so that a resumed run samples them as the uninterrupted run did.
    With ``ema``, the averaged LoRA is saved beside it as ``lora_ema/`` (and its state in
    trainer.pt). Each LoRA directory has a model card (README.md).
    Written to a temporary directory and renamed into place, so a crash never leaves a
    half-written checkpoint; ``lora/`` (and ``lora_ema/``) at the top of the run dir is the
    latest.
    """
    state = service.learner.state_dict()
    final = run_dir / "checkpoints" / f"step_{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    spec = service.cfg.lora.spec(service.cfg.seed)
    card = model_card(run_dir, service.cfg, step)
    save_lora_state(state["lora"], spec, tmp / "lora")
    (tmp / "lora" / "README.md").write_text(card)
    if ema is not None:
        save_lora_state(unflatten_weights(ema.flat()), spec, tmp / "lora_ema")
        (tmp / "lora_ema" / "README.md").write_text(
            card.replace("# LoRA", f"# EMA LoRA (decay {ema.decay:g})", 1))
    torch.save({"learner": state, "step": step, "cursor": position, "logs": logs,
                "stale_weights": stale or {}, "ema": ema.state_dict() if ema else None},
               tmp / "trainer.pt")
    if final.exists():  # a resumed run re-saving a step
        shutil.rmtree(final)
    os.replace(tmp, final)
    for name in ("lora", "lora_ema"):
        latest = run_dir / name
        if (final / name).exists():
            shutil.rmtree(latest, ignore_errors=True)
            shutil.copytree(final / name, latest)
    return final


def model_card(run_dir: Path, cfg, step: int) -> str:
    """README.md of a saved LoRA: what it was trained from, how, and what it scored."""
    metrics = _last_json(run_dir / "metrics.jsonl")
    evaluation = _last_json(run_dir / "evals.jsonl")
    rewards = ([f"self_confidence (weight {cfg.self_confidence.weight:g})"]
               if cfg.self_confidence.enabled else [])
    rewards += [f"{e.name} (weight {e.weight:g}, {e.kind} {e.target or e.url})"
                for e in cfg.external_rewards]
    lines = [
        "# LoRA trained with solace-rl", "",
        f"* base model: `{cfg.model.path}`",
        f"* LoRA: rank {cfg.lora.rank}, alpha {cfg.lora.alpha}",
        f"* steps: {step} of {cfg.train.steps}, {cfg.grpo.prompts_per_step} prompts x "
        f"{cfg.grpo.group_size} samples a step, lr {cfg.grpo.lr:g}, beta {cfg.grpo.beta:g}, "
        f"max_staleness {cfg.learner.max_staleness}, seed {cfg.seed}",
        f"* prompts: `{cfg.train.prompts}`",
        f"* rewards: {', '.join(rewards) or 'none'}",
        "* configuration: `config.yaml` of the run directory",
    ]
    if metrics:
        means = {k.split("/")[1]: v for k, v in metrics.items()
                 if k.startswith("reward/") and k.endswith("/mean") and k.count("/") == 2}
        lines.append(f"* last step ({metrics.get('step')}) batch-mean rewards: "
                     + ", ".join(f"{k} {v:+.4f}" for k, v in means.items()))
    if evaluation:
        shown = headline(evaluation)
        lines.append(f"* held-out evaluation at version {evaluation.get('version')}: "
                     + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
    lines += ["", "Load it with diffusers:", "", "```python",
              "from diffusers import StableDiffusion3Pipeline",
              f'pipe = StableDiffusion3Pipeline.from_pretrained("{cfg.model.path}")',
              'pipe.load_lora_weights("path/to/this/directory")', "```", ""]
    return "\n".join(lines)


def _last_json(path: Path) -> dict | None:
    """The last complete line of a jsonl log (None if there is none)."""
    if not path.exists():
        return None
    for line in reversed(path.read_text().splitlines()):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return None


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = sorted(p for p in (run_dir / "checkpoints").glob("step_*") if not p.name.endswith(".tmp"))
    return done[-1] if done else None
