"""Prompt datasets: GenEval-style metadata rows read from jsonl, served in seeded order."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def load_prompts(path: str | Path) -> list[dict]:
    """Read a jsonl file of metadata rows, each with at least a ``"prompt"`` string."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} not found (set train.prompts to a jsonl file)")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f"{path}:{n}: each line must be an object with a 'prompt' string")
        rows.append(row)
    if not rows:
        raise ValueError(f"prompt file {path} holds no prompts")
    return rows


class PromptCursor:
    """Walks a prompt list in a fresh seeded permutation per epoch; its state is one int.

    ``take(n)`` returns ``(index, row)`` pairs; the index is the row's position in the
    file, which is what seeds and group ids are derived from.
    """

    def __init__(self, rows: list[dict], seed: int, position: int = 0) -> None:
        self.rows, self.seed, self.position = rows, seed, position

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))

    def take(self, n: int) -> list[tuple[int, dict]]:
        out = []
        for _ in range(n):
            epoch, offset = divmod(self.position, len(self.rows))
            index = int(self._order(epoch)[offset])
            out.append((index, self.rows[index]))
            self.position += 1
        return out
