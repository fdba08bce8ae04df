"""Prompt files (learner.prompts.load_prompts: text, GenEval jsonl, plain jsonl) and prompt
order (PromptCursor: seeded, resumable, optionally tag-balanced)."""

import json
from collections import Counter

import numpy as np
import pytest

from learner.prompts import PromptCursor, load_prompts

TRAIN = "shapes/data/train.jsonl"


def test_file_mix_walks_a_seeded_permutation_per_epoch():
    rows = load_prompts(TRAIN)
    got = [i for i, _ in PromptCursor(rows, seed=4).take(len(rows) + 3)]
    first = np.random.default_rng([4, 0]).permutation(len(rows)).tolist()
    second = np.random.default_rng([4, 1]).permutation(len(rows)).tolist()
    assert got == first + second[:3]


def test_balanced_mix_draws_every_tag_equally_whatever_the_file_holds():
    rows = load_prompts(TRAIN)
    assert Counter(r["tag"] for r in rows)["color_attr"] / len(rows) > 0.8  # the file's skew
    picks = PromptCursor(rows, seed=0, mix="balanced").take(6 * 50)
    counts = Counter(row["tag"] for _, row in picks)
    assert set(counts.values()) == {50} and len(counts) == 6
    # within a tag, every prompt once before any twice (single_object has 2 in train)
    single = [i for i, row in picks if row["tag"] == "single_object"][:4]
    assert len(set(single[:2])) == 2 and sorted(single[:2]) == sorted(single[2:])


def test_a_cursor_resumed_at_its_position_continues_the_same_order():
    rows = load_prompts(TRAIN)
    for mix in ("file", "balanced"):
        whole = PromptCursor(rows, seed=2, mix=mix).take(40)
        head = PromptCursor(rows, seed=2, mix=mix)
        head.take(17)
        rest = PromptCursor(rows, seed=2, position=head.position, mix=mix).take(23)
        assert [i for i, _ in whole[17:]] == [i for i, _ in rest]


# -- file formats (learner.prompts.load_prompts) -------------------------------------------

def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def test_a_text_file_is_one_prompt_per_line_without_blanks_or_comments(tmp_path):
    path = write(tmp_path / "p.txt", "# a comment\n a red fox in snow \n\n  # indented comment\n"
                                     "a city at night\r\nno trailing newline")
    assert load_prompts(path) == [{"prompt": "a red fox in snow"}, {"prompt": "a city at night"},
                                  {"prompt": "no trailing newline"}]


def test_a_text_file_of_json_stays_text(tmp_path):
    # the extension decides: a JSON-looking line of a .txt file is a prompt, not a row
    line = '{"prompt": "x", "include": []}'
    assert load_prompts(write(tmp_path / "p.txt", line + "\n")) == [{"prompt": line}]


def test_geneval_metadata_loads_whole_rows():
    rows = load_prompts("shapes/data/test.jsonl")
    assert len(rows) == 98 and {"prompt", "tag", "include"} <= set(rows[0])
    position = next(r for r in rows if r["tag"] == "position")
    assert position["include"][1]["position"][1] == 0


def test_plain_jsonl_rows_need_only_a_prompt_and_keep_their_fields(tmp_path):
    rows = [{"prompt": "a cat", "style": "watercolor"}, {"prompt": "a dog"}]
    for suffix in (".jsonl", ".json", ".ndjson", ".JSONL"):
        path = write(tmp_path / f"p{suffix}", "".join(json.dumps(r) + "\n" for r in rows))
        assert load_prompts(path) == rows


def test_an_unknown_extension_names_the_formats(tmp_path):
    with pytest.raises(ValueError, match=r"p\.csv: unknown prompt file format '\.csv'.*\.txt.*"
                                         r"\.jsonl"):
        load_prompts(write(tmp_path / "p.csv", "a cat\n"), field="eval.prompts")


def test_an_empty_text_file_holds_no_prompts(tmp_path):
    with pytest.raises(ValueError, match=r"p\.txt: prompt file holds no prompts"):
        load_prompts(write(tmp_path / "p.txt", "# only a comment\n\n"))


GOOD = json.dumps({"tag": "single_object", "include": [{"class": "dog", "count": 1}],
                   "prompt": "a photo of a dog"})


def row(**fields) -> str:
    return json.dumps({"tag": "two_object", "prompt": "a photo of a cat", **fields})


@pytest.mark.parametrize(
    "bad, what",
    [
        ('{"prompt": "a cat",', "not valid JSON"),
        ('["a cat"]', "'prompt' string (got a JSON list)"),
        ('{"text": "a cat"}', "'prompt' string (got no 'prompt')"),
        ('{"prompt": 3}', "'prompt' string (got 'prompt': 3)"),
        (row(include=[{"class": "cat"}]), "include[0] 'count' must be an integer >= 1"),
        (row(include=[{"class": "cat", "count": 0}]), "include[0] 'count' must be an integer"),
        (row(include=[{"class": "cat", "count": 1.5}]), "'count' must be an integer"),
        (row(include=[{"class": "cat", "count": True}]), "'count' must be an integer"),
        (row(include=[{"class": "cat", "count": 1}, {"count": 1}]), "include[1] has no 'class'"),
        (row(include=[{"class": 7, "count": 1}]), "include[0] has no 'class' string"),
        (row(include=["cat"]), "include[0] is 'cat'"),
        (row(include=[]), "'include' must be a non-empty list"),
        (row(include={"class": "cat", "count": 1}), "'include' must be a non-empty list"),
        (row(include=[{"class": "cat", "count": 1}], exclude=[{"class": "cat"}]),
         "exclude[0] 'count' must be an integer"),
        (row(include=[{"class": "cat", "count": 1, "color": 3}]), "'color' must be a string"),
        (row(include=[{"class": "cat", "count": 1, "position": ["left of", 0]}]),
         "include[0] 'position' must be [relation, index of an earlier include clause]"),
        (row(tag=5, include=[{"class": "cat", "count": 1}]), "'tag' must be a string"),
    ],
    ids=["json", "list", "no-prompt", "prompt-number", "no-count", "count-0", "count-float",
         "count-bool", "no-class", "class-number", "item-string", "include-empty",
         "include-object", "exclude", "color", "position-self", "tag"],
)
def test_a_malformed_row_names_file_line_and_what_was_expected(tmp_path, bad, what):
    path = write(tmp_path / "p.jsonl", f"{GOOD}\n\n{bad}\n{GOOD}\n")
    with pytest.raises(ValueError) as e:
        load_prompts(path)
    assert str(e.value).startswith(f"{path}:3: ") and what in str(e.value), str(e.value)


def test_a_position_may_name_an_earlier_include_clause(tmp_path):
    good = row(tag="position", include=[{"class": "cat", "count": 1},
                                        {"class": "dog", "count": 1, "position": ["above", 0]}])
    assert load_prompts(write(tmp_path / "p.jsonl", good + "\n"))[0]["tag"] == "position"


def test_train_tags_keep_only_their_rows_and_an_unknown_tag_is_named():
    from learner.prompts import select_tags

    rows = [{"prompt": "a", "tag": "colors"}, {"prompt": "b", "tag": "counting"},
            {"prompt": "c", "tag": "colors"}]
    assert select_tags(rows, None) is rows
    assert [r["prompt"] for r in select_tags(rows, ["colors"])] == ["a", "c"]
    with pytest.raises(ValueError, match=r"no rows tagged \['position'\].*\['colors', 'counting'\]"):
        select_tags(rows, ["colors", "position"], "p.jsonl")
