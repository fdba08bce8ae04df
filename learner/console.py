"""What a run prints: quiet actors, one progress bar, and a summary at the end.

By default the actors' library chatter is silenced: the per-actor "Loading pipeline
components" bars (diffusers, through huggingface_hub's progress-bar switch), the
transformers advisory about torchvision that every process repeats, DeepSpeed's "no GPU
found, setting accelerator to CPU" warning (the accelerator is named instead, when the
model runs on the CPU) and the Python warnings libraries raise at import. ``--verbose``
(``learner.main``) leaves all of it on. Errors are never silenced.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # diffusers' and huggingface_hub's loading bars
    "DIFFUSERS_VERBOSITY": "error",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "PYTHONWARNINGS": "ignore",
}


def quiet_env(device: str) -> dict[str, str]:
    """Environment variables that silence the libraries in every process of a run."""
    env = dict(QUIET_ENV)
    if device == "cpu":  # named, so DeepSpeed does not warn that it found no GPU
        env["DS_ACCELERATOR"] = "cpu"
    return env


def quiet_this_process(device: str) -> None:
    """The driver's share: the same variables (for libraries imported later) and the
    loggers of the libraries already imported."""
    for key, value in quiet_env(device).items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("diffusers", "transformers", "DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill: not a step
            continue
    return out


def summary(run_dir: Path, total_steps: int) -> list[str]:
    """The closing lines: what ran, what the rewards did, where everything is."""
    metrics = _lines(run_dir / "metrics.jsonl")
    out = [f"run directory: {run_dir}"]
    if metrics:
        first, last = metrics[0], metrics[-1]
        out.append(f"steps: {last['step'] + 1} of {total_steps}, "
                   f"{sum(m.get('rollout/samples', 0) for m in metrics)} samples")
        rewards = sorted({k.split("/")[1] for k in last if k.startswith("reward/")
                          and k.endswith("/mean") and k.count("/") == 2})
        for name in rewards:
            key = f"reward/{name}/mean"
            if key in first:
                out.append(f"reward {name} (training batch mean; prompts differ per step): "
                           f"step {first['step']} {first[key]:+.4f} -> step {last['step']} "
                           f"{last[key]:+.4f}")
    evals = _lines(run_dir / "evals.jsonl")
    if evals:
        e = evals[-1]
        from learner.evaluation import headline  # (shapes and plots: imported when used)

        shown = headline(e)
        out.append(f"last evaluation (version {e.get('version')}): "
                   + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
    for label, name in (("LoRA", "lora"), ("EMA LoRA", "lora_ema"), ("sample grids", "grids"),
                        ("TensorBoard", "tensorboard"), ("evaluation plot", "eval.png"),
                        ("training plot", "training.png")):
        if (run_dir / name).exists():
            out.append(f"{label}: {run_dir / name}")
    if (run_dir / "tensorboard").exists():
        out.append(f"  tensorboard --logdir {run_dir / 'tensorboard'}")
    out.append(f"continue: python -m learner.main --resume {run_dir} "
               f"--set train.steps={total_steps + max(1, total_steps // 2)}")
    return out
