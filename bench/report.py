"""Tables, BENCHMARKS.md and the step-time plot, from the results dict of ``python -m bench``.

Every number printed here is computed from what one run measured; targets are the
issue's (#7). Spreads are written ``median [min–max]`` over the repetitions named.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from importlib.metadata import version
from pathlib import Path

TARGETS = {"sampler": 0.90, "self-confidence": 0.90, "e2e": 1.3, "overhead": 0.05}
# DESIGN.md section 7's estimate for SD3.5-M at 512 px.
DESIGN_TFLOP_PER_IMAGE, DESIGN_CEILING = 570.0, 1.4
COLOURS = {"rollout": (66, 133, 244), "scoring": (251, 140, 0), "update": (52, 168, 83),
           "transport": (219, 68, 55), "publication": (142, 68, 173), "other": (170, 170, 170)}


# -- machine ----------------------------------------------------------------------------------

def cpu_busy_share(seconds: float = 1.0) -> float:
    """Share of all CPUs busy over ``seconds`` (from /proc/stat), before anything starts."""
    def sample():
        with open("/proc/stat") as f:
            values = [int(x) for x in f.readline().split()[1:]]
        idle = values[3] + values[4]
        return sum(values), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except OSError:
        return float("nan")
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def machine_info() -> dict:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem_gib = float("nan")
    try:
        with open("/proc/meminfo") as f:
            mem_gib = int(next(line for line in f if line.startswith("MemTotal")).split()[1]) / 2**20
    except (OSError, StopIteration):
        pass
    versions = {}
    for pkg in ("torch", "ray", "deepspeed", "diffusers", "peft"):
        try:
            versions[pkg] = version(pkg)
        except Exception:  # not installed: say so rather than fail the benchmark
            versions[pkg] = "absent"
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": model, "cores": os.cpu_count(), "memory_gib": round(mem_gib, 1), "gpu": gpu,
            "python": platform.python_version(), "versions": versions,
            "busy_before": cpu_busy_share(), "load_start": os.getloadavg(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


# -- formatting -------------------------------------------------------------------------------

def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float], fmt: str = ".2f") -> str:
    """``median [min–max]``; a single value alone."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    return f"{med(values):{fmt}} [{min(values):{fmt}}–{max(values):{fmt}}]"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(value: float, target: float, above: bool = True) -> str:
    ok = value >= target if above else value < target
    return "met" if ok else "**missed**"


