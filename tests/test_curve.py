"""studies.curve: paired gains over the frozen control, from what runs wrote."""

import json

import pytest
import yaml

from learner import evaluation
from learner.config import load_config
from studies import curve


def _write(run_dir, samples, evals, frozen=False):
    run_dir.mkdir(parents=True)
    cfg = load_config("configs/tiny_solace.yaml", [f"grpo.frozen={str(frozen).lower()}"])
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    (run_dir / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))
    with open(run_dir / "eval_samples.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in evals)


def _samples(values):  # two steps of two samples
    return [{"step": s, "prompt_id": 0, "seed": 10 * s + i, "reward/r": v}
            for (s, i), v in zip([(0, 0), (0, 1), (1, 0), (1, 1)], values, strict=True)]


def _evals(values):
    return [{"version": v, "step": v, "prompt_id": p, "sample": 0, "tag": "t",
             "reward/r": x, "shapes/strict": x > 0.5}
            for (v, p), x in zip([(0, 0), (0, 1), (2, 0), (2, 1)], values, strict=True)]


def test_gains_pair_each_sample_with_the_frozen_control(tmp_path):
    _write(tmp_path / "frozen", _samples([0.1, 0.2, 0.1, 0.2]), _evals([0.0, 0.0, 0.0, 0.0]))
    _write(tmp_path / "recipe", _samples([0.1, 0.2, 0.4, 0.6]), _evals([0.0, 0.0, 1.0, 0.0]))
    train = curve.train_gains(tmp_path / "recipe", tmp_path / "frozen")["r"]
    assert [p["step"] for p in train] == [0, 1]
    assert train[0]["mean"] == 0.0 and train[1]["mean"] == pytest.approx((0.3 + 0.4) / 2)
    assert train[1]["se"] == pytest.approx(0.05)  # std(0.3, 0.4, ddof 1) / sqrt 2
    ev = curve.eval_gains(tmp_path / "recipe", tmp_path / "frozen")
    assert [p["version"] for p in ev["reward/r"]] == [0, 2]
    assert ev["reward/r"][1]["mean"] == 0.5 and ev["shapes/strict"][1]["mean"] == 0.5
    se = curve.se_by_images(tmp_path / "recipe", tmp_path / "frozen")
    assert [p["per_prompt"] for p in se] == [1] and se[0]["images"] == 2
    results = {"config": "c", "overrides": [], "runs": {"recipe": {
        "train": curve.train_gains(tmp_path / "recipe", tmp_path / "frozen"), "eval": ev}}}
    curve.write_outputs(tmp_path / "out" / "c", results, ["--config", "c"])
    md = (tmp_path / "out" / "c.md").read_text()
    assert "| 1 | +0.3500 ± 0.0500 |" in md and (tmp_path / "out" / "c.png").is_file()
    assert json.loads((tmp_path / "out" / "c.json").read_text()) == results


def test_a_frozen_control_evaluates_once_and_every_version_pairs_with_it(tmp_path):
    base = _evals([0.0, 1.0, 0.0, 1.0])[:2]  # the frozen control's version 0 only
    _write(tmp_path / "frozen", _samples([0.1, 0.2, 0.1, 0.2]), base, frozen=True)
    _write(tmp_path / "recipe", _samples([0.1, 0.2, 0.4, 0.6]), _evals([0.0, 1.0, 1.0, 1.0]))
    ev = curve.eval_gains(tmp_path / "recipe", tmp_path / "frozen")["reward/r"]
    assert [(p["version"], p["mean"]) for p in ev] == [(0, 0.0), (2, 0.5)]
    assert curve.se_by_images(tmp_path / "recipe", tmp_path / "frozen")[0]["mean"] == 0.5
    # a control trained at a vanishing rate pairs version by version: none at version 2
    _write(tmp_path / "tiny_lr", _samples([0.1, 0.2, 0.1, 0.2]), base)
    ev = curve.eval_gains(tmp_path / "recipe", tmp_path / "tiny_lr")["reward/r"]
    assert [p["version"] for p in ev] == [0]


def test_runs_are_the_recipe_the_frozen_control_and_the_shuffled_control(tmp_path):
    runs = {"frozen": curve.RUNS["frozen"], "shuffled": curve.RUNS["shuffled"],
            "stale": ["learner.max_staleness=1"]}
    cfgs = curve.run_configs("configs/repro_colorful.yaml", ["grpo.lr=1e-2"], 3, runs)
    assert cfgs["frozen"].grpo.frozen and cfgs["shuffled"].grpo.shuffle_rewards
    assert cfgs["stale"].grpo.lr == 1e-2 and cfgs["stale"].learner.max_staleness == 1
    assert {c.train.steps for c in cfgs.values()} == {3}
    assert evaluation.SHAPES == "shapes"


def test_gradient_noise_cosine_is_one_for_the_same_noise_and_below_for_independent(monkeypatch):
    from studies import gradnoise

    over = ["model.path=tiny-random", "sampler.num_steps=4", "self_confidence.num_probes=2",
            "grpo.micro_batch=8", "grpo.lr=1e-2"]
    results = gradnoise.main(["--config", "configs/tiny_solace.yaml", *sum(
        (["--set", o] for o in over), []), "--sizes", "2x4", "--pairs", "1"])
    assert results[0]["samples"] == 8 and -1 <= results[0]["mean"] < 0.999
    # the same batch twice: the same gradient (what "independent" is measured against)
    monkeypatch.setattr(gradnoise, "sample_step",
                        lambda pipe, cfg, cursor, step, neg: _same(pipe, cfg, cursor, neg))
    same = gradnoise.main(["--config", "configs/tiny_solace.yaml", *sum(
        (["--set", o] for o in over), []), "--sizes", "2x4", "--pairs", "1"])
    assert same[0]["mean"] == pytest.approx(1.0, abs=1e-5)


def _same(pipe, cfg, cursor, negative):
    from learner.sequential import sample_step

    return sample_step(pipe, cfg, cursor, 0, negative)


def test_seeds_tabulate_each_run_per_seed_with_the_mean(tmp_path):
    from studies.seeds import main

    def report(scale, extra=False):
        runs = {"recipe": {"eval": {"m": [{"version": 0, "mean": 0.0, "se": 0.0},
                                          {"version": 4, "mean": scale, "se": 0.01}]}}}
        if extra:  # a run only one seed has is left out
            runs["control"] = runs["recipe"]
        return {"runs": runs}

    paths = []
    for i, (scale, extra) in enumerate(((0.1, True), (0.3, False))):
        paths.append(tmp_path / f"s{i}.json")
        paths[-1].write_text(json.dumps(report(scale, extra)))
    main([str(p) for p in paths] + ["--metric", "m", "--out", str(tmp_path / "all")])
    text = (tmp_path / "all.md").read_text()
    assert "| recipe | 4 | +0.100 ± 0.010 | +0.300 ± 0.010 | **+0.200 ± 0.100** |" in text
    assert "| control |" not in text and (tmp_path / "all.png").is_file()


def test_screen_pairs_each_evaluation_with_the_first_by_tag(tmp_path):
    from studies import screen

    first = {"strict": [1, 0, 0, 0], "partial": [1.0, 0.5, 0.0, 0.5], "tags": ["a", "a", "b", "b"]}
    now = {"strict": [1, 1, 0, 1], "partial": [1.0, 1.0, 0.0, 1.0], "tags": ["a", "a", "b", "b"]}
    gain, se = screen.paired(now, first, "strict")
    assert gain == pytest.approx((0.5 + 0.5) / 2)  # the mean over tags, as GenEval's overall
    assert se == pytest.approx((0.5 ** 2 + 0.5 ** 2) ** 0.5 / 2)
    assert screen.paired(now, first, "partial")[0] == pytest.approx(0.25)
    # a two-step screen on the tiny random pipeline: it trains, evaluates twice, writes it all
    summary = screen.main([
        "--config", "configs/learn_shapes.yaml", "--steps", "2", "--eval-every", "2",
        "--train-per-prompt", "1", "--test-per-prompt", "1", "--out", str(tmp_path),
        "--set", "model.path=tiny-random", "--set", "model.max_sequence_length=8",
        "--set", "grpo.group_size=2", "--set", "grpo.prompts_per_step=2",
        "--set", "sampler.num_steps=3", "--set", "sampler.eval_num_steps=2",
        "--set", "train.tags=[single_object]"])
    assert [e["step"] for e in summary["evals"]] == [0, 2]
    assert tuple(summary["evals"][0]["test/strict"]) == (0.0, 0.0)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    evals = [json.loads(line) for line in (tmp_path / "evals.jsonl").read_text().splitlines()]
    assert len(evals[1]["test"]["strict"]) == 98 and len(evals[1]["train"]["strict"]) == 2
