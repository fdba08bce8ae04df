"""Sections 4-6 of BENCHMARKS.md (end to end, overheads, scaling) and the pipeline bound.

:func:`pipeline_bound` is the best step the Ray service can reach with one actor per stage,
from the 1-thread stage times of the sequential loop; section 4 explains the measured
speed-up against it.
"""

from __future__ import annotations

from bench.tables import TARGETS, med, median_run, spread, table


def speedups(e2e: dict) -> list[float]:
    return [s["rate"] / q["rate"] for s, q in zip(e2e["service"], e2e["sequential"], strict=False)]


def step_limits(r: float, sc: float, u: float, staleness: int) -> dict[str, float]:
    """Lower bounds on a step of ``learner.main.train``, one actor per stage, no core limit.

    Rollout, scoring and update take ``r``, ``sc`` and ``u`` s. The reward pool dispatches
    a rollout as soon as it lands (the driver pumps it in ``Service.gather`` and, while the
    update runs, in ``Service.wait_update``), so only two things bound a step: each actor
    does its stage once per step, and step k + staleness is launched when step k starts,
    while step k + staleness + 1 cannot start before it was sampled, scored and trained.
    The loop's steady state is the largest of these (tests/test_bench.py checks it against
    a step-by-step simulation of the loop).
    """
    return {"rollout": r, "scoring": sc, "update": u, "chain": (r + sc + u) / (staleness + 1)}


def pipeline_bound(e2e: dict) -> dict:
    """The best the service can do here, from the 1-thread stage times of the sequential loop.

    The shortest step is the largest of :func:`step_limits` and all the work spread over
    the cores; ``limit`` names the bounds that set it.
    """
    ph = e2e["sequential_1"]["phases"]
    r, sc, u = ph["rollout"], ph["scoring"], ph["update"]
    chain, cores = r + sc + u, e2e["cores"]
    limits = step_limits(r, sc, u, e2e["staleness"]) | {"cores": chain / cores}
    step = max(limits.values())
    seq_step = med([med(x["step_s"]) for x in e2e["sequential"]])
    seq_rate = med([x["rate"] for x in e2e["sequential"]])
    return {"stage_s": [r, sc, u], "chain_s": chain, "limits": limits, "step_s": step,
            "limit": [k for k, v in limits.items() if v >= step * (1 - 1e-9)],
            "seq_step_s": seq_step, "bound": seq_step / step,
            "thread_scaling": seq_rate / e2e["sequential_1"]["rate"]}


def limit_text(b: dict, e2e: dict) -> str:
    """What sets the bound of :func:`pipeline_bound`, in words."""
    words = {"rollout": "the rollout actor", "scoring": "the reward actor",
             "update": "the learner rank",
             "chain": f"the chain over {e2e['staleness'] + 1} overlapped steps",
             "cores": f"all the work over the {e2e['cores']} cores"}
    return " and ".join(words[k] for k in b["limit"])


def oversubscribed(e2e: dict) -> str:
    """A sentence when one thread beat all cores: other jobs held the cores."""
    seq = med([r["rate"] for r in e2e["sequential"]])
    one = e2e["sequential_1"]["rate"]
    if one <= seq:
        return ""
    best = med([r["rate"] for r in e2e["service"]]) / one
    return (f" In this run the 1-thread sequential loop was faster than the {e2e['cores']}-thread "
            f"one ({one:.2f} against {seq:.2f} samples/s): other jobs held the cores, and "
            f"torch's threads wait for each other. Against the faster of the two the service "
            f"is {best:.2f}x.")


