"""The prepared GPU check (issue #17, item 7): ``python -m bench.gpu_check [--out FILE]``.

On one GPU, without Ray or DeepSpeed: SD3.5-M's transformer shape with random weights,
bf16, the preset's LoRA, random text conditioning (77 + max_sequence_length tokens), at
512 px, through the stages of ``learner.sequential`` at the preset's batch sizes:

1. **sampling** one rollout call (``prompts_per_step / rollout.num_actors`` groups of
   ``group_size``) in chunks of ``rollout.micro_batch``, with CFG;
2. **scoring** it by self-confidence in forwards of ``self_confidence.micro_batch``,
   with the LoRA unmerged and merged (``self_confidence.merge_lora``);
3. **one update** (``update_step``, torch AdamW, the preset's gradient checkpointing),
   with and without ``learner.recompute_old_logprobs``.

Per stage: images/s, the peak of ``torch.cuda.max_memory_allocated`` against the memory
model's estimate of the same work (``bench.memory``: the transformer's weights plus the
stage's largest call), and for the update the first ratio's largest ``|ratio - 1|``
on-policy in bf16 (rollout batch ``rollout.micro_batch`` x CFG against training batch
``grpo.micro_batch`` x CFG), without and with the recompute. Nothing is downloaded.

Without a GPU (or with ``--cpu``) the same code runs at the CPU smoke size of
``bench.gpu_mode`` (2 layers, 64 px, fp32), so that it cannot rot; those are not GPU
figures, and the report says what a GPU run would measure.

What it needs beyond torch: diffusers, peft (with transformers, accelerate, safetensors,
huggingface_hub, tokenizers), pydantic, PyYAML, numpy and pillow, at requirements.lock's
versions (:func:`needed_packages` lists the closure); not Ray, DeepSpeed or matplotlib.
The lent GPU machines' image has torch and most of these; what it lacks travels as a
wheelhouse in the tree (~23 MiB for Python 3.12; the tree is ~21 MiB of the 64 a call
may carry), installed there without network:

    python -m bench.gpu_check --wheelhouse wheelhouse           # here: pip download
    python3 -m pip install -q --no-index --no-deps --target /tmp/site wheelhouse/*.whl \
        && PYTHONPATH=/tmp/site python3 -m bench.gpu_check --out gpu_check.json   # there
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# What the check imports besides torch; their dependencies are found from this
# environment's metadata (torch's own are on the GPU machine with it).
ROOTS = ("diffusers", "peft", "pydantic", "PyYAML", "numpy", "pillow")


def needed_packages(roots=ROOTS, have=("torch",)) -> list[str]:
    """``name==version`` of ``roots`` and everything they require (no extras), less
    ``have`` and what it requires, as installed here (requirements.lock's versions)."""
    from importlib.metadata import distribution

    from packaging.requirements import Requirement

    def closure(names) -> dict[str, str]:
        out, todo = {}, list(names)
        while todo:
            dist = distribution(todo.pop())
            key = dist.metadata["Name"].lower().replace("_", "-")
            if key in out:
                continue
            out[key] = f"{dist.metadata['Name']}=={dist.version}"
            for line in dist.requires or []:
                req = Requirement(line)
                if req.marker is None or req.marker.evaluate({"extra": ""}):
                    todo.append(req.name)
        return out
    skip = closure(have)
    return sorted(v for k, v in closure(roots).items() if k not in skip)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def timed(fn, device: torch.device, repeats: int) -> tuple[object, list[float]]:
    """``fn()``'s result and its wall times over ``repeats`` runs after one warm-up."""
    from bench.stages import synchronize

    result = fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return result, times


def estimates(cfg, shape: dict, chunk: int, probe_batch: int) -> dict[str, float]:
    """The memory model's figures (GiB) for what this check holds: the transformer (no
    text encoders, no VAE) and each stage's largest call."""
    from bench.memory import Components, forward_peak, train_peak
    from bench.memtrace import GIB, resident_bytes

    c = Components.from_shape(cfg, shape)
    weights = resident_bytes(c.policy)
    trainable = c.transformer(trainable=True, checkpointing=cfg.learner.gradient_checkpointing)
    g = cfg.sampler.guidance_scale
    return {"weights": weights / GIB,
            "sampling": (weights + forward_peak(c, chunk, g)) / GIB,
            "scoring": (weights + forward_peak(c, probe_batch, 1.0)) / GIB,
            "update": (weights + train_peak(c, trainable, cfg.grpo.micro_batch, g,
                                            cfg.grpo.beta > 0)) / GIB}


def run_check(cfg, on_gpu: bool, repeats: int) -> dict:
    """The three stages on the SD3.5-M shape (GPU) or the CPU smoke size."""
    from bench.gpu_mode import SD35M_CPU_SHAPE, SD35M_SHAPE, gpu_config, sd35m_model
    from bench.onpolicy import moved_lora
    from bench.workloads import advantages_of, stage_inputs
    from learner.sequential import Batch, update_step
    from policy.merged import merged_lora
    from policy.pipeline import load_lora_state_dict, lora_state_dict
    from policy.sampler import Rollout, sample_rollout
    from rewards.self_confidence import score_rollout

    gcfg, shape, text_len, device_name = gpu_config(cfg, on_gpu)
    if not on_gpu:  # the smoke size keeps the preset's ratios of batch sizes, smaller
        gcfg = gcfg.model_copy(update={"rollout": gcfg.rollout.model_copy(
            update={"micro_batch": 1}), "self_confidence": gcfg.self_confidence.model_copy(
            update={"micro_batch": 2})})
    device = torch.device(device_name)
    reset(device)
    m = sd35m_model(gcfg, shape, text_len, device_name)
    moved_lora(m)  # LoRA B off zero: the adapter (and its merge) does real work
    # the bf16 weights held (the fp32 init before the cast peaks higher, and is gone)
    weights_gib = torch.cuda.memory_allocated(device) / 2**30 if on_gpu else None
    ro, sc, gr = gcfg.rollout, gcfg.self_confidence, gcfg.grpo
    groups = max(1, math.ceil(gr.prompts_per_step / ro.num_actors)) if on_gpu else 1
    prompts = [f"prompt {i}" for i in range(groups)]
    per_sample, ids, seeds = stage_inputs(gcfg, prompts)
    n, chunk = len(per_sample), min(ro.micro_batch or len(per_sample), len(per_sample))
    spec = gcfg.sampler.spec()
    stages = {}

    def sample():  # RolloutWorker.sample: the call's groups in chunks of rollout.micro_batch
        cond = m.encode(per_sample)
        return Rollout.concat([sample_rollout(
            m.pipe, per_sample[s:s + chunk], seeds[s:s + chunk], spec,
            prompt_ids=ids[s:s + chunk], cond=cond.select(slice(s, s + chunk)),
            negative=m.negative) for s in range(0, n, chunk)])

    reset(device)
    rollout, times = timed(sample, device, repeats)
    stages["sampling"] = {"images": n, "seconds": times, "peak_gib": peak_gib(device),
                          "batch": f"{chunk} x CFG"}
    cond = m.encode(rollout.prompts)
    probes = sc.num_probes * gr.group_size
    probe_batch = min(sc.micro_batch or probes, probes)
    for merge in (False, True):
        def score(merge=merge):
            with torch.no_grad(), merged_lora(m.transformer) if merge else nullcontext():
                return score_rollout(m.transformer, rollout, cond, gcfg.seed, sc.num_probes,
                                     sc.probe_fraction, sc.delta, sc.aggregation,
                                     micro_batch=sc.micro_batch)[0]
        reset(device)
        reward, times = timed(score, device, repeats)
        stages["scoring" + (", merged LoRA" if merge else "")] = {
            "images": n, "seconds": times, "peak_gib": peak_gib(device),
            "batch": f"{probe_batch} probe latents"}
    adv, group_ids = advantages_of(gcfg, reward, device)
    params = [p for p in m.transformer.parameters() if p.requires_grad]
    start = {k: v.detach().clone() for k, v in lora_state_dict(m.transformer).items()}
    if gcfg.learner.gradient_checkpointing:
        m.transformer.enable_gradient_checkpointing()
    for recompute in (False, True):
        ucfg = gcfg.model_copy(update={"learner": gcfg.learner.model_copy(
            update={"recompute_old_logprobs": recompute})})

        def update(ucfg=ucfg):  # every repetition from the weights that sampled
            load_lora_state_dict(m.transformer, {k: v.clone() for k, v in start.items()})
            optimizer = torch.optim.AdamW(params, lr=gr.lr, weight_decay=gr.weight_decay)
            return update_step(m.pipe, ucfg, Batch(rollout, cond, group_ids), adv, m.negative,
                               optimizer, params)
        reset(device)
        metrics, times = timed(update, device, repeats)
        stages["update" + (", recompute old log-probs" if recompute else "")] = {
            "images": n, "seconds": times, "peak_gib": peak_gib(device),
            "batch": f"{gr.micro_batch} x CFG",
            "first_ratio_max_dev": metrics["loss/first_ratio_max_dev"],
            "clip_fraction": metrics["loss/clip_fraction"], "clip_range": gr.clip_range}
    used = None
    if on_gpu:
        free, total = torch.cuda.mem_get_info(device)
        used = (total - free) / 2**30  # with the CUDA context and the allocator's cache
    return {"measured_on_gpu": on_gpu, "device": torch.cuda.get_device_name(device)
            if on_gpu else "cpu (smoke size)", "dtype": gcfg.model.dtype,
            "shape": "SD3.5-M, 512 px" if on_gpu else "CPU smoke size (2 layers, 64 px)",
            "text_len": text_len, "weights_gib": weights_gib, "device_used_gib": used,
            "estimate_gib": estimates(gcfg, SD35M_SHAPE if on_gpu else SD35M_CPU_SHAPE,
                                      chunk, probe_batch),
            "stages": stages, "torch": torch.__version__}


def report(r: dict) -> str:
    est = r["estimate_gib"]
    lines = [f"GPU check: {r['shape']}, {r['dtype']}, on {r['device']} (torch {r['torch']})"]
    if not r["measured_on_gpu"]:
        lines.append("NOT GPU FIGURES: no GPU here, so this ran the CPU smoke size. On a GPU "
                     "it measures, at SD3.5-M's shape at 512 px in bf16 and the preset's "
                     "batch sizes: images/s of each stage, each stage's peak "
                     "torch.cuda.max_memory_allocated against the memory model, and the "
                     "first ratio on-policy with and without recompute_old_logprobs.")
    lines.append(f"{'stage':40s} {'batch':>18s} {'images/s':>9s} {'peak GiB':>9s} "
                 f"{'model GiB':>9s} {'first |r-1|':>11s} {'clipped':>7s}")
    for name, s in r["stages"].items():
        rate = s["images"] / statistics.median(s["seconds"])
        model = est.get(name.split(",")[0], float("nan"))
        peak = "-" if s["peak_gib"] is None else f"{s['peak_gib']:.2f}"
        dev = s.get("first_ratio_max_dev")
        lines.append(f"{name:40s} {s['batch']:>18s} {rate:9.2f} {peak:>9s} {model:9.2f} "
                     + (f"{dev:11.2e} {s['clip_fraction']:7.0%}" if dev is not None else ""))
    if r["weights_gib"] is not None:
        lines.append(f"transformer + LoRA weights held: {r['weights_gib']:.2f} GiB "
                     f"(memory model: {est['weights']:.2f})")
    if r["device_used_gib"] is not None:
        lines.append(f"device memory in use at the end (context + cache): "
                     f"{r['device_used_gib']:.2f} GiB")
    return "\n".join(lines)


# What the lent GPU machines' image lacks, or has at versions too far from the lock's
# (its package list, as the device notes give it: torch, numpy, pillow, PyYAML,
# tokenizers, safetensors, accelerate and the rest are there): ~23 MiB of wheels for
# Python 3.12, which with the ~21 MiB tree stays under the 64 MiB a call may carry.
CARRY = ("diffusers", "peft", "transformers", "huggingface_hub", "pydantic", "pydantic_core",
         "annotated-types", "typing-inspection")


def wheelhouse(directory: Path, python_version: str, names=CARRY) -> None:
    """Download ``names`` at this environment's (requirements.lock's) versions as wheels
    for ``python_version`` on manylinux x86_64, without their dependencies (the target
    has them: :func:`needed_packages` lists the whole set)."""
    import subprocess
    from importlib.metadata import version

    wanted = [f"{n}=={version(n)}" for n in names]
    directory.mkdir(parents=True, exist_ok=True)
    platforms = [f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64",
                                             "manylinux_2_17_x86_64", "manylinux2014_x86_64")]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "--python-version", python_version, "--implementation", "cp", *platforms,
                    "--dest", str(directory), *wanted], check=True)
    size = sum(p.stat().st_size for p in directory.glob("*.whl")) / 2**20
    print(f"{directory}: {len(wanted)} packages, {size:.1f} MiB; on the GPU machine:\n"
          f"  python3 -m pip install -q --no-index --no-deps --target /tmp/site "
          f"{directory}/*.whl && export PYTHONPATH=/tmp/site")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs/sd35m_solace.yaml")
    parser.add_argument("--cpu", action="store_true", help="the CPU smoke size even on a GPU")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per stage")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    parser.add_argument("--wheelhouse", type=Path, help="only download the wheels it needs")
    parser.add_argument("--python-version", default="3.12",
                        help="with --wheelhouse: the target's Python (the lent machines': 3.12)")
    args = parser.parse_args(argv)
    if args.wheelhouse:
        return wheelhouse(args.wheelhouse, args.python_version)
    from learner.config import load_config

    on_gpu = torch.cuda.is_available() and not args.cpu
    results = run_check(load_config(args.config), on_gpu, args.repeats)
    results["command"] = "python -m bench.gpu_check " + " ".join(argv or sys.argv[1:])
    print(report(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
