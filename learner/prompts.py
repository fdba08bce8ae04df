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
    """Walks a prompt list in seeded order; its whole state is one int, ``position``.

    ``take(n)`` returns ``(index, row)`` pairs; the index is the row's position in the
    file, which is what seeds and group ids are derived from.

    ``mix="file"``: a fresh seeded permutation of the file per epoch, so each tag comes
    as often as the file holds it. ``mix="balanced"``: rounds of one prompt of each tag
    (``row["tag"]``, in a seeded order per round), each tag walking its own prompts in
    a seeded permutation per pass, so every tag is trained as often whatever the file's
    mix (the shapes train split is 81 % color_attr).
    """

    def __init__(self, rows: list[dict], seed: int, position: int = 0,
                 mix: str = "file") -> None:
        if mix not in ("file", "balanced"):
            raise ValueError(f"prompt mix must be 'file' or 'balanced', got {mix!r}")
        self.rows, self.seed, self.position, self.mix = rows, seed, position, mix
        by_tag: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            by_tag.setdefault(str(row.get("tag", "")), []).append(i)
        self.tags = sorted(by_tag)
        self.by_tag = [by_tag[t] for t in self.tags]

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))

    def _index(self, position: int) -> int:
        if self.mix == "file":
            epoch, offset = divmod(position, len(self.rows))
            return int(self._order(epoch)[offset])
        rnd, slot = divmod(position, len(self.tags))
        tag = int(np.random.default_rng([self.seed, 1, rnd]).permutation(len(self.tags))[slot])
        prompts = self.by_tag[tag]
        passes, offset = divmod(rnd, len(prompts))  # the tag's rnd-th prompt
        order = np.random.default_rng([self.seed, 2, tag, passes]).permutation(len(prompts))
        return prompts[int(order[offset])]

    def take(self, n: int) -> list[tuple[int, dict]]:
        out = []
        for _ in range(n):
            index = self._index(self.position)
            out.append((index, self.rows[index]))
            self.position += 1
        return out
