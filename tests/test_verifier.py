"""Best-of-N with self-confidence as the verifier: the pick, the exact subset
expectations of studies.best_of_n, and early rejection on a real pipeline."""

import itertools
import math

import numpy as np
import pytest
import torch

from policy.pipeline import build_pipeline
from policy.sampler import SamplerSpec, decode_images, sample_rollout
from rewards.verifier import (
    VerifierSpec,
    best_of_n,
    candidate_seed,
    forwards_per_image,
    pick,
)
from studies.best_of_n import early_accuracy, oracle_accuracy, pick_accuracy

SPEC = SamplerSpec(num_steps=6, guidance_scale=4.5, noise_level=0.0)
VERIFIER = VerifierSpec(num_probes=4, probe_fraction=0.5)


def test_the_pick_is_the_argmax_first_on_ties_and_never_a_rejected_candidate():
    scores = np.array([[0.1, 0.3, 0.2], [0.5, 0.5, 0.1], [np.nan, -1.0, -2.0]])
    assert pick(scores).tolist() == [1, 0, 1]


def _brute(scores, correct, early, n, keep):
    """Every n-subset drawn, each strategy applied to it literally."""
    picked, oracle, rejected = [], [], []
    for subset in itertools.combinations(range(len(scores)), n):
        s = list(subset)
        picked.append(correct[s[int(pick(scores[s][None])[0])]])
        oracle.append(correct[s].any())
        kept = sorted(s, key=lambda i: (-early[i], s.index(i)))[:keep]
        rejected.append(correct[kept[int(np.argmax(scores[kept]))]])
    return np.mean(picked), np.mean(oracle), np.mean(rejected)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_the_exact_expectations_equal_drawing_every_subset(n):
    rng = np.random.default_rng(n)
    scores, early = rng.normal(size=7), rng.normal(size=7)
    correct = rng.random(7) < 0.4
    keep = max(1, n // 2)
    sc, oracle, rejected = _brute(scores, correct, early, n, keep)
    assert pick_accuracy(scores, correct, n) == pytest.approx(sc, abs=1e-12)
    assert oracle_accuracy(correct, n) == pytest.approx(oracle, abs=1e-12)
    assert early_accuracy(early, scores, correct, n, keep) == pytest.approx(rejected, abs=1e-12)
    # one candidate: every strategy is the sampler's own accuracy
    assert pick_accuracy(scores, correct, 1) == pytest.approx(correct.mean())


def test_forwards_count_sampling_and_scoring():
    probe_steps = VERIFIER.probe_steps(SPEC.num_steps)
    assert probe_steps == 3  # rho 0.5 of the 5 trainable steps of 6, rounded up
    assert forwards_per_image(1, SPEC, VERIFIER) == 2 * 6  # CFG: two forwards a step
    assert forwards_per_image(4, SPEC, VERIFIER) == 4 * (12 + 4 * 3)
    # early at step 2, keep 1: 4 x (2 steps + x0 + score) + 1 x (4 steps + score)
    assert forwards_per_image(4, SPEC, VERIFIER, early_step=2, keep=1) == 4 * (4 + 2 + 12) + (8 + 12)


@pytest.fixture(scope="module")
def pipe():
    return build_pipeline("tiny-random")


def test_best_of_n_keeps_the_most_confident_candidate(pipe):
    prompts = ["a photo of a red circle", "a photo of two stars"]
    out = best_of_n(pipe, prompts, 4, SPEC, VERIFIER, seed=3, keep_all=True)
    assert out.scores.shape == (2, 4) and np.isfinite(out.scores).all()
    assert out.chosen.tolist() == np.argmax(out.scores, axis=1).tolist()
    for p in range(2):
        assert np.array_equal(out.images[p], out.candidates[p, out.chosen[p]])
    assert len(np.unique(out.seeds)) == 8  # every candidate its own noise
    # The same prompt id gives the same candidates and scores, in any company.
    alone = best_of_n(pipe, prompts[1:], 4, SPEC, VERIFIER, seed=3, prompt_ids=[1])
    np.testing.assert_allclose(alone.scores[0], out.scores[1], rtol=1e-5)
    assert np.array_equal(alone.images[0], out.images[1])


def test_early_rejection_finishes_only_the_kept_candidates(pipe):
    prompts = ["a photo of a blue square"]
    full = best_of_n(pipe, prompts, 4, SPEC, VERIFIER, seed=1, early_step=2, keep=4)
    plain = best_of_n(pipe, prompts, 4, SPEC, VERIFIER, seed=1)
    # Stopping at step 2 to score changes nothing about a candidate that goes on.
    np.testing.assert_allclose(full.scores, plain.scores, rtol=1e-5, atol=1e-6)
    cut = best_of_n(pipe, prompts, 4, SPEC, VERIFIER, seed=1, early_step=2, keep=2)
    finished = ~np.isnan(cut.scores[0])
    assert finished.sum() == 2
    # the kept are the two most confident at step 2, and their final scores are as before
    assert set(np.flatnonzero(finished)) == set(np.argsort(-full.early[0], kind="stable")[:2])
    np.testing.assert_allclose(cut.scores[0, finished], plain.scores[0, finished], rtol=1e-5)
    assert finished[cut.chosen[0]]


def test_bad_settings_name_what_is_wrong(pipe):
    with pytest.raises(ValueError, match="keep in"):
        best_of_n(pipe, ["a photo of a star"], 4, SPEC, VERIFIER, early_step=2, keep=5)
    with pytest.raises(ValueError, match="early_step must lie"):
        best_of_n(pipe, ["a photo of a star"], 4, SPEC, VERIFIER, early_step=6, keep=2)
    with pytest.raises(ValueError, match="n must be"):
        best_of_n(pipe, ["a photo of a star"], 0, SPEC, VERIFIER)


def test_one_candidate_is_the_plain_sampler(pipe):
    out = best_of_n(pipe, ["a photo of a circle"], 1, SPEC, VERIFIER)
    assert out.chosen.tolist() == [0] and math.isnan(out.scores[0, 0])
    assert out.forwards == 12
    # exactly the sampler's image from the candidate's seed
    rollout = sample_rollout(pipe, ["a photo of a circle"], torch.tensor([candidate_seed(0, 0, 0)]),
                             SPEC, max_sequence_length=8)
    assert np.array_equal(out.images, decode_images(pipe, rollout.final))


def test_the_command_refuses_bad_settings_before_any_actor_starts(tmp_path, capsys):
    import ray

    from actors.verify import main

    for args, message in ((["--n", "4", "--keep", "2"], "give early_step too"),
                          (["--n", "4", "--early-step", "3", "--keep", "9"], "keep in"),
                          ([], "no prompt")):
        with pytest.raises(SystemExit) as stopped:
            main(["--model", "tiny-random", "--actors", "2", "--out", str(tmp_path), *args]
                 + (["--prompt", "a photo of a star"] if args else []))
        assert stopped.value.code == 2 and message in capsys.readouterr().err
        assert not ray.is_initialized()
