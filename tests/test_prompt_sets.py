"""GenEval-style COCO prompt sets (learner.prompt_sets) and the files shipped in configs/prompts."""

from collections import Counter
from pathlib import Path

import pytest

from learner import prompt_sets
from learner.prompt_sets import (
    COCO_CLASSES,
    COLORS,
    RELATIONS,
    TAGS,
    TEST_FILE,
    TRAIN_FILE,
    combinations,
    make_sets,
    write_sets,
)
from learner.prompts import geneval_problem, load_prompts

SHIPPED = Path(__file__).resolve().parents[1] / "configs" / "prompts"


@pytest.fixture(scope="module")
def sets():
    return make_sets()


def test_the_generator_is_deterministic_and_the_seed_matters(sets):
    assert make_sets() == sets
    other = make_sets(seed=7)
    assert other["test"] != sets["test"] and other["train"] != sets["train"]
    assert [len(other[s]) for s in ("train", "test")] == [len(sets[s]) for s in ("train", "test")]


def test_every_tag_is_in_both_sets_with_the_sizes_asked_for(sets):
    test, train = (Counter(r["tag"] for r in sets[s]) for s in ("test", "train"))
    assert test == prompt_sets.TEST_SIZES and sum(test.values()) == 540  # ~GenEval's 553
    assert set(train) == set(TAGS)
    assert train["single_object"] == 80 - test["single_object"]  # the classes not tested
    assert train["counting"] == 80 * 3 - test["counting"]  # the (class, count) not tested
    assert {tag: n for tag, n in train.items() if prompt_sets.TRAIN_SIZES[tag]} == {
        tag: n for tag, n in prompt_sets.TRAIN_SIZES.items() if n}
    assert 2500 <= sum(train.values()) <= 4000


def test_train_and_test_share_no_prompt_and_no_combination(sets):
    prompts = {s: [r["prompt"] for r in sets[s]] for s in ("train", "test")}
    assert all(len(set(p)) == len(p) for p in prompts.values())  # no duplicates either
    assert not set(prompts["train"]) & set(prompts["test"])
    held = set().union(*map(combinations, sets["test"]))
    assert not any(combinations(r) & held for r in sets["train"])
    # so e.g. a tested pair of classes is never trained together, in any tag
    pairs = {k for k in held if k[0] == "pair"}
    assert len(pairs) > 250 and not pairs & set().union(*map(combinations, sets["train"]))


def test_every_row_is_valid_geneval_metadata_of_its_tag(sets):
    for row in sets["train"] + sets["test"]:
        assert geneval_problem(row) is None, row
        assert set(row) == {"tag", "include", "prompt"} | ({"exclude"} if row["tag"] == "counting"
                                                           else set())
        include = row["include"]
        assert all(c["class"] in COCO_CLASSES for c in include)
        assert all(c["color"] in COLORS and c["class"] != "person" for c in include if "color" in c)
        assert row["prompt"].startswith("a photo of ")
        n = {"single_object": 1, "counting": 1, "colors": 1}.get(row["tag"], 2)
        assert len(include) == n, row
        if n == 2:
            assert include[0]["class"] != include[1]["class"]
        if row["tag"] == "counting":
            count = include[0]["count"]
            assert 2 <= count <= 4 and row["exclude"] == [{"class": include[0]["class"],
                                                          "count": count + 1}]
        if row["tag"] == "position":
            assert include[1]["position"][0] in RELATIONS and include[1]["position"][1] == 0
        if row["tag"] == "color_attr":
            assert include[0]["color"] != include[1]["color"]


