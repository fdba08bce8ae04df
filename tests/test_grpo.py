"""Advantages and the clipped loss against hand-computed values."""

import math

import pytest
import torch

from learner.grpo import advantage_metrics, combine_advantages, group_advantages, policy_loss

EPS = 1e-4


def test_global_std_advantages_by_hand():
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0, 0.0, 4.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    adv = group_advantages(rewards, groups, std_mode="global")
    # Population std of all 8 rewards: mean 25/8, sum of squared deviations 26.875.
    std = math.sqrt(26.875 / 8)
    expected = torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0, -2.0, 2.0]) / (std + EPS)
    torch.testing.assert_close(adv.values, expected)
    assert adv.keep.tolist() == [True, True, True, False, False, False, True, True]
    assert (adv.num_groups, adv.num_dropped_groups) == (3, 1)


def test_group_std_advantages_by_hand():
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 4.0])
    groups = torch.tensor([7, 7, 7, 9, 9])
    adv = group_advantages(rewards, groups, std_mode="group")
    s0 = math.sqrt(2.0 / 3.0)
    expected = torch.tensor([-1 / (s0 + EPS), 0.0, 1 / (s0 + EPS), -2 / (2 + EPS), 2 / (2 + EPS)])
    torch.testing.assert_close(adv.values, expected)
    assert adv.keep.all()


def test_advantages_are_clipped():
    rewards = torch.tensor([0.0, 0.0, 0.0, 0.0, 100.0])
    adv = group_advantages(rewards, torch.zeros(5, dtype=torch.long), clip=1.5)
    # mean 20, std 40: (0 - 20) / 40 = -0.5 kept; (100 - 20) / 40 = 2 clipped to 1.5.
    torch.testing.assert_close(adv.values, torch.tensor([-0.5, -0.5, -0.5, -0.5, 1.5]), atol=1e-5, rtol=0)


def test_all_flat_step_drops_every_group():
    adv = group_advantages(torch.ones(4), torch.tensor([0, 0, 1, 1]))
    assert not adv.keep.any() and adv.num_dropped_groups == 2
    assert torch.all(adv.values == 0)


def test_two_rewards_combined_as_weighted_rewards():
    a = torch.tensor([1.0, 2.0, 3.0, 0.0, 4.0])
    b = torch.tensor([0.0, 0.0, 0.0, 1.0, 3.0])
    groups = torch.tensor([0, 0, 0, 1, 1])
    got = combine_advantages({"a": a, "b": b}, {"a": 1.0, "b": 0.5}, groups, rule="rewards")
    total = [1.0, 2.0, 3.0, 0.5, 5.5]
    mean = sum(total) / 5
    std = math.sqrt(sum((t - mean) ** 2 for t in total) / 5)
    expected = torch.tensor([-1.0, 0.0, 1.0, -2.5, 2.5]) / (std + EPS)
    torch.testing.assert_close(got.values, expected)


def test_two_rewards_combined_as_weighted_advantages():
    a = torch.tensor([1.0, 2.0, 3.0, 0.0, 4.0, 1.0, 1.0])
    b = torch.tensor([0.0, 0.0, 0.0, 1.0, 3.0, 2.0, 2.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    got = combine_advantages({"a": a, "b": b}, {"a": 1.0, "b": 0.5}, groups, rule="advantages")

    def pop_std(xs):
        m = sum(xs) / len(xs)
        return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))

    sa, sb = pop_std(a.tolist()), pop_std(b.tolist())
    adv_a = torch.tensor([-1.0, 0.0, 1.0, -2.0, 2.0, 0.0, 0.0]) / (sa + EPS)
    adv_b = torch.tensor([0.0, 0.0, 0.0, -1.0, 1.0, 0.0, 0.0]) / (sb + EPS)  # group 0 flat in b
    torch.testing.assert_close(got.values, adv_a + 0.5 * adv_b)
    # Group 2 is flat in both rewards: dropped. Group 0 is flat only in b: kept.
    assert got.keep.tolist() == [True] * 5 + [False] * 2
    assert got.num_dropped_groups == 1
    torch.testing.assert_close(got.parts["b"], 0.5 * adv_b)
    metrics = advantage_metrics(got)
    assert metrics["reward/a/adv_share"] + metrics["reward/b/adv_share"] == pytest.approx(1.0)
    assert metrics["reward/groups_dropped"] == 1.0


def test_a_weight_zero_reward_is_only_watched():
    a = torch.tensor([1.0, 1.0, 2.0, 3.0])
    watched = torch.tensor([0.0, 5.0, 1.0, 9.0])
    groups = torch.tensor([0, 0, 1, 1])
    got = combine_advantages({"a": a, "w": watched}, {"a": 1.0, "w": 0.0}, groups)
    alone = combine_advantages({"a": a}, {"a": 1.0}, groups)
    torch.testing.assert_close(got.values, alone.values)
    # group 0 is flat in the trained reward: dropped although the watched one varies
    assert got.keep.tolist() == [False, False, True, True]
    assert advantage_metrics(got)["reward/w/adv_share"] == 0.0


