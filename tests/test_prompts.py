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


def test_spread_mix_draws_tags_in_turn_and_prompts_with_spread_more():
    rows = load_prompts(TRAIN)
    cursor = PromptCursor(rows, seed=0, mix="spread", floor=0.1)
    colors = [i for i, r in enumerate(rows) if r["tag"] == "colors"]
    flat, varied = colors[:5], colors[5:]
    # steps 0-9 observed: half the colour prompts' groups scored alike (spread 0)
    for step in range(10):
        cursor.observe(step, [(i, 0.0) for i in flat] + [(i, 1.0) for i in varied])
    picks = cursor.take(6 * 200, step=10)
    counts = Counter(row["tag"] for _, row in picks)
    assert set(counts.values()) == {200}  # tags stay balanced
    drawn = Counter(i for i, row in picks if row["tag"] == "colors")
    ratio = sum(drawn[i] for i in varied) / sum(drawn[i] for i in flat)
    assert 6 < ratio < 17  # weights (1 + 0.1) / (0 + 0.1) = 11
    # a prompt never drawn counts as its tag's largest spread: counting was never observed
    assert len({i for i, row in picks if row["tag"] == "counting"}) == 6


def test_spread_draws_see_only_steps_the_lag_has_scored_and_resume_exactly():
    rows = load_prompts(TRAIN)
    colors = [i for i, r in enumerate(rows) if r["tag"] == "colors"]

    def run(lag, stop_at=None):
        cursor, out = PromptCursor(rows, seed=3, mix="spread", lag=lag), []
        for step in range(12):
            if step == stop_at:  # a resumed run: a new cursor from the checkpointed state
                state = cursor.state_dict()
                cursor = PromptCursor(rows, seed=3, mix="spread", lag=lag)
                cursor.load_state_dict(state)
            out.append(cursor.take(6, step))
            cursor.observe(step, [(i, float(i in colors[:3])) for i, _ in out[-1]])
        return [[i for i, _ in picks] for picks in out]

    assert run(0) == run(0, stop_at=7) and run(1) == run(1, stop_at=5)
    assert run(0)[0] == run(1)[0]  # step 0: nothing scored yet
    # step 0 scored: a draw for step 1 sees it with lag 0, not with lag 1 (still in flight)
    for lag, seen in ((0, True), (1, False)):
        cursor = PromptCursor(rows, seed=3, mix="spread", lag=lag)
        cursor.observe(0, [(colors[0], 0.0)])
        weights = cursor._weights(colors, step=1)
        assert (weights[0] < weights[1]) == seen
    old = PromptCursor(rows, seed=3)
    old.load_state_dict(17)  # a checkpoint from before the spread mix: its position alone
    assert old.position == 17 and old.spreads == {}


def test_group_spreads_are_each_groups_advantage_std():
    import torch

    from learner.grpo import group_spreads

    values = torch.tensor([1.0, -1.0, 0.0, 0.0, 2.0, 0.0])
    spreads = group_spreads(values, torch.tensor([0, 0, 1, 1, 2, 2]))
    assert spreads.tolist() == pytest.approx([1.0, 0.0, 1.0])
    per_step = torch.tensor([[1.0, 3.0], [-1.0, -3.0]])  # row means 2 and -2
    assert group_spreads(per_step, torch.tensor([0, 0])).tolist() == pytest.approx([2.0])


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
