"""Prompt datasets: text or jsonl files read into metadata rows, served in seeded order."""

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


TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


def load_prompts(path: str | Path, *, field: str = "train.prompts") -> list[dict]:
    """Read a prompt file into metadata rows, each with at least a ``"prompt"`` string.

    The format is decided by the file's extension, never guessed from its content:

    * ``.txt``: one prompt per line; blank lines and lines starting with ``#`` are skipped;
      each line becomes ``{"prompt": line}`` (surrounding whitespace dropped). For rewards
      that need only the text (PickScore, aesthetic).
    * ``.jsonl`` / ``.json`` / ``.ndjson``: JSON lines, one object per line with a
      ``"prompt"`` string; other fields are kept (the reward scorers get the whole row).
      GenEval metadata rows (``tag``, ``include``, ``exclude``) are such rows, and their
      clauses are checked (:func:`geneval_problem`), so that a grader does not fail on
      them mid-run.

    Every problem is a FileNotFoundError or ValueError whose message starts with
    ``path:line:`` (``field`` names the config field that points here), so the run can
    fail before it starts with one line that says where to look.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "not found"
        raise FileNotFoundError(f"prompt file {path} {what} (set {field} to a .jsonl or .txt "
                                "prompt file)")
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        rows = _text_rows(path)
    elif suffix in JSONL_SUFFIXES:
        rows = _jsonl_rows(path)
    else:
        kind = repr(suffix) if suffix else "(no extension)"
        raise ValueError(f"{path}: unknown prompt file format {kind}; "
                         f"expected {' / '.join(TEXT_SUFFIXES)} (one prompt per line) or "
                         f"{' / '.join(JSONL_SUFFIXES)} (one JSON object per line); rename "
                         f"the file or set {field} to one that is")
    if not rows:
        raise ValueError(f"{path}: prompt file holds no prompts (set {field} to a .txt file "
                         "with one prompt per line, or a jsonl file with one "
                         "{\"prompt\": ...} object per line)")
    return rows


def _lines(path: Path) -> list[str]:
    """The file's lines, numbered from 1 by their place in the list + 1.

    split("\n"), not splitlines(): JSON strings may hold U+2028 and other characters that
    splitlines() breaks on, which would cut a row in two and shift every line number.
    """
    return read_utf8(path).split("\n")


def _text_rows(path: Path) -> list[dict]:
    """``{"prompt": line}`` for every line that is neither blank nor a ``#`` comment."""
    rows = []
    for line in _lines(path):
        text = line.strip()
        if text and not text.startswith("#"):
            rows.append({"prompt": text})
    return rows


def _jsonl_rows(path: Path) -> list[dict]:
    """One object per non-blank line, each with a ``prompt`` string and valid GenEval
    clauses where it has them."""
    rows = []
    for n, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno}); "
                             "expected one JSON object per line") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            got = (f"a JSON {type(row).__name__}" if not isinstance(row, dict)
                   else "no 'prompt'" if "prompt" not in row else f"'prompt': {row['prompt']!r}")
            raise ValueError(f"{path}:{n}: each line must be an object with a 'prompt' string "
                             f"(got {got})")
        problem = geneval_problem(row)
        if problem:
            raise ValueError(f"{path}:{n}: {problem}")
        rows.append(row)
    return rows


def geneval_problem(row: dict) -> str | None:
    """What is wrong with a row's GenEval metadata, or None (also for rows without any).

    GenEval's grader reads ``include``/``exclude`` as lists of ``{"class": str, "count":
    int >= 1}`` clauses, an include clause optionally with a ``"color"`` string and a
    ``"position": [relation, index]`` naming an earlier include clause. A row that breaks
    this would crash the grader, or score 0 silently, only when it is drawn; here it is
    refused at load time.
    """
    if "tag" in row and not isinstance(row["tag"], str):
        return f"'tag' must be a string, got {row['tag']!r}"
    for key in ("include", "exclude"):
        if key not in row:
            continue
        clauses = row[key]
        if not isinstance(clauses, list) or (key == "include" and not clauses):
            return f"{key!r} must be a {'non-empty ' if key == 'include' else ''}list of " \
                   f"{{\"class\": str, \"count\": int}} objects, got {clauses!r}"
        for i, clause in enumerate(clauses):
            problem = _clause_problem(clause, i, is_include=key == "include")
            if problem:
                return f"{key}[{i}] {problem}"
    return None


def _clause_problem(clause: object, index: int, *, is_include: bool) -> str | None:
    """What is wrong with one include/exclude clause, or None."""
    expected = 'expected {"class": str, "count": int >= 1}'
    if not isinstance(clause, dict):
        return f"is {clause!r}; {expected}"
    if not isinstance(clause.get("class"), str) or not clause["class"]:
        return f"has no 'class' string ({clause!r}); {expected}"
    count = clause.get("count")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        return f"'count' must be an integer >= 1, got {count!r} ({clause!r}); {expected}"
    if "color" in clause and not isinstance(clause["color"], str):
        return f"'color' must be a string, got {clause['color']!r}"
    if "position" in clause:
        if not is_include:
            return "has a 'position'; only include clauses may"
        position = clause["position"]
        if (not isinstance(position, list) or len(position) != 2
                or not isinstance(position[0], str) or isinstance(position[1], bool)
                or not isinstance(position[1], int) or not 0 <= position[1] < index):
            return (f"'position' must be [relation, index of an earlier include clause], "
                    f"got {position!r}")
    return None