def test_combine_rejects_mismatched_names():
    with pytest.raises(ValueError, match="same rewards"):
        combine_advantages({"a": torch.ones(2)}, {"b": 1.0}, torch.zeros(2, dtype=torch.long))


def test_loss_clipped_and_unclipped_by_hand():
    ratio = torch.tensor([1.2, 0.8, 1.0])
    old = torch.tensor([-1.0, -2.0, -3.0])
    log_prob = (old + torch.log(ratio)).requires_grad_()
    adv = torch.tensor([1.0, 1.0, -1.0])
    kl = torch.tensor([0.2, 0.4, 0.0])
    loss, m = policy_loss(log_prob, old, adv, clip_range=0.1, kl=kl, beta=0.5)
    # Sample 0: max(-1.2, -1.1) = -1.1 (clipped); 1: max(-0.8, -0.9) = -0.8; 2: 1.0.
    assert m["loss/policy"].item() == pytest.approx((-1.1 - 0.8 + 1.0) / 3, abs=1e-6)
    assert loss.item() == pytest.approx(-0.3 + 0.5 * 0.2, abs=1e-6)
    assert m["loss/clip_fraction"].item() == pytest.approx(2 / 3)
    assert m["loss/ratio_max"].item() == pytest.approx(1.2, abs=1e-6)
    assert m["loss/ratio_min"].item() == pytest.approx(0.8, abs=1e-6)
    loss.backward()
    # d/dlogp of -A ratio is -A ratio / N where unclipped; 0 where the clip is active.
    torch.testing.assert_close(log_prob.grad, torch.tensor([0.0, -0.8 / 3, 1.0 / 3]), atol=1e-6, rtol=0)


def test_loss_on_policy_is_minus_mean_advantage():
    lp = torch.tensor([-1.0, -2.0])
    loss, m = policy_loss(lp, lp, torch.tensor([0.5, -1.5]), clip_range=1e-4)
    assert loss.item() == pytest.approx(0.5)
    assert m["loss/ratio_mean"].item() == 1.0 and m["loss/approx_kl"].item() == 0.0


def test_shuffled_rewards_are_a_permutation_within_each_group_moving_rewards_together():
    from learner.grpo import shuffle_within_groups

    group_ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    a = torch.arange(8.0)
    rewards = {"a": a, "b": a * 10}
    out = shuffle_within_groups(rewards, group_ids, seed=3)
    for g in (0, 1):
        rows = group_ids == g
        assert sorted(out["a"][rows].tolist()) == sorted(a[rows].tolist())  # same group, same values
    assert torch.equal(out["b"], out["a"] * 10)  # a sample's rewards move together
    assert not torch.equal(out["a"], a)  # seed 3 moves something
    assert torch.equal(shuffle_within_groups(rewards, group_ids, seed=3)["a"], out["a"])
    # the advantages keep their scale: same per-group spread, same dropped groups
    before = group_advantages(a, group_ids)
    after = group_advantages(out["a"], group_ids)
    assert sorted(after.values.tolist()) == pytest.approx(sorted(before.values.tolist()))


def test_decoupled_objective_keeps_the_gradient_of_stale_terms_and_is_clipped_on_policy():
    old = torch.tensor([-1.0, -1.0, -1.0, -1.0])
    shift = torch.tensor([2e-3, -2e-3, 5e-5, 0.0])  # two stale terms outside the clip
    adv = torch.tensor([1.0, -1.0, 1.0, 1.0])
    grads = {}
    for objective in ("clipped", "decoupled"):
        lp = (old + shift).requires_grad_()
        loss, m = policy_loss(lp, old, adv, clip_range=1e-4, objective=objective)
        loss.backward()
        grads[objective] = lp.grad.clone()
        assert m["loss/clip_fraction"].item() == 0.5  # always measured against the sampler
    # clipped: the two terms past the clip (in the direction of their advantage) get nothing
    assert grads["clipped"][:2].tolist() == [0.0, 0.0]
    assert grads["clipped"][2:] == pytest.approx(-adv[2:] * torch.exp(shift[2:]) / 4)
    # decoupled: every term keeps -A w / N, w = pi_theta / pi_old (detached, capped at 2)
    assert grads["decoupled"] == pytest.approx(-adv * torch.exp(shift) / 4)
    _, m = policy_loss(old + shift, old, adv, clip_range=1e-4, objective="clipped")
    assert m["loss/no_grad_fraction"].item() == 0.5
    # on-policy the two are the same loss with the same gradient
    lp = old.clone().requires_grad_()
    same = [policy_loss(lp, old, adv, 1e-4, objective=o)[0] for o in ("clipped", "decoupled")]
    g = [torch.autograd.grad(x, lp)[0] for x in same]
    assert same[0].item() == same[1].item() and torch.equal(g[0], g[1])
