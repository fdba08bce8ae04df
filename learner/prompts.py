"""Prompt datasets: GenEval-style metadata rows read from jsonl, served in seeded order."""

from __future__ import annotations

import codecs
import json
from pathlib import Path

import numpy as np


def read_utf8(path: str | Path) -> str:
    """The text of ``path``, or a ValueError naming ``path:line:column`` of the first byte
    that is not UTF-8: a bare UnicodeDecodeError gives a byte offset nobody can find.

    A UTF-8 byte-order mark at the start is dropped (editors on Windows write one).
    """
    path = Path(path)
    data = path.read_bytes()
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        bad = start + e.start
        line_start = data.rfind(b"\n", 0, bad) + 1
        line = data.count(b"\n", 0, bad) + 1
        column = len(data[max(line_start, start):bad].decode("utf-8")) + 1
        raise ValueError(f"{path}:{line}:{column}: not UTF-8 (byte 0x{data[bad]:02x}); "
                         "save the file as UTF-8") from None


def load_prompts(path: str | Path, *, field: str = "train.prompts") -> list[dict]:
    """Read a jsonl file of metadata rows, each with at least a ``"prompt"`` string.

    Every problem is a FileNotFoundError or ValueError whose message starts with
    ``path:line:`` (``field`` names the config field that points here), so the run can
    fail before it starts with one line that says where to look.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "not found"
        raise FileNotFoundError(f"prompt file {path} {what} (set {field} to a jsonl file)")
    rows = []
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other characters
    # that splitlines() breaks on, which would cut a row in two and shift every line number.
    for n, line in enumerate(read_utf8(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f"{path}:{n}: each line must be an object with a 'prompt' string")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: prompt file holds no prompts (set {field} to a jsonl file "
                         "with one {\"prompt\": ...} object per line)")
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
