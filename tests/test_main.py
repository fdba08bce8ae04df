"""End-to-end runs of the Ray service (learner.main) on the tiny random pipeline.

One local Ray instance for the module; each run starts its own rollout, reward and
learner actors, as a user's run would.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from actors.scale import set_pool_size
from learner import evaluation, sequential
from learner.config import load_config
from learner.main import latest_checkpoint, train
from learner.prompts import load_prompts
from policy.logprob import window_steps
from policy.pipeline import build_pipeline
from policy.sampler import SamplerSpec, sample_rollout
from policy.tiny import build_tiny_pipeline
from shapes import eval_model

REPO = Path(__file__).resolve().parents[1]
SMALL = [
    "model.path=tiny-random", "grpo.group_size=4", "grpo.prompts_per_step=2",
    "grpo.micro_batch=8", "sampler.num_steps=6", "self_confidence.num_probes=4",
    "metrics.port=0", "metrics.grid_every=2", "reward_pool.timeout_s=120", "eval.every=0",
]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=8, namespace="solace", include_dashboard=False)
    yield
    ray.shutdown()


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _scorer_pids() -> list[int]:
    """PIDs of live reward actors, found by the process title Ray gives them."""
    import psutil

    return [p.pid for p in psutil.process_iter(["cmdline"])
            if p.info["cmdline"] and p.info["cmdline"][0].startswith("ray::ScorerActor")]


def test_async_run_scores_with_generating_version_and_survives_resize_and_kill(local_ray, tmp_path):
    steps = 8
    cfg = load_config(REPO / "configs/tiny_solace.yaml", SMALL + [
        f"train.steps={steps}", "learner.max_staleness=1", "train.save_every=4",
        "reward_pool.control_name=test-pool-async"])
    run_dir = tmp_path / "async"
    done = threading.Event()
    errors = []

    def operator():
        try:
            act()
        except Exception as e:  # surfaced by the assertion below, not lost in the thread
            errors.append(e)

    def act():
        # From outside the loop, as a person with `python -m actors.scale` would.
        while len(_lines(run_dir / "metrics.jsonl")) < 1 and not done.is_set():
            time.sleep(0.2)
        set_pool_size("test-pool-async", 2)
        while len(_lines(run_dir / "metrics.jsonl")) < 2 and not done.is_set():
            time.sleep(0.2)
        pids = _scorer_pids()
        assert pids, "no reward actor process found"
        os.kill(pids[0], signal.SIGKILL)  # a reward actor dies mid-run
        set_pool_size("test-pool-async", 1)

    thread = threading.Thread(target=operator, daemon=True)
    thread.start()
    try:
        train(cfg, run_dir)
    finally:
        done.set()
        thread.join(timeout=30)

    assert not errors, errors
    metrics = _lines(run_dir / "metrics.jsonl")
    samples = _lines(run_dir / "samples.jsonl")
    assert [m["step"] for m in metrics] == list(range(steps))
    # No sample lost, none double-counted, through a resize and a killed actor.
    keys = Counter((s["step"], s["prompt_id"], s["seed"]) for s in samples)
    assert len(keys) == steps * 2 * 4 and set(keys.values()) == {1}
    sizes = [m["reward/pool/size"] for m in metrics]
    assert 2 in sizes and sizes[-1] == 1, f"pool sizes per step: {sizes}"
    # Every self-confidence score was computed with the version that generated its sample.
    assert all(s["score_version"] == s["sample_version"] for s in samples)
    # Sampling ran one version ahead of training after the first step.
    assert [m["rollout/staleness"] for m in metrics] == [0] + [1] * (steps - 1)
    assert all(m["loss/total"] == m["loss/total"] for m in metrics)  # finite, not NaN
    assert sorted(p.name for p in (run_dir / "grids").glob("*.png"))
    assert latest_checkpoint(run_dir).name == f"step_{steps:06d}"

    # diffusers loads the LoRA checkpoint, and it changes what the model generates.
    pipe = build_tiny_pipeline(seed=0)
    spec, seeds = SamplerSpec(num_steps=4), torch.tensor([1, 2])
    before = sample_rollout(pipe, ["a photo of a star"] * 2, seeds, spec, max_sequence_length=8)
    pipe.load_lora_weights(run_dir / "lora")
    after = sample_rollout(pipe, ["a photo of a star"] * 2, seeds, spec, max_sequence_length=8)
    assert not torch.allclose(before.final, after.final)


def test_on_policy_ratio_is_one_every_step_and_resume_continues(local_ray, tmp_path):
    run_dir = tmp_path / "sync"
    # With an external reward actor (ShapesEval) beside self-confidence: the hybrid rule.
    shapes = '[{name: shapes, target: "rewards.shapes:ShapesReward", weight: 0.5}]'
    # Two optimizer steps per training step (grpo.inner_epochs), as the sequential loop has.
    over = SMALL + ["learner.max_staleness=0", "train.save_every=1", "grpo.inner_epochs=2",
                    "grpo.objective=clipped",
                    "reward_pool.control_name=test-pool-sync", f"external_rewards={shapes}"]
    train(load_config(REPO / "configs/tiny_solace.yaml", over + ["train.steps=2"]), run_dir)
    first = _lines(run_dir / "metrics.jsonl")
    assert all(m["rollout/staleness"] == 0 for m in first)
    assert all(m["loss/first_ratio_max_dev"] < 1e-5 for m in first)
    assert all(m["loss/inner_epochs"] == 2 for m in first)

    # The single-process loop, same config and seed (the external reward too), sees the
    # same first-step rewards, sample by sample.
    seq_cfg = load_config(run_dir / "config.yaml", ["train.steps=1"])
    seq_dir = sequential.train(seq_cfg, tmp_path / "seq")
    seq = _lines(seq_dir / "metrics.jsonl")[0]
    for key in ("reward/self_confidence/mean", "reward/self_confidence/std",
                "reward/shapes/mean", "reward/shapes/std"):
        assert seq[key] == pytest.approx(first[0][key], abs=1e-6)
    service_rows = {(r["prompt_id"], r["seed"]): r for r in _lines(run_dir / "samples.jsonl")}
    for row in _lines(seq_dir / "samples.jsonl"):
        other = service_rows[(row["prompt_id"], row["seed"])]
        assert row["reward/shapes"] == pytest.approx(other["reward/shapes"], abs=1e-6)
        assert row["reward/self_confidence"] == pytest.approx(other["reward/self_confidence"],
                                                             abs=1e-6)

    # --resume: the learner, optimizer and prompt cursor continue from step 2.
    train(load_config(run_dir / "config.yaml", ["train.steps=3"]), run_dir, resume=True)
    metrics = _lines(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 1, 2]
    assert metrics[2]["system/weight_version"] == 3
    assert metrics[2]["loss/first_ratio_max_dev"] < 1e-5
    samples = _lines(run_dir / "samples.jsonl")
    assert len(samples) == 3 * 2 * 4
    # Both rewards are recorded per sample and both shape the advantage.
    assert all(0.0 <= s["reward/shapes"] <= 1.0 and "reward/self_confidence" in s for s in samples)
    assert all("reward/shapes/adv_share" in m and "reward/shapes/mean" in m for m in metrics)


def test_external_reward_alone_trains_and_a_weight_zero_reward_is_recorded(local_ray, tmp_path):
    """Flow-GRPO without self-confidence (self_confidence.enabled false), a watched reward."""
    rewards = ('[{name: shapes, target: "rewards.shapes:ShapesReward"}, '
               '{name: bright, target: "rewards.colorful:Colorfulness", weight: 0.0}]')
    cfg = load_config(REPO / "configs/tiny_solace.yaml", SMALL + [
        "train.steps=2", "learner.max_staleness=0", "self_confidence.enabled=false",
        "reward_pool.control_name=test-pool-external", f"external_rewards={rewards}"])
    run_dir = train(cfg, tmp_path / "external")
    metrics = _lines(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 1]
    assert all("reward/self_confidence/mean" not in m for m in metrics)
    assert all(m["reward/bright/adv_share"] == 0.0 for m in metrics)
    samples = _lines(run_dir / "samples.jsonl")
    assert len(samples) == 2 * 2 * 4
    assert all("reward/self_confidence" not in s and s["reward/bright"] >= 0 for s in samples)
    assert (run_dir / "lora").is_dir()


def test_a_frozen_control_samples_and_scores_as_the_recipe_and_never_moves(local_ray, tmp_path):
    """grpo.frozen: the recipe's samples (same prompts, same noise) and rewards, no optimizer
    step, one evaluation (the base); the saved LoRA is still the zero-B init."""
    from safetensors.torch import load_file

    over = SMALL + ["train.steps=2", "learner.max_staleness=0", "eval.every=1",
                    "eval.prompts_per_tag=1", "eval.per_prompt=1", "sampler.eval_num_steps=4"]
    runs = {}
    for name, extra in (("recipe", []), ("frozen", ["grpo.frozen=true"])):
        cfg = load_config(REPO / "configs/tiny_solace.yaml", over + extra + [
            f"reward_pool.control_name=test-pool-{name}"])
        runs[name] = train(cfg, tmp_path / name)
    recipe, frozen = (_lines(runs[n] / "samples.jsonl") for n in ("recipe", "frozen"))
    assert [(r["prompt_id"], r["seed"]) for r in frozen] == [(r["prompt_id"], r["seed"])
                                                            for r in recipe]
    first = [r["reward/self_confidence"] for r in recipe if r["step"] == 0]
    assert [r["reward/self_confidence"] for r in frozen if r["step"] == 0] == first
    metrics = _lines(runs["frozen"] / "metrics.jsonl")
    assert all(not any(k.startswith("loss/") for k in m) for m in metrics)
    assert sorted(evaluation.read_evals(runs["frozen"])) == [0]
    assert sorted(evaluation.read_evals(runs["recipe"])) == [0, 1, 2]
    lora = load_file(runs["frozen"] / "lora" / "pytorch_lora_weights.safetensors")
    assert all(v.abs().max() == 0 for k, v in lora.items() if "lora_B" in k)


def test_per_step_credit_trains_one_advantage_per_step_and_evaluates(local_ray, tmp_path):
    """grpo.credit per_step through the service: every sample carries one advantage per
    trained step, each step's advantages sum to zero over its group, the on-policy ratio
    is 1, and held-out evaluations (final latents only) are scored as usual."""
    cfg = load_config(REPO / "configs/tiny_solace.yaml", SMALL + [
        "train.steps=2", "learner.max_staleness=0", "grpo.credit=per_step",
        "grpo.adv_clip=100", "eval.every=2", "eval.prompts_per_tag=1", "eval.per_prompt=2",
        "sampler.eval_num_steps=4", "reward_pool.control_name=test-pool-credit"])
    run_dir = train(cfg, tmp_path / "credit")
    steps = window_steps(cfg.sampler.spec(), cfg.grpo.train_fraction)
    samples = _lines(run_dir / "samples.jsonl")
    assert len(samples) == 2 * 2 * 4 and all(len(s["step_advantages"]) == len(steps)
                                             for s in samples)
    for key in {(s["step"], s["prompt_id"]) for s in samples}:
        group = np.array([s["step_advantages"] for s in samples
                          if (s["step"], s["prompt_id"]) == key])
        np.testing.assert_allclose(group.sum(axis=0), 0.0, atol=1e-4)
    metrics = _lines(run_dir / "metrics.jsonl")
    assert all(m["loss/first_ratio_max_dev"] < 1e-5 for m in metrics)
    assert sorted(evaluation.read_evals(run_dir)) == [0, 2]


def test_held_out_evaluation_runs_before_between_and_after_and_pairs_with_the_base(local_ray,
                                                                                   tmp_path):
    """eval.every: fixed-noise ODE images of held-out prompts, graded and scored by every pool.

    Version 0 is the base model (B = 0), so its images must be exactly those of
    shapes.eval_model on the bare pipeline with the same eval seed.
    """
    monitor = '[{name: shapes, target: "rewards.shapes:ShapesReward", weight: 0.0}]'
    cfg = load_config(REPO / "configs/tiny_solace.yaml", SMALL + [
        "train.steps=3", "learner.max_staleness=1", "eval.every=2", "eval.prompts_per_tag=1",
        "eval.per_prompt=2", "eval.seed=5", "sampler.eval_num_steps=8",
        "model.path=models/tiny-shapes-sd3",  # draws shapes, so the grades below vary
        "reward_pool.control_name=test-pool-eval", f"external_rewards={monitor}"])
    run_dir = train(cfg, tmp_path / "eval")
    evals = evaluation.read_evals(run_dir)
    assert sorted(evals) == [0, 2, 3]  # before step 0, after step 2 (every 2), after the last
    rows = evaluation.eval_rows(load_prompts(cfg.eval.prompts), 1)
    assert len(rows) == 6 and all(len(evals[v]) == 12 for v in evals)  # 6 tags x 2 images
    for v, images in evals.items():
        assert all(isinstance(r["shapes/strict"], bool) and abs(r["reward/self_confidence"]) < 50
                   and 0 <= r["reward/shapes"] <= 1 for r in images)
        # the pool's ShapesReward (metadata found past the training rows) = the driver's grade
        assert [r["reward/shapes"] for r in images] == pytest.approx(
            [r["shapes/partial"] for r in images], abs=1e-6), v
    metrics = _lines(run_dir / "metrics.jsonl")
    assert [("eval/shapes/strict" in m) for m in metrics] == [False, True, True]
    assert metrics[1]["eval/version"] == 2 and (run_dir / "eval.png").is_file()
    # version 0 is the base model: the same images as shapes.eval_model with the same seed
    base = eval_model.evaluate(build_pipeline("models/tiny-shapes-sd3"), rows, 2, 8, 4.5, seed=5)
    assert len(set(base.scores.partial.tolist())) > 2  # the comparison has something to see
    assert [r["shapes/partial"] for r in evals[0]] == pytest.approx(
        base.scores.partial.tolist(), abs=1e-6)
    assert [r["shapes/strict"] for r in evals[0]] == base.scores.strict.tolist()
    lines = evaluation.report(run_dir)
    assert lines[0].startswith("held-out evaluation, version 0 -> 3 (12 images")
    assert any(line.strip().startswith("self_confidence") for line in lines)


def test_a_run_on_the_t5_model_with_a_prompt_table_conditions_as_its_t5_would(local_ray, tmp_path):
    """The shipped T5 model through the service with model.prompt_table: the actors load
    no text encoder, and the conditioning they look up is what its T5 gives at
    model.max_sequence_length (the held-out images equal shapes.eval_model's, which
    encodes with the resident encoders at the same length)."""
    t5_model = "models/tiny-shapes-sd3-t5"
    cfg = load_config(REPO / "configs/tiny_solace.yaml", SMALL + [
        "train.steps=1", "learner.max_staleness=0", "eval.every=1", "eval.prompts_per_tag=1",
        "eval.per_prompt=1", "eval.seed=5", "sampler.eval_num_steps=6",
        f"model.path={t5_model}", "model.max_sequence_length=16", "model.prompt_table=true",
        "reward_pool.control_name=test-pool-t5"])
    run_dir = train(cfg, tmp_path / "t5")
    samples = _lines(run_dir / "samples.jsonl")
    assert len(samples) == 8 and all(np.isfinite(r["reward/self_confidence"]) for r in samples)
    evals = evaluation.read_evals(run_dir)
    rows = evaluation.eval_rows(load_prompts(cfg.eval.prompts), 1)
    pipe = build_pipeline(t5_model)
    same = eval_model.evaluate(pipe, rows, 1, 6, 4.5, seed=5, max_sequence_length=16)
    assert [r["shapes/partial"] for r in evals[0]] == pytest.approx(
        same.scores.partial.tolist(), abs=1e-6)
    # and the length matters: the T5 sees its pads (SD3 passes no attention mask)
    spec = SamplerSpec(num_steps=6, guidance_scale=4.5, noise_level=0.0)
    other = eval_model.generate(pipe, rows, 1, spec, 5, max_sequence_length=32)[0]
    assert not np.allclose(other, same.images, atol=1e-3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_prometheus_endpoint_serves_the_metrics_during_a_run(tmp_path):
    port = _free_port()
    cmd = [sys.executable, "-m", "learner.main", "--run-dir", str(tmp_path / "prom")]
    for item in SMALL + ["train.steps=3", f"metrics.port={port}", "learner.max_staleness=0"]:
        cmd += ["--set", item]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    scraped = ""
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    scraped = r.read().decode()
                if "solace_steps_total 1.0" in scraped or "solace_steps_total 2.0" in scraped:
                    break
            except OSError:
                pass
            time.sleep(0.5)
    finally:
        out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    # A quiet console: at most a screenful before the bar, no library chatter, a summary.
    before_bar = out.split("train:")[0].splitlines()
    assert len(before_bar) <= 24, "\n".join(before_bar)
    for noise in ("Loading pipeline components", "torchvision", "Setting accelerator"):
        assert noise not in out, noise
    tail = out.rsplit("train:", 1)[-1]
    for line in ("run directory:", "steps: 3 of 3", "reward self_confidence", "LoRA:",
                 "continue: python -m learner.main --resume"):
        assert line in tail, f"{line!r} not in the summary:\n{tail[-2000:]}"
    for name in ("solace_steps_total", "solace_samples_per_second", 'solace_reward_mean{reward="self_confidence"}',
                 "solace_advantage_std", "solace_ratio_mean", "solace_clip_fraction", "solace_staleness",
                 "solace_weight_push_seconds_bucket", "solace_queue_depth", "solace_reward_actors_alive",
                 'solace_step_seconds{phase="update"}'):
        assert name in scraped, f"{name} not served"


def test_bad_config_fails_before_any_actor_starts():
    started = time.time()
    out = subprocess.run([sys.executable, "-m", "learner.main", "--set", "grpo.group_size=1"],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode != 0
    assert "grpo.group_size" in out.stderr and "Started a local Ray instance" not in out.stderr
    assert time.time() - started < 60


def test_ema_weights_are_evaluated_saved_with_a_model_card_and_load_in_diffusers(local_ray,
                                                                               tmp_path):
    cfg = load_config(REPO / "configs/tiny_solace.yaml", SMALL + [
        "train.steps=3", "learner.max_staleness=1", "ema.decay=0.5", "eval.every=2",
        "eval.prompts_per_tag=1", "eval.per_prompt=1", "sampler.eval_num_steps=4",
        "reward_pool.control_name=test-pool-ema"])
    run_dir = train(cfg, tmp_path / "ema")
    evals = [json.loads(line) for line in (run_dir / "evals.jsonl").read_text().splitlines()]
    assert [e["version"] for e in evals] == [0, 2, 3]
    assert all(e["eval/ema_decay"] == 0.5 for e in evals)
    samples = _lines(run_dir / "samples.jsonl")
    assert all(isinstance(r["prompt"], str) and r["prompt"] for r in samples)
    for name in ("lora", "lora_ema"):
        card = (run_dir / name / "README.md").read_text()
        assert "tiny-random" in card and "steps: 3 of 3" in card and "self_confidence" in card
    assert "EMA LoRA (decay 0.5)" in (run_dir / "lora_ema" / "README.md").read_text()
    # TensorBoard holds the run's curves (metrics.jsonl's names) and its sample grids.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    steps = [e.step for e in events.Scalars("reward/self_confidence/mean")]
    assert steps == [0, 1, 2] and "eval/shapes/strict" in events.Tags()["scalars"]
    assert "samples" in events.Tags()["images"] and "config" in str(events.Tags())
    assert (run_dir / "training.png").is_file()
    # Both load in diffusers, and they differ: the average lags the weights.
    pipe = build_tiny_pipeline(seed=0)
    spec, seeds = SamplerSpec(num_steps=4), torch.tensor([1, 2])
    images = {}
    for name in ("lora", "lora_ema"):
        pipe.load_lora_weights(run_dir / name, adapter_name=name)
        pipe.set_adapters([name])
        images[name] = sample_rollout(pipe, ["a photo of a star"] * 2, seeds, spec,
                                      max_sequence_length=8).final
    assert not torch.allclose(images["lora"], images["lora_ema"])


def test_a_text_prompt_file_and_a_plain_jsonl_each_train_two_steps(local_ray, tmp_path):
    """The formats beyond GenEval metadata (which every other run here uses): one prompt a
    line (.txt) through the service, a jsonl of bare prompts through the sequential loop."""
    text = tmp_path / "prompts.txt"
    text.write_text("# a comment\na photo of a red circle\n\na watercolor of a lighthouse\n")
    plain = tmp_path / "prompts.jsonl"
    plain.write_text('{"prompt": "a photo of a blue star"}\n{"prompt": "a city at night"}\n')
    over = SMALL + ["train.steps=2", "learner.max_staleness=0"]
    run_dir = train(load_config(REPO / "configs/tiny_solace.yaml", over + [
        f"train.prompts={text}", "reward_pool.control_name=test-pool-text"]), tmp_path / "text")
    rows = _lines(run_dir / "samples.jsonl")
    assert [m["step"] for m in _lines(run_dir / "metrics.jsonl")] == [0, 1]
    assert {r["prompt"] for r in rows} == {"a photo of a red circle", "a watercolor of a lighthouse"}
    seq_dir = sequential.train(load_config(REPO / "configs/tiny_solace.yaml", over + [
        f"train.prompts={plain}"]), tmp_path / "plain")
    assert [m["step"] for m in _lines(seq_dir / "metrics.jsonl")] == [0, 1]


def test_recompute_old_logprobs_through_the_service(local_ray, tmp_path):
    """learner.recompute_old_logprobs with staleness 1: the ranks recompute every step with
    the weights that sampled it (the driver passes that version), so the first step's
    ratio is 1 and later, stale steps keep their real change of policy in the ratio."""
    cfg = load_config(REPO / "configs/tiny_solace.yaml", SMALL + [
        "train.steps=3", "learner.max_staleness=1", "learner.recompute_old_logprobs=true",
        "grpo.lr=0.01", "reward_pool.control_name=test-pool-recompute"])
    metrics = _lines(train(cfg, tmp_path / "recompute") / "metrics.jsonl")
    assert len(metrics) == 3 and all(m["timing/recompute_s"] > 0 for m in metrics)
    assert metrics[0]["loss/first_ratio_max_dev"] < 1e-5  # version 0 sampled, version 0 trains
    assert max(m["loss/first_ratio_max_dev"] for m in metrics[1:]) > 1e-5  # one version behind