def median_run(runs: list[dict]) -> dict:
    """The run with the median rate (the lower middle one of an even count)."""
    return sorted(runs, key=lambda r: r["rate"])[(len(runs) - 1) // 2]


def _pair(results: dict, name: str) -> dict | None:
    pairs = results.get("stages", {}).get("pairs", [])
    return next((p for p in pairs if p["name"].startswith(name)), None)


# -- sections ---------------------------------------------------------------------------------

def header(results: dict) -> str:
    meta = results["meta"]
    v = meta["versions"]
    busy = meta["busy_before"]
    lines = [
        "# Benchmarks", "",
        f"Made by `{results['command']}` (started {meta['started']}, "
        f"{results['elapsed_s'] / 60:.1f} min). Every figure below is a ratio or a rate measured "
        "in that one run; spreads are `median [min–max]` over the repetitions named in each "
        "section. Raw numbers: [docs/bench/results.json](docs/bench/results.json).", "",
        f"Machine: {meta['cpu']}, {meta['cores']} cores, {meta['memory_gib']} GiB, "
        f"{meta.get('gpu') or 'no GPU lent'}; Python "
        f"{meta['python']}, torch {v['torch']}, ray {v['ray']}, deepspeed {v['deepspeed']}, "
        f"diffusers {v['diffusers']}, peft {v['peft']}.", "",
        f"Load: {busy:.0%} of the CPUs were busy in the second before the run; load average "
        f"{meta['load_start'][0]:.2f} at the start and {meta['load_end'][0]:.2f} at the end "
        f"(1-minute, {meta['cores']} cores).",
    ]
    # The 1-minute load average decays slowly after earlier jobs: judge by the CPUs' busy
    # share just before the run.
    if busy > 0.25 or results.get("note"):
        lines += ["", "**This run shared the machine with other jobs**, so absolute rates are "
                  "noisy; the ratios pair measurements taken seconds apart and suffer less. "
                  + (results.get("note") or "")]
    return "\n".join(lines)


def summary(results: dict) -> str:
    rows = []
    for name, label in (("sampler", "1. sampler efficiency"),
                        ("self-confidence", "2. self-confidence scoring efficiency")):
        p = _pair(results, name)
        if p:
            rows.append([label, spread(p["ratio"]), f">= {TARGETS[name]:.2f}",
                         verdict(med(p["ratio"]), TARGETS[name])])
    for p in results.get("stages", {}).get("pairs", []):
        if p["name"].startswith("update"):
            rows.append([f"3. update efficiency, {p['name'][8:-1]}", spread(p["ratio"]), "-", "-"])
    e2e = results.get("e2e")
    if e2e:
        s = speedups(e2e)
        rows.append(["4. end to end, service / sequential", spread(s, ".2f") + "x",
                     f">= {TARGETS['e2e']}x", verdict(med(s), TARGETS["e2e"])])
        share = [overhead_share(r) for r in e2e["service"]]
        rows.append(["5. transport + publication share of a step", spread(share, ".1%"),
                     f"< {TARGETS['overhead']:.0%}", verdict(med(share), TARGETS["overhead"], False)])
    if results.get("scaling") and e2e:
        base = med([r["rate"] for r in e2e["service"]])
        for r in results["scaling"]:
            rows.append([f"6. scaling, {r['label']} vs 1/1", f"{r['rate'] / base:.2f}x", "-", "-"])
    gpu = results.get("gpu")
    if gpu:
        rows.append(["7. GPU mode (SD3.5-M shape, 512 px)",
                     "measured" if gpu["measured_on_gpu"] else "**not measured: no GPU lent**",
                     "-", "-"])
    return "## Summary\n\n" + table(["figure", "measured", "target", ""], rows)


def stage_table(pairs: list[dict], gflops: bool = True) -> str:
    rows = []
    for p in pairs:
        row = [p["name"], p["items"], p["forwards"], spread(p["stage_rate"], ".1f"),
               spread(p["bare_rate"], ".1f"), spread(p["ratio"])]
        if gflops and p.get("flops"):
            per_s = [p["flops"] / (p["items"] / r) / 1e9 for r in p["stage_rate"]]
            row += [f"{p['flops'] / 1e9:.1f}", spread(per_s, ".1f")]
        rows.append(row)
    head = ["stage", "images", "bare workload per repetition", "stage images/s",
            "bare images/s", "ratio"]
    if gflops:
        head += ["model GFLOP/rep", "stage GFLOP/s"]
    return table(head, rows)


def stages_sections(results: dict) -> str:
    st = results["stages"]
    intro = (f"Model `{st['model']}` with the config's LoRA, {st['threads']} torch thread(s) "
             f"(as in each actor), {st['batch']} images per call (the service's one rollout "
             f"call per step); {st['repeats']} interleaved repetition pairs after one warm-up "
             "each. ratio = stage rate / bare rate of the same repetition pair.")
    out = []
    texts = {
        "sampler": ("## 1. Sampler efficiency", "The stage: prompt encoding, `sample_rollout` "
                    "(SDE step, per-sample seeded noise, CFG, log-probs) and `Rollout.numpy`, "
                    "as `RolloutWorker.sample` runs it. Bare: the same T forwards of the 2B "
                    "CFG batch."),
        "self-confidence": ("## 2. Self-confidence scoring efficiency", "The stage: "
                            "`Rollout.torch`, prompt encoding and `score_rollout` (K antithetic "
                            "probes, one K*G forward per group and probe step, aggregation), as "
                            "`SelfConfidenceWorker.score` runs it. Bare: the same forwards."),
        "update": ("## 3. Update efficiency", "The stage: `learner.sequential.update_step` "
                   "(log-probs through the sampler's step, KL against the adapter-disabled "
                   "reference, clipped loss, backward, grad clip, AdamW) and, as the service "
                   "runs it, a one-rank `LearnerRank.train_step` (DeepSpeed, gloo, in this "
                   "process). Bare: forward+backward of the 2b CFG batch plus the no-grad "
                   "reference forward, per trained step and micro-batch; no optimizer."),
    }
    for key, (title, what) in texts.items():
        pairs = [p for p in st["pairs"] if p["name"].startswith(key)]
        if pairs:
            out.append(f"{title}\n\n{what} {intro}\n\n{stage_table(pairs)}")
    return "\n\n".join(out)


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


def gpu_section(results: dict) -> str:
    g = results["gpu"]
    f = g["full_shape_flops"]
    per_image = f["sampler"] + f["self-confidence"] + f["update"]
    ceiling = 790e12 / per_image
    sh = g["shape"]
    shape = (f"{sh['num_layers']} layers, {sh['num_attention_heads']} heads x "
             f"{sh['attention_head_dim']}, {sh['sample_size'] * 8} px, {g['text_len']} text tokens")
    text = ["## 7. GPU mode", ""]
    if not g["measured_on_gpu"]:
        text += ["**GPU figures: not measured. No GPU was lent to this run**, so images/GPU/s "
                 "and model FLOP utilisation at SD3.5-M's shape are missing. The same code ran "
                 f"on the CPU at a reduced size ({shape}, fp32, randomly initialised, batch "
                 f"{g['batch']}) so that it cannot rot; those figures are not GPU figures:", ""]
    else:
        text += [f"On {g['device_name']}: SD3.5-M's transformer shape ({shape}, bf16, random "
                 f"init), batch {g['batch']} per call.", ""]
    text.append(stage_table(g["pairs"]))
    if g["measured_on_gpu"]:
        rates = {p["name"]: med(p["stage_rate"]) for p in g["pairs"]}
        pipeline = 1 / sum(1 / rates[k] for k in rates if not k.startswith("update (Deep"))
        rows = []
        for p in g["pairs"]:
            mfu = (p["flops"] * med(p["stage_rate"]) / p["items"] / g["peak_flops"]
                   if g["peak_flops"] else float("nan"))
            rows.append([p["name"], f"{med(p['stage_rate']):.2f}", f"{mfu:.0%}"])
        text += ["", table(["stage", "images/GPU/s", "MFU"], rows), "",
                 f"All stages on one GPU in turn: {pipeline:.2f} trained images/GPU/s, against a "
                 f"ceiling of {ceiling:.2f} (counted FLOPs at 790 TFLOP/s) and DESIGN.md §7's "
                 f"{DESIGN_CEILING}."]
    text += [
        "", f"Model FLOPs at SD3.5-M's full shape (512 px, {g['full_text_len']} text tokens, "
        "LoRA r=32), counted by `torch.utils.flop_counter` on the meta device (no GPU needed):",
        "", table(["quantity", "counted", "DESIGN.md §7"], [
            ["transformer parameters", f"{f['params'] / 1e9:.2f} B", "2.5 B"],
            ["forward, one image", f"{f['forward'] / 1e12:.2f} TFLOP", "~5.7 TFLOP"],
            ["sampling per image (T x CFG forwards)", f"{f['sampler'] / 1e12:.0f} TFLOP", "-"],
            ["self-confidence per image (K x probe steps)",
             f"{f['self-confidence'] / 1e12:.0f} TFLOP", "-"],
            ["update per image (fwd+bwd with CFG + reference)", f"{f['update'] / 1e12:.0f} TFLOP",
             "-"],
            ["per trained image", f"{per_image / 1e12:.0f} TFLOP", f"~{DESIGN_TFLOP_PER_IMAGE:.0f} TFLOP"],
            ["ceiling at 790 TFLOP/s", f"{ceiling:.1f} images/GPU/s", f"~{DESIGN_CEILING}"],
        ]), "",
        "The counted forward is below DESIGN.md's 2 x parameters x tokens because each stream's "
        "weights see only its own tokens (image or text) and the adaLN modulation weights run "
        "once per image, not per token; backward through a frozen base with LoRA costs about "
        "one more forward (no weight gradients), not two. So the ceiling in §7 is conservative "
        "by the ratio of the two per-image totals.",
    ]
    return "\n".join(text)


def misses_section(results: dict) -> str:
    out = ["## Where targets are missed", ""]
    missed = False
    for p in results.get("stages", {}).get("pairs", []):
        target, prof = TARGETS.get(p["name"]), p.get("profile")
        if target and med(p["ratio"]) < target:
            missed = True
            out += [f"**{p['name']}** ({med(p['ratio']):.2f} < {target}):"]
            if prof:
                rows = [[op, f"{ms:+.1f}"] for op, ms in prof["ops"]]
                out += [f" one profiled repetition took {prof['stage_ms']:.0f} ms against "
                        f"{prof['bare_ms']:.0f} ms for its bare workload (torch profiler, self "
                        "CPU time; single runs, so differences of a few ms are noise). The ops "
                        "with the most extra time:", "", table(["op", "extra ms"], rows)]
            out.append("")
    e2e = results.get("e2e")
    if e2e and med(speedups(e2e)) < TARGETS["e2e"]:
        missed = True
        b = pipeline_bound(e2e)
        tried = [f"{r['label']}: {r['rate']:.2f} samples/s"
                 for r in results.get("scaling", [])]
        out += [
            f"**End to end** ({med(speedups(e2e)):.2f}x < {TARGETS['e2e']}x). The profile is the "
            "step-time plot and section 4: with one actor per stage the service's step cannot "
            f"be shorter than {b['step_s']:.2f} s here, set by {limit_text(b, e2e)}, and the "
            f"sequential loop already runs {b['thread_scaling']:.2f}x faster on {e2e['cores']} "
            f"threads than on one ({b['seq_step_s']:.2f} s a step), so the service is bound at "
            f"{b['bound']:.2f}x" + (
                " on this machine and config, below the target." if b["bound"] < TARGETS["e2e"]
                else "; the rest is what sharing the cores costs (section 4).")
            + " Tried (section 6): " + ("; ".join(tried) if tried else "nothing else in this run")
            + ".", ""]
        share = [overhead_share(r) for r in e2e["service"]]
        if med(share) >= TARGETS["overhead"]:
            out += [f"**Overheads** ({med(share):.1%} >= {TARGETS['overhead']:.0%}): see the "
                    "transport and publication columns of section 5.", ""]
    if not missed:
        out.append("No target was missed in this run.")
    return "\n".join(out)


def markdown(results: dict, plot: str | None) -> str:
    parts = [header(results), summary(results)]
    if "stages" in results:
        parts.append(stages_sections(results))
    if "e2e" in results:
        parts += [e2e_section(results), overheads_section(results)]
    if "scaling" in results:
        parts.append(scaling_section(results))
    if "gpu" in results:
        parts.append(gpu_section(results))
    if plot:
        parts.append("## Step-time breakdown\n\nSeconds per step by phase (timed steps): "
                     "the sequential loop's own timings (its median run, and the 1-thread run), "
                     "and for the median service run the busy seconds of its actors from Ray's "
                     "timeline, summed over actors (the black tick is the wall time per step). "
                     "Below, that run's actors over its last timed steps (dotted lines: steps "
                     "ending); scoring beside an update is the overlap section 4 counts.\n\n"
                     f"![step-time breakdown]({plot})")
    parts.append(misses_section(results))
    parts.append("## Other benchmarks\n\nThe reward HTTP server has its own benchmark, "
                 "`python -m bench.reward_server`, not part of `python -m bench all`.")
    return "\n\n".join(parts) + "\n"


def console(results: dict) -> str:
    """The summary table, for the terminal."""
    return summary(results).replace("## Summary\n\n", "")


# -- plot -------------------------------------------------------------------------------------

def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def plot(results: dict, path: Path) -> None:
    """Stacked seconds per step by phase, and the service's actor timeline (PIL, no matplotlib)."""
    from PIL import Image, ImageDraw

    e2e = results["e2e"]
    svc = median_run(e2e["service"])
    bars = []
    for r in (median_run(e2e["sequential"]), e2e["sequential_1"]):
        ph = dict(r["phases"])
        ph["other"] = max(0.0, med(r["step_s"]) - sum(ph.values()))
        bars.append((r["label"], ph, med(r["step_s"])))
    bars.append(("service: actor busy s, summed", svc["phases"], med(svc["step_s"])))

    W, H, left = 1200, 780, 300
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font, small = _font(16), _font(13)
    d.text((20, 12), "Seconds per step by phase (median over timed steps)", fill="black", font=font)
    top = max(max(sum(ph.values()), wall) for _, ph, wall in bars) * 1.1
    scale = (W - left - 230) / top
    for i, (label, ph, wall) in enumerate(bars):
        y = 50 + i * 55
        d.text((20, y + 10), label, fill="black", font=small)
        x = left
        for phase in (*COLOURS,):
            w = ph.get(phase, 0.0) * scale
            if w > 0:
                d.rectangle([x, y, x + w, y + 34], fill=COLOURS[phase])
                x += w
        wx = left + wall * scale
        d.line([wx, y - 4, wx, y + 38], fill="black", width=3)
        d.text((x + 6, y + 10), f"{sum(ph.values()):.2f} s (wall {wall:.2f} s)", fill="black",
               font=small)
    lx = left
    for phase, colour in COLOURS.items():
        d.rectangle([lx, 222, lx + 14, 236], fill=colour)
        d.text((lx + 20, 222), phase, fill="black", font=small)
        lx += 120

    # Gantt of the service over the last (up to) three timed steps.
    t0, t1 = svc["window"]
    ends = [t0]
    for s in svc["step_s"]:
        ends.append(ends[-1] + s)
    start = ends[max(0, len(ends) - 4)]
    rows = sorted({g[0] for g in svc["gantt"]})
    d.text((20, 270), f"Service actors, last {len(ends) - 1 - max(0, len(ends) - 4)} timed "
           f"steps ({t1 - start:.1f} s)", fill="black", font=font)
    gscale = (W - left - 40) / max(1e-9, t1 - start)
    for i, row in enumerate(rows):
        y = 310 + i * 50
        d.text((20, y + 10), row, fill="black", font=small)
        d.rectangle([left, y, W - 40, y + 34], outline=(220, 220, 220))
        for r, phase, a, b in svc["gantt"]:
            if r != row or b < start:
                continue
            xa, xb = left + (max(a, start) - start) * gscale, left + (min(b, t1) - start) * gscale
            d.rectangle([xa, y, max(xa + 1, xb), y + 34], fill=COLOURS[phase])
    y_end = 310 + len(rows) * 50
    for e in ends:
        if e >= start:
            x = left + (e - start) * gscale
            for yy in range(300, y_end, 8):
                d.line([x, yy, x, yy + 4], fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.crop((0, 0, W, min(H, y_end + 30))).save(path)

