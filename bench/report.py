"""BENCHMARKS.md from the results dict of ``python -m bench``, and the machine it describes.

Every number printed here is computed from what one run measured; targets are the
issue's (#7). This module writes the header, the summary, sections 1-3 (stages) and 7
(GPU mode), the misses, and puts the document together; sections 4-6 are in
:mod:`bench.report_e2e`, number formatting in :mod:`bench.tables`, the plot in :mod:`bench.chart`.
"""

from __future__ import annotations

import os
import platform
import time
from importlib.metadata import version

from bench.report_e2e import (
    e2e_section,
    limit_text,
    overhead_share,
    overheads_section,
    pipeline_bound,
    scaling_section,
    speedups,
)
from bench.tables import TARGETS, med, spread, table, verdict

# docs/design.md section 7's estimate for SD3.5-M at 512 px.
DESIGN_TFLOP_PER_IMAGE, DESIGN_CEILING = 570.0, 1.4


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


# -- sections ---------------------------------------------------------------------------------

def _pair(results: dict, name: str) -> dict | None:
    pairs = results.get("stages", {}).get("pairs", [])
    return next((p for p in pairs if p["name"].startswith(name)), None)


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
                 f"ceiling of {ceiling:.2f} (counted FLOPs at 790 TFLOP/s) and docs/design.md §7's "
                 f"{DESIGN_CEILING}."]
    text += [
        "", f"Model FLOPs at SD3.5-M's full shape (512 px, {g['full_text_len']} text tokens, "
        "LoRA r=32), counted by `torch.utils.flop_counter` on the meta device (no GPU needed):",
        "", table(["quantity", "counted", "docs/design.md §7"], [
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
        "The counted forward is below docs/design.md's 2 x parameters x tokens because each stream's "
        "weights see only its own tokens (image or text) and the adaLN modulation weights run "
        "once per image, not per token; backward through a frozen base with LoRA costs about "
        "one more forward (no weight gradients), not two. So the ceiling in §7 is conservative "
        "by the ratio of the two per-image totals.",
        "", "### The GPU check", "",
        "`python -m bench.gpu_check` is the prepared check for a lent GPU (issue #17): the "
        "SD3.5-M-shaped transformer at 512 px in bf16 through sampling, scoring (LoRA unmerged "
        "and merged) and one update (with and without `learner.recompute_old_logprobs`) at the "
        "SD3.5-M preset's batch sizes, without Ray or DeepSpeed: images/s and peak "
        "`torch.cuda.max_memory_allocated` per stage against `python -m bench memory`'s "
        "estimate, and the first ratio's largest |ratio - 1| on-policy. "
        + ("Its figures: `docs/bench/gpu_check.json`."
           if g["measured_on_gpu"] else
           "**Not run on a GPU: no GPU has been lent to the project**, so these figures do "
           "not exist yet; its CPU mode runs in the test suite (`tests/test_gpu_check.py`). "
           "When a GPU is lent: `python -m bench.gpu_check --out docs/bench/gpu_check.json` "
           "(docs/cluster.md, \"The GPU check\", says how its wheels travel), and its table "
           "goes here."),
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
