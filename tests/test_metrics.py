"""learner.metrics: the driver's Prometheus series."""

from learner.metrics import PrometheusMetrics

STEP = {"rollout/samples_per_s": 4.0, "reward/adv_mean": 0.0, "reward/adv_std": 1.0,
        "rollout/staleness": 1, "timing/publish_s": 0.01, "system/queue_depth": 1,
        "timing/wait_scores_s": 1.0, "timing/update_s": 2.0}


def reward_series(m: PrometheusMetrics) -> dict[str, float]:
    return {s.labels["reward"]: s.value for metric in m.registry.collect()
            if metric.name == "solace_reward_mean" for s in metric.samples}


def test_a_dropped_reward_leaves_no_stale_series():
    m = PrometheusMetrics(0, ["self_confidence", "shapes"])  # port 0: no HTTP server
    m.update(STEP | {"reward/self_confidence/mean": -0.1, "reward/shapes/mean": 0.4})
    assert reward_series(m) == {"self_confidence": -0.1, "shapes": 0.4}
    m.drop_reward("shapes")  # the run goes on without it (on_failure: drop)
    m.update(STEP | {"reward/self_confidence/mean": -0.05})
    assert reward_series(m) == {"self_confidence": -0.05}


def test_the_latest_evaluation_is_served_one_series_per_metric():
    m = PrometheusMetrics(0, ["self_confidence"])
    m.update_eval({"eval/shapes/strict": 0.35, "eval/self_confidence/mean": -0.1,
                   "timing/eval_s": 3.0})
    m.update_eval({"eval/shapes/strict": 0.40, "eval/self_confidence/mean": -0.08})
    served = {s.labels["metric"]: s.value for metric in m.registry.collect()
              if metric.name == "solace_eval" for s in metric.samples}
    assert served == {"shapes/strict": 0.40, "self_confidence/mean": -0.08}


def test_every_reward_pool_is_served_with_its_counters():
    m = PrometheusMetrics(0, ["self_confidence", "shapes"])
    m.update(STEP | {"reward/self_confidence/mean": -0.1, "reward/shapes/mean": 0.4,
                     "reward/pool/retries": 1.0, "reward/pool/alive": 2,
                     "reward/shapes/pool/scorer_errors": 3.0, "reward/shapes/pool/timeouts": 0.0})
    served = {(s.labels["reward"], s.labels["counter"]): s.value for metric in m.registry.collect()
              if metric.name == "solace_reward_pool" for s in metric.samples}
    assert served == {("self_confidence", "retries"): 1.0, ("self_confidence", "alive"): 2,
                      ("shapes", "scorer_errors"): 3.0, ("shapes", "timeouts"): 0.0}


def test_the_updates_numbers_are_served_one_series_each():
    m = PrometheusMetrics(0, ["self_confidence"])
    m.update(STEP | {"reward/self_confidence/mean": -0.1, "loss/total": 0.5, "loss/kl": 0.01,
                     "loss/grad_norm": 2.0, "loss/ratio_min": 0.99})
    served = {s.labels["metric"]: s.value for metric in m.registry.collect()
              if metric.name == "solace_train" for s in metric.samples}
    assert served == {"total": 0.5, "kl": 0.01, "grad_norm": 2.0, "ratio_min": 0.99}
