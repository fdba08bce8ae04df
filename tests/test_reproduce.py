"""studies.reproduce: the run table, the table/aggregation helpers, and the quick mode end
to end (real Ray service, real evaluation) into tmp_path."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from learner import charts
from studies import plan
from studies import report as rpt
from studies import reproduce as rep

REPO = Path(__file__).resolve().parents[1]


def _eval(test: dict, unseen: dict | None = None) -> dict:
    return {"test": test, "unseen": unseen or {"colors": 0.5, "overall": 0.5, "partial": 0.5}}


def test_the_run_table_holds_issue_6s_rows():
    runs = {r.name: r for r in rep.run_table()}
    assert runs["base"].preset is None
    for family in ("solace", "shapes", "shapes_solace"):  # rows 2-4: three seeds
        assert [runs[f"{family}_s{s}"].seed for s in (0, 1, 2)] == [0, 1, 2]
    assert {"colorful_s0", "colorful_solace_s0"} <= set(runs)  # row 5: one seed
    assert "colorful_s1" not in runs
    ablations = sorted(r.overrides[0] for r in runs.values() if r.family == "ablation")
    assert ablations == sorted([
        "self_confidence.guidance_scale=4.5", "self_confidence.policy=base",
        "grpo.train_fraction=0.6", "grpo.train_fraction=1.0", "self_confidence.num_probes=4",
        "self_confidence.num_probes=16", "self_confidence.aggregation=official"])
    assert len(runs) == 1 + 9 + 2 + 1 + 7  # + the frozen control of the paired comparison
    control = rep.run_config(runs["control_s0"])
    assert control.seed == 0 and control.grpo.lr <= 1e-12  # frozen: the base policy
    assert {e.name: e.weight for e in control.external_rewards} == {
        "colorfulness": 0.0, "shapes_monitor": 0.0}  # every reward the rows train on, recorded


def test_every_run_config_loads_and_differs_from_the_reference_only_where_it_says():
    ref = rep.run_config(rep.by_name(rep.REFERENCE))
    for run in rep.run_table():
        if run.preset is None:
            continue
        cfg = rep.run_config(run)
        assert cfg.seed == run.seed
        monitors = {e.name: e.weight for e in cfg.external_rewards}
        # ShapesEval partial credit is recorded every step: as the reward or the monitor.
        assert monitors.get("shapes", 0) > 0 or monitors.get("shapes_monitor") == 0.0
        if run.family == "ablation":
            field, value = run.overrides[0].split("=")
            section, name = field.split(".")
            assert str(getattr(getattr(cfg, section), name)) == value
            assert str(getattr(getattr(ref, section), name)) != value  # a real change
    # The reference holds the paper's choices the ablations depart from.
    sc = ref.self_confidence
    assert (sc.guidance_scale, sc.policy, sc.num_probes, sc.aggregation) == (1.0, "current", 8, "paper")
    assert ref.grpo.train_fraction == 0.5 and sc.enabled


def test_select_keeps_the_base_model_and_refuses_unknown_names():
    runs = rep.run_table()
    assert [r.name for r in rep.select(runs, ["shapes"])] == ["base", "shapes_s0", "shapes_s1",
                                                            "shapes_s2"]
    assert [r.name for r in rep.select(runs, ["solace_s1"])] == ["base", "solace_s1"]
    with pytest.raises(SystemExit, match="nope"):
        rep.select(runs, ["nope"])


def test_cells_are_mean_and_sample_std():
    assert rpt.cell([]) == "-"
    assert rpt.cell([0.25]) == "0.250"
    assert rpt.cell([0.1, 0.2, 0.6]) == "0.300 ± 0.265"  # std ddof=1: sqrt(0.07)


def test_tag_table_aggregates_over_seeds_and_skips_absent_tags():
    a = _eval({"single_object": 1.0, "position": 0.0, "overall": 0.5, "partial": 0.7})
    b = _eval({"single_object": 0.5, "position": 0.5, "overall": 0.5, "partial": 0.9})
    table = rpt.tag_table([("base", [a]), ("solace", [a, b]), ("empty", [])], "test").splitlines()
    assert table[0] == "| configuration | seeds | single_object | position | overall | partial |"
    assert table[2] == "| base | 1 | 1.000 | 0.000 | 0.500 | 0.700 |"
    assert table[3] == "| solace | 2 | 0.750 ± 0.354 | 0.250 ± 0.354 | 0.500 ± 0.000 | 0.800 ± 0.141 |"
    assert len(table) == 4  # a group without runs has no row


def test_reward_curves_take_shapeseval_as_reward_or_monitor():
    monitor = [{"step": 0, "reward/self_confidence/mean": -0.2, "reward/shapes_monitor/mean": 0.3,
                "reward/adv_mean": 0.0}]
    reward = [{"step": 0, "reward/shapes/mean": 0.4}]
    assert rpt.reward_curves(monitor) == {"self_confidence": [-0.2], "shapes": [0.3]}
    assert rpt.reward_curves(reward) == {"shapes": [0.4]}


def test_reward_table_reads_start_and_final_windows():
    # 20 steps: the window is 4 steps; seed 0 rises 0 -> 1.9 by 0.1, seed 1 is 1 higher.
    runs = [[{"step": i, "reward/shapes/mean": 0.1 * i + k} for i in range(20)] for k in (0, 1)]
    table = rpt.reward_table([("shapes", runs)]).splitlines()
    # start: mean of steps 0-3 = 0.15 (+0.5 over seeds); final: steps 16-19 = 1.75 and 2.75
    assert table[2] == "| shapes | 0.650 → 2.250 ± 0.707 |"


def test_read_metrics_keeps_the_last_row_of_a_repeated_step(tmp_path):
    rows = [{"step": 0, "x": 1}, {"step": 1, "x": 2}, {"step": 1, "x": 3}, {"step": 2, "x": 4}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r["x"] for r in plan.read_metrics(tmp_path)] == [1, 3, 4]
    assert plan.read_metrics(tmp_path / "absent") == []


def test_charts_and_grids_draw(tmp_path):
    curve = [0.1, np.nan, 0.3, 0.2]
    path = charts.line_charts(tmp_path / "c.png", [("a", [("x", curve), ("y", [1.0] * 3)]),
                                                ("empty", [])])
    assert Image.open(path).size == (2 * charts.PANEL[0], charts.PANEL[1])
    assert charts.moving_average(curve, 2) == pytest.approx([0.1, 0.1, 0.3, 0.25])

    def images(tags, value):
        n = len(tags)
        return {f"{s}/{k}": v for s in rep.SPLITS for k, v in {
            "images": np.full((n, 8, 8, 3), value, np.uint8), "strict": np.ones(n, bool),
            "partial": np.ones(n), "prompts": np.array([f"a photo of {t}" for t in tags]),
            "tags": np.array(tags)}.items()}

    base, run = images(["colors", "position"], 0), images(["colors", "position"], 255)
    grid = Image.open(rpt.before_after(tmp_path / "g.png", base, run, "r"))
    assert grid.width == 4 * (16 + 8)  # 2 test tags + 2 unseen prompts, 2x scale
    with pytest.raises(ValueError, match="other prompts"):
        rpt.before_after(tmp_path / "g.png", base, images(["colors", "counting"], 1), "r")


@pytest.mark.slow  # minutes of Ray runs: `pytest -m slow` (README, Tests)
def test_quick_mode_end_to_end_and_a_rerun_skips_and_keeps_the_reading(tmp_path, capsys):
    out = tmp_path / "results"
    quick = ["--quick", "--only", "solace_s0", "control_s0", "--out", str(out)]
    report = rep.main(quick)
    assert report == tmp_path / "results.md"
    text = report.read_text()
    for heading in ("## How it was run", "## ShapesEval, test split", "## ShapesEval, unseen split",
                    "### Per seed", "## Training rewards", "## Paired with the frozen control",
                    "## Reading", "TODO"):
        assert heading in text, heading
    assert "| base model | 1 |" in text and "| SOLACE only (`solace`) | 1 |" in text
    assert "| solace | " in text  # the training-reward table
    # The paired row: self-confidence and ShapesEval differences on the same samples.
    paired = next(line for line in text.splitlines() if line.startswith("| `solace_s0` |"))
    assert re.fullmatch(r"\| `solace_s0` \|( [+-]\d\.\d{3} ± \d\.\d{3} \|){3} - \|", paired), paired
    for png in ("training.png", "grid_solace_s0.png"):
        assert Image.open(out / png).size[0] > 0
    runs = tmp_path / "runs"
    metrics = plan.read_metrics(runs / "solace_s0")
    assert [m["step"] for m in metrics] == [0, 1]
    assert all(0 <= m["reward/shapes_monitor/mean"] <= 1 for m in metrics)
    saved = json.loads((runs / "solace_s0" / "eval.json").read_text())
    assert saved["test"]["overall"] == pytest.approx(
        np.mean([v for k, v in saved["test"].items() if k not in ("overall", "partial")]))
    # Every number in the report comes from the runs: the base row is base's eval.json.
    base = json.loads((runs / "base" / "eval.json").read_text())["test"]
    assert f"| {base['overall']:.3f} | {base['partial']:.3f} |" in text

    # A rerun finds both runs done, trains nothing, and keeps a hand-written Reading.
    report.write_text(text.replace(rpt.READING_TODO, "## Reading\n\nBy hand.\n"))
    capsys.readouterr()
    rep.main(quick)
    assert capsys.readouterr().out.count("done before, skipped") == 3
    assert report.read_text().endswith("## Reading\n\nBy hand.\n")


def test_a_finished_run_is_not_retrained_and_another_config_is_refused(tmp_path):
    import yaml

    cfg = rep.run_config(rep.by_name("solace_s0"), ["train.steps=2"])
    (tmp_path / "checkpoints" / "step_000002").mkdir(parents=True)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    rep.train_run(cfg, tmp_path, ray_cpus=1)  # done: returns without starting Ray
    other = rep.run_config(rep.by_name("solace_s1"), ["train.steps=2"])
    with pytest.raises(SystemExit, match="another configuration"):
        rep.train_run(other, tmp_path, ray_cpus=1)


def test_paired_cells_difference_the_same_samples_only():
    def rows(name, values, start_seed=0):
        return [{"step": step, "seed": start_seed + i, f"reward/{name}": v}
                for step, vals in enumerate(values) for i, v in enumerate(vals)]

    control = rows("shapes_monitor", [[0.5, 1.0], [0.5, 0.5], [0.0, 1.0]])
    run = rows("shapes", [[0.5, 1.0], [1.0, 0.5], [1.0, 1.0]])
    # steps 1-2: differences 0.5, 0, 1, 0 -> mean 0.375, se std([.5,0,1,0])/2
    se = np.std([0.5, 0, 1, 0], ddof=1) / 2
    assert rpt.paired_cell(run, control, ("shapes", "shapes_monitor"), "shapes_monitor", 1) \
        == f"+0.375 ± {se:.3f}"
    # strict: 1.0 vs not, sample by sample: +1, 0, +1, 0
    assert rpt.paired_cell(run, control, ("shapes",), "shapes_monitor", 1, strict=True) \
        == f"+0.500 ± {np.std([1, 0, 1, 0], ddof=1) / 2:.3f}"
    assert rpt.paired_cell(run, control, ("colorfulness",), "colorfulness", 1) == "-"
    other_seed = rows("shapes", [[1.0, 1.0]] * 3, start_seed=100)  # no shared samples
    assert rpt.paired_cell(other_seed, control, ("shapes",), "shapes_monitor", 0) == "-"
