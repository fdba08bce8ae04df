"""Vocabulary, GenEval-format prompts and metadata, and the train/test/unseen splits.

Follows GenEval's `prompts/create_prompts.py`; the deviations from GenEval are listed
in `shapes.world`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CLASSES = ("circle", "square", "triangle", "star")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
COUNTING_RANGE = (2, 4)  # GenEval: rng.integers(2, max_count=4, endpoint=True)

# One pair per class, four distinct colours: every class and colour still appears
# in pretraining, only these combinations do not.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("orange", "circle"),
    ("purple", "square"),
    ("yellow", "triangle"),
    ("blue", "star"),
)

SPLIT_SEED = 43  # GenEval's default prompt seed
TEST_PER_TAG = 50
UNSEEN_PER_TAG = 50
DATA_DIR = Path(__file__).parent / "data"


# ---------------------------------------------------------------- prompts


def with_article(word: str) -> str:
    """'a circle', 'an orange circle' (GenEval's rule: vowel -> 'an')."""
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def plural(name: str) -> str:
    """GenEval's plural: add 'es' after an 's', else 's'."""
    return f"{name}es" if name.endswith("s") else f"{name}s"


def noun(cls: str, color: str | None = None) -> str:
    """One object: 'a square', 'an orange circle'."""
    return with_article(f"{color} {cls}" if color else cls)


# GenEval's row of each tag. ``noun`` and ``plural`` give the wording, so that another
# vocabulary (learner.prompt_sets' COCO classes) writes the same rows in its own words.


def single_object(cls: str, noun=noun, plural=plural) -> dict:
    """'a photo of a square'."""
    return {"tag": "single_object", "include": [{"class": cls, "count": 1}],
            "prompt": f"a photo of {noun(cls)}"}


def two_object(cls_a: str, cls_b: str, noun=noun, plural=plural) -> dict:
    """'a photo of a circle and a star'."""
    return {"tag": "two_object",
            "include": [{"class": cls_a, "count": 1}, {"class": cls_b, "count": 1}],
            "prompt": f"a photo of {noun(cls_a)} and {noun(cls_b)}"}


def counting(cls: str, n: int, noun=noun, plural=plural) -> dict:
    """'a photo of three triangles'; the exclude clause makes the count exact."""
    return {"tag": "counting", "include": [{"class": cls, "count": n}],
            "exclude": [{"class": cls, "count": n + 1}],
            "prompt": f"a photo of {NUMBERS[n]} {plural(cls)}"}


def colors(color: str, cls: str, noun=noun, plural=plural) -> dict:
    """'a photo of a red circle'."""
    return {"tag": "colors", "include": [{"class": cls, "count": 1, "color": color}],
            "prompt": f"a photo of {noun(cls, color)}"}


def position(cls_a: str, relation: str, cls_b: str, noun=noun, plural=plural) -> dict:
    """'a photo of a circle left of a square': include[1] (A) is <relation> include[0] (B)."""
    return {"tag": "position",
            "include": [{"class": cls_b, "count": 1},
                        {"class": cls_a, "count": 1, "position": [relation, 0]}],
            "prompt": f"a photo of {noun(cls_a)} {relation} {noun(cls_b)}"}


def color_attr(color_a: str, cls_a: str, color_b: str, cls_b: str, noun=noun,
               plural=plural) -> dict:
    """'a photo of a red circle and a blue square'."""
    return {"tag": "color_attr",
            "include": [{"class": cls_a, "count": 1, "color": color_a},
                        {"class": cls_b, "count": 1, "color": color_b}],
            "prompt": f"a photo of {noun(cls_a, color_a)} and {noun(cls_b, color_b)}"}


def enumerate_prompts(tag: str) -> list[dict]:
    """Every prompt of a tag, in a fixed order (GenEval's constraints: distinct classes
    in two-object tags, distinct colours in color_attr, counts 2-4)."""
    pairs = [(a, b) for a in CLASSES for b in CLASSES if a != b]
    if tag == "single_object":
        return [single_object(c) for c in CLASSES]
    if tag == "two_object":
        return [two_object(a, b) for a, b in pairs]
    if tag == "counting":
        lo, hi = COUNTING_RANGE
        return [counting(c, n) for c in CLASSES for n in range(lo, hi + 1)]
    if tag == "colors":
        return [colors(col, c) for c in CLASSES for col in COLORS]
    if tag == "position":
        return [position(a, rel, b) for a, b in pairs for rel in RELATIONS]
    if tag == "color_attr":
        return [color_attr(ca, a, cb, b) for a, b in pairs
                for ca in COLORS for cb in COLORS if ca != cb]
    raise ValueError(f"unknown tag {tag!r}; expected one of {TAGS}")


def color_class_pairs(metadata: dict) -> set[tuple[str, str]]:
    """The (colour, class) pairs a prompt names explicitly."""
    return {(c["color"], c["class"]) for c in metadata["include"] if "color" in c}


def uses_held_out(metadata: dict) -> bool:
    """True if the prompt names a (colour, class) pair never seen in pretraining."""
    return bool(color_class_pairs(metadata) & set(HELD_OUT_PAIRS))


def allowed_colors(cls: str) -> list[str]:
    """Colours the renderer may pick for an uncoloured `cls` (never a held-out pair)."""
    return [c for c in COLORS if (c, cls) not in HELD_OUT_PAIRS]


def pretraining_metadata(rng: np.random.Generator, tag_weights: dict[str, float] | None = None) -> dict:
    """A random scene for pretraining: a tag (uniform, or in proportion to ``tag_weights``),
    then a uniform prompt of that tag that names no held-out pair (the renderer keeps
    uncoloured objects off them too)."""
    if tag_weights:
        p = np.array([tag_weights.get(t, 0.0) for t in TAGS], dtype=float)
        tag = TAGS[rng.choice(len(TAGS), p=p / p.sum())]
    else:
        tag = TAGS[rng.integers(len(TAGS))]
    prompts = [m for m in enumerate_prompts(tag) if not uses_held_out(m)]
    return prompts[rng.integers(len(prompts))]


def make_splits(seed: int = SPLIT_SEED) -> dict[str, list[dict]]:
    """train / test / unseen prompt lists.

    Per tag, the prompts naming no held-out pair are shuffled; test takes
    min(TEST_PER_TAG, n // 2) and train the rest, so their prompt strings are
    disjoint. unseen takes up to UNSEEN_PER_TAG prompts naming a held-out pair
    (only colors and color_attr can).
    """
    rng = np.random.default_rng(seed)
    splits: dict[str, list[dict]] = {"train": [], "test": [], "unseen": []}
    for tag in TAGS:
        prompts = enumerate_prompts(tag)
        seen = [prompts[i] for i in rng.permutation(len(prompts)) if not uses_held_out(prompts[i])]
        held = [prompts[i] for i in rng.permutation(len(prompts)) if uses_held_out(prompts[i])]
        n_test = min(TEST_PER_TAG, len(seen) // 2)
        splits["test"] += seen[:n_test]
        splits["train"] += seen[n_test:]
        splits["unseen"] += held[:UNSEEN_PER_TAG]
    return splits


def write_splits(out_dir: Path = DATA_DIR, seed: int = SPLIT_SEED) -> dict[str, int]:
    """Write `{train,test,unseen}.jsonl` (one GenEval metadata dict per line)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name, prompts in make_splits(seed).items():
        lines = "".join(json.dumps(m) + "\n" for m in prompts)
        (out_dir / f"{name}.jsonl").write_text(lines)
        sizes[name] = len(prompts)
    return sizes


def load_split(name: str, data_dir: Path = DATA_DIR) -> list[dict]:
    """Read one split written by `write_splits`."""
    path = data_dir / f"{name}.jsonl"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} missing; run `python -m shapes.world --write-splits`")
    return [json.loads(line) for line in path.read_text().splitlines() if line]
