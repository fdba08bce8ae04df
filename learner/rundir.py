"""What a run writes to its directory: samples.jsonl rows and checkpoints.

Checkpoints are written to a temporary directory and renamed into place, so a crash
never leaves a half-written one; ``lora/`` at the top of the run dir is the latest LoRA.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from learner.prompts import PromptCursor
from learner.service import Service, StepWork
from policy.pipeline import save_lora_state


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


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = sorted(p for p in (run_dir / "checkpoints").glob("step_*") if not p.name.endswith(".tmp"))
    return done[-1] if done else None