def select_tags(rows: list[dict], tags: list[str] | None, path: str | Path = "",
                field: str = "train.tags") -> list[dict]:
    """The rows whose ``tag`` is one of ``tags`` (all rows when ``tags`` is None), in file
    order; a tag the file does not hold is an error naming the ones it does."""
    if tags is None:
        return rows
    held = sorted({str(r["tag"]) for r in rows if "tag" in r})
    unknown = [t for t in tags if t not in held]
    if unknown:
        raise ValueError(f"{field}: {path or 'the prompt file'} has no rows tagged {unknown}; "
                         f"its tags are {held or 'none (no tag field)'}")
    return [r for r in rows if r.get("tag") in tags]


class PromptCursor:
    """Walks a prompt list in seeded order.

    ``take(n, step)`` returns ``(index, row)`` pairs; the index is the row's position in
    the file, which is what seeds and group ids are derived from.

    ``mix="file"``: a fresh seeded permutation of the file per epoch, so each tag comes
    as often as the file holds it. ``mix="balanced"``: rounds of one prompt of each tag
    (``row["tag"]``, in a seeded order per round), each tag walking its own prompts in
    a seeded permutation per pass, so every tag is trained as often whatever the file's
    mix (the shapes train split is 81 % color_attr). ``mix="spread"``: the balanced
    rounds of tags, but within a tag each prompt drawn with probability proportional to
    its reward spread (``observe``: the mean within-group advantage std of its groups so
    far, plus ``floor``; a prompt not yet drawn counts as the tag's largest, at least 1,
    the std of a group with spread), so that
    groups whose samples all score alike, which carry no gradient, are drawn less.

    State: ``position`` (draws so far) and, for ``spread``, the observations by step.
    A draw for step ``s`` uses only the observations of steps before ``s - lag`` (with
    ``lag = learner.max_staleness``, exactly the steps whose rewards are in when step
    ``s`` is launched), so the draws do not depend on timing and a resumed run repeats
    them.
    """

    MIXES = ("file", "balanced", "spread")

    def __init__(self, rows: list[dict], seed: int, position: int = 0,
                 mix: str = "file", lag: int = 0, floor: float = 0.1) -> None:
        if mix not in self.MIXES:
            raise ValueError(f"prompt mix must be one of {self.MIXES}, got {mix!r}")
        self.rows, self.seed, self.position, self.mix = rows, seed, position, mix
        self.lag, self.floor = lag, floor
        self.spreads: dict[int, list[tuple[int, float]]] = {}  # step -> [(prompt, spread)]
        by_tag: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            by_tag.setdefault(str(row.get("tag", "")), []).append(i)
        self.tags = sorted(by_tag)
        self.by_tag = [by_tag[t] for t in self.tags]

    def observe(self, step: int, spreads: list[tuple[int, float]]) -> None:
        """Record step ``step``'s groups as ``(prompt index, within-group spread)``."""
        self.spreads[step] = [(int(i), float(v)) for i, v in spreads]

    def state_dict(self) -> dict:
        return {"position": self.position, "spreads": dict(self.spreads)}

    def load_state_dict(self, state: dict | int) -> None:
        """A checkpoint's state (an int: the position alone, as older checkpoints hold)."""
        if isinstance(state, int):
            state = {"position": state, "spreads": {}}
        self.position = state["position"]
        self.spreads = {int(k): list(v) for k, v in state["spreads"].items()}

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))

    def _index(self, position: int, step: int) -> int:
        if self.mix == "file":
            epoch, offset = divmod(position, len(self.rows))
            return int(self._order(epoch)[offset])
        rnd, slot = divmod(position, len(self.tags))
        tag = int(np.random.default_rng([self.seed, 1, rnd]).permutation(len(self.tags))[slot])
        prompts = self.by_tag[tag]
        if self.mix == "spread":
            weights = self._weights(prompts, step)
            pick = np.random.default_rng([self.seed, 4, position]).choice(
                len(prompts), p=weights / weights.sum())
            return prompts[int(pick)]
        passes, offset = divmod(rnd, len(prompts))  # the tag's rnd-th prompt
        order = np.random.default_rng([self.seed, 2, tag, passes]).permutation(len(prompts))
        return prompts[int(order[offset])]

    def _weights(self, prompts: list[int], step: int) -> np.ndarray:
        """Each prompt's mean observed spread (unseen: the tag's largest, at least 1) plus
        the floor."""
        seen: dict[int, list[float]] = {}
        for s, groups in self.spreads.items():
            if s < step - self.lag:
                for i, v in groups:
                    seen.setdefault(i, []).append(v)
        means = {i: float(np.mean(v)) for i, v in seen.items() if i in set(prompts)}
        unseen = max([1.0, *means.values()])  # optimistic: every prompt is tried
        return np.array([means.get(i, unseen) for i in prompts]) + self.floor

    def take(self, n: int, step: int = 0) -> list[tuple[int, dict]]:
        """The next ``n`` prompts, for training step ``step`` (used by the spread mix)."""
        out = []
        for _ in range(n):
            index = self._index(self.position, step)
            out.append((index, self.rows[index]))
            self.position += 1
        return out