def e2e_section(results: dict) -> str:
    e2e = results["e2e"]
    runs = e2e["service"] + e2e["sequential"] + [e2e["sequential_1"]]
    rows = [[r["label"], len(r["step_rates"]), spread(r["step_rates"], ".2f"),
             f"{r['rate']:.2f}", spread(r["step_s"], ".2f")] for r in runs]
    s = speedups(e2e)
    b = pipeline_bound(e2e)
    cores = e2e["cores"]
    mid = median_run(e2e["service"])
    util, ph = mid["utilisation"], mid["phases"]
    overlap = mid["extra"].get("scoring_overlapping_update", float("nan"))
    r, sc, u = b["stage_s"]
    k, lim = e2e["staleness"], b["limits"]
    gap = (" The measured ratio is above this bound: the bound is a steady state from the "
           "1-thread run's stage times, which a few timed steps of another run need not keep to.")
    if med(s) < b["bound"]:
        gap = (f" The gap to the bound is what sharing {cores} cores between three processes "
               "and the driver costs: inside the median service run the stages were busy "
               f"{ph['rollout']:.2f} s, {ph['scoring']:.2f} s and {ph['update']:.2f} s per step "
               "(Ray's timeline) against the times above for the same work alone; transport "
               f"and publication took {ph['transport'] + ph['publication']:.3f} s per step (section 5).")
    if b["thread_scaling"] >= 0.8 * cores:
        busy = "so one process already keeps the cores busy"
    elif b["thread_scaling"] >= 1:
        busy = f"so one process leaves part of the {cores} cores idle"
    else:
        busy = "slower, not faster: its threads were oversubscribed in this run"
    text = [
        "## 4. End to end", "",
        f"Trained samples/s of the Ray service (`learner.main.train`, local Ray, "
        f"`learner.max_staleness: {k}`, one rollout actor, one reward actor, one DeepSpeed rank, "
        f"one thread each) against the single-process loop (`learner.sequential.train`, "
        f"{cores} threads: every core of the machine) with the same config and seed, "
        f"{e2e['steps']} steps each; the first {e2e['warmup']} step(s) (warm-up) and the last "
        "(nothing left to overlap it with) are not counted. Runs alternate (sequential, service, service, sequential, ...); "
        f"{len(e2e['service'])} of each. The 1-thread sequential run gives the per-stage times "
        "the bound below needs.", "",
        table(["run", "steps timed", "per-step samples/s", "samples/s (window)", "step s"], rows),
        "",
        f"**Service / sequential: {spread(s)}x** (target >= {TARGETS['e2e']}x; one ratio per "
        "alternating pair)." + oversubscribed(e2e), "",
        "Why, from this run's numbers. At one thread the stages take "
        f"{r:.2f} s (rollout), {sc:.2f} s (scoring) and {u:.2f} s (update) per step, "
        f"{b['chain_s']:.2f} s in all. The sequential loop runs them {b['thread_scaling']:.2f}x "
        f"as fast on {cores} threads as on one, {busy}. The service samples step k+{k} while "
        "step k is scored and trained, and its reward pool dispatches a rollout as soon as it "
        "lands, during an update too (`Service.wait_update`). So a step takes at least the "
        f"longest of (`bench.report.pipeline_bound`): each stage on its one actor ({r:.2f}, {sc:.2f}, {u:.2f} s); one step's "
        f"three stages over the {k + 1} steps that `max_staleness: {k}` overlaps "
        f"({lim['chain']:.2f} s: step k+{k} is launched when step k starts, and step "
        f"k+{k + 1} cannot start before step k+{k} was sampled, scored and trained); all the "
        f"work spread over the {cores} cores ({lim['cores']:.2f} s). That is {b['step_s']:.2f} s per step, set by {limit_text(b, e2e)}, "
        f"against {b['seq_step_s']:.2f} s per sequential step: **at most {b['bound']:.2f}x** "
        "the sequential loop. In the median service run scoring overlapped an update for "
        f"{overlap:.0%} of its time (the timeline in the plot below)." + gap, "",
        "Busy share of each actor over the timed window (median service run): "
        + ", ".join(f"{k} {v:.0%}" for k, v in sorted(util.items())) + ".",
    ]
    return "\n".join(text)


def overhead_share(run: dict) -> float:
    ph = run["phases"]
    return (ph["transport"] + ph["publication"]) / med(run["step_s"])


def overheads_section(results: dict) -> str:
    e2e = results["e2e"]
    rows = []
    for i, r in enumerate(e2e["service"]):
        ph = r["phases"]
        rows.append([i + 1, f"{ph['transport'] * 1e3:.1f}", f"{ph['publication'] * 1e3:.1f}",
                     f"{r['extra']['publish_wait_s'] * 1e3:.1f}", f"{med(r['step_s']):.2f}",
                     f"{overhead_share(r):.2%}"])
    text = [
        "## 5. Overheads", "",
        "Per step, from Ray's task timeline of each service run in section 4 (timed steps): "
        "transport = Ray's `deserialize_arguments` + `store_outputs` of every sample, score and "
        "train call (rollouts and weights out of and into the object store); publication = "
        "the learner's `weights` calls (flatten + store) and the rollout actors' `set_weights` "
        "calls (fetch + load); the driver's wait for the stored buffer (`timing/publish_s`) is "
        "shown beside it. Share = (transport + publication) / wall time of a step; actors "
        "working in parallel are summed, so the share is an upper bound.", "",
        table(["service run", "transport ms/step", "publication ms/step",
               "driver publish wait ms", "step s", "share of a step"], rows),
    ]
    pub = e2e.get("publish")
    if pub:
        prow = [[p.get("label", f"{p['mb']:g} MB synthetic"), f"{p['mb']:.3g}",
                 spread([x * 1e3 for x in p["stored_s"]], ".1f"),
                 spread([x * 1e3 for x in p["loaded_s"]], ".1f")] for p in pub]
        text += ["", f"Weight-publish latency against payload, as `Service.publish` does it: an "
                 f"actor's task returns a `FlatWeights` buffer (stored once in the object store), "
                 f"the driver waits until it is stored, and hands the ref to "
                 f"{e2e['publish_consumers']} actors (the rollout and reward actors of the run), "
                 f"which unflatten it as `PolicyReplica.load` does. "
                 f"{len(pub[0]['stored_s'])} repetitions per size after one warm-up.", "",
                 table(["payload", "MiB", "stored (ms)", "loaded by every actor (ms)"], prow)]
    return "\n".join(text)


def scaling_section(results: dict) -> str:
    e2e, runs = results.get("e2e"), results["scaling"]
    rows = []
    base = med([r["rate"] for r in e2e["service"]]) if e2e else None
    if e2e:
        rows.append(["1 rollout, 1 reward (section 4)", spread(
            [x for r in e2e["service"] for x in r["step_rates"]]), f"{base:.2f}", "1.00x"])
    for r in runs:
        rows.append([r["label"], spread(r["step_rates"]), f"{r['rate']:.2f}",
                     f"{r['rate'] / base:.2f}x" if base else "-"])
    cores = results["meta"]["cores"]
    return "\n".join([
        "## 6. Scaling", "",
        "The service of section 4 with more reward actors, more rollout actors (one thread "
        "each) or more threads per actor, as each row names. One run each, spread over its "
        f"timed steps. On {cores} cores more actors or threads only share the "
        "same cores, so no gain is expected from them here; the figure shows what the extra "
        "processes cost.", "",
        table(["actors", "per-step samples/s", "samples/s (window)", "vs 1/1"], rows),
    ])