def test_rows_read_as_geneval_writes_them():
    assert prompt_sets.single_object("dog")["prompt"] == "a photo of a dog"
    assert prompt_sets.counting("cat", 2) == {
        "tag": "counting", "include": [{"class": "cat", "count": 2}],
        "exclude": [{"class": "cat", "count": 3}], "prompt": "a photo of two cats"}
    assert prompt_sets.colors("red", "car")["prompt"] == "a photo of a red car"
    assert prompt_sets.position("bench", "left of", "cat") == {
        "tag": "position", "include": [{"class": "cat", "count": 1},
                                       {"class": "bench", "count": 1, "position": ["left of", 0]}],
        "prompt": "a photo of a bench left of a cat"}
    assert prompt_sets.color_attr("blue", "chair", "red", "dog")["prompt"] == \
        "a photo of a blue chair and a red dog"
    assert prompt_sets.colors("orange", "apple")["prompt"] == "a photo of an orange apple"
    assert [prompt_sets.counting(c, 3)["prompt"] for c in ("person", "bus", "skis", "knife")] == [
        "a photo of three people", "a photo of three buses", "a photo of three pairs of skis",
        "a photo of three knives"]
    assert len(COCO_CLASSES) == len(set(COCO_CLASSES)) == 80


def test_the_shipped_files_are_what_the_generator_writes(tmp_path):
    sizes = write_sets(tmp_path)
    assert sizes == {TRAIN_FILE: 2980, TEST_FILE: 540}
    for name in (TRAIN_FILE, TEST_FILE):
        shipped = (SHIPPED / name).read_bytes()
        assert shipped == (tmp_path / name).read_bytes(), (
            f"configs/prompts/{name} differs from the generator's; rerun "
            "python -m learner.prompt_sets --out configs/prompts")
        assert len(shipped) < 1_000_000


def test_the_cli_writes_both_files(tmp_path, capsys):
    prompt_sets.main(["--out", str(tmp_path), "--seed", "3"])
    assert f"{TEST_FILE}: 540 rows" in capsys.readouterr().out
    rows = load_prompts(tmp_path / TEST_FILE)
    assert rows == make_sets(3)["test"]
    with pytest.raises(SystemExit):
        prompt_sets.main(["--out", str(tmp_path), "--seed", "-1"])


def test_the_shipped_files_load_and_the_general_list_is_varied():
    assert len(load_prompts(SHIPPED / TRAIN_FILE)) == 2980
    general = load_prompts(SHIPPED / "general.txt")
    prompts = [r["prompt"] for r in general]
    assert 300 <= len(prompts) <= 500 and len(set(prompts)) == len(prompts)
    assert not any(p.startswith("#") for p in prompts)
    assert (SHIPPED / "general.txt").stat().st_size < 1_000_000


def test_the_sd35m_preset_trains_and_evaluates_on_the_coco_sets():
    # The YAML itself: learner.config imports torch (tens of seconds here), and
    # tests/test_config.py loads every preset already.
    import yaml

    preset = yaml.safe_load((SHIPPED.parents[0] / "sd35m_solace.yaml").read_text())
    train, test = preset["train"]["prompts"], preset["eval"]["prompts"]
    assert (train, test) == (f"configs/prompts/{TRAIN_FILE}", f"configs/prompts/{TEST_FILE}")
    # what learner.preflight.check_prompts does with them
    assert len(load_prompts(train, field="train.prompts")) == 2980
    assert len(load_prompts(test, field="eval.prompts")) == 540


def test_coco_rows_are_left_to_the_rewards_in_evaluation_not_graded_by_shapes_eval(sets):
    import numpy as np

    from learner import evaluation
    from shapes.world import make_splits

    assert not evaluation.gradable(sets["test"])
    assert evaluation.gradable(make_splits()["test"])
    rows = sets["test"][:2]
    result = evaluation.grade(0, 0, rows, 1, np.full((2, 64, 64, 3), 255, np.uint8),
                              {"r": np.array([0.5, 1.0])})
    assert result.summary["eval/r/mean"] == 0.75
    assert not any(k.startswith("eval/shapes") for k in result.summary)
    # a file mixing both worlds is not graded either (ShapesEval would refuse its COCO rows)
    assert not evaluation.gradable(make_splits()["test"][:3] + rows)
