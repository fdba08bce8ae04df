"""The DeepSpeed learner: data-parallel ranks that apply the Flow-GRPO update to the LoRA.

``LearnerRank`` is a plain class (one data-parallel rank); the driver-side
``LearnerGroup`` wraps it with ``ray.remote`` once, starts ``num_ranks`` of them, and
drives one optimizer step per ``train_step`` over the step's kept samples, split
evenly across ranks. ``deepspeed`` and ``ray`` are imported inside methods, so
importing this module loads neither.

How a step is distributed (and why it equals the single-process update):

* Every rank builds the same pipeline and the same LoRA init (``LoraSpec.init_seed``),
  receives the rollout by ``ObjectRef`` and trains its shard with
  :func:`learner.update.accumulate_grpo_gradients`, which weights each loss by the
  chunk's share of the GLOBAL batch. The shards' gradients then *sum* to the
  single-process gradient. DeepSpeed *averages* gradients over ranks, so each rank
  hands ``world_size * loss`` to ``engine.backward``.
* ZeRO-2 reduces gradients inside every backward, so all ranks must run the same
  number of backward passes (with 3 vs 2 passes a gloo rank aborts): the group passes
  one ``num_micro_batches`` to every rank and a short shard pads with zero-weighted
  micro-batches.

The DeepSpeed setup that works on CPU (gloo) inside Ray actors with 0.19.8:

* ``deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False`` before
  ``init_distributed`` (else a 30+ s JIT build of the shm op), ``dist_backend="gloo"``
  on CPU and ``"nccl"`` on CUDA, ``auto_mpi_discovery=False``; env ``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK=0`` (Ray gives each actor its own GPU, so the local
  device is always 0), ``MASTER_ADDR`` and ``MASTER_PORT`` (found by rank 0).
* ``{"optimizer": {"type": "AdamW", "params": {..., "torch_adam": true}}}``: plain
  ``torch.optim.AdamW`` (no fused_adam JIT build), the same optimizer as the sequential
  loop; ``"gradient_clipping": max_grad_norm``; ``"zero_optimization": {"stage": 0|1|2}``
  (3 is refused: it partitions the weights that ``weights()`` publishes).
* Gradient accumulation: ``"gradient_accumulation_steps": 1`` (so DeepSpeed does not
  scale losses by 1/gas; the update does its own weighting), with
  ``engine.set_gradient_accumulation_boundary(False)`` before every backward but the
  last, ``True`` before the last, then one ``engine.step()``. ZeRO-0 then all-reduces
  once, in the last backward; ZeRO-2 reduces in every backward and steps once.
  ``train_micro_batch_size_per_gpu`` is nominal (1): batches come from ``train_step``,
  not a DeepSpeed data loader.
* Forwards go through the engine (``engine(...)``, via ``predict_velocity``), DeepSpeed's
  documented path (its forward hooks run the backward prologue). With 0.19.8 ZeRO-2
  gave bit-identical weights through the bare module too; do not rely on that.
* Measured on the 2-core CPU: ZeRO-0, 1 and 2, fp32 and bf16, all train and resume
  bit-exactly; 2 ranks vs 1 rank differ by ~1e-7 in the weights (summation order).

Not supported: ZeRO-3, fp16 (needs loss scaling), and resuming with another number of
ranks or ZeRO stage (optimizer states are per-rank partitions).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import socket
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from learner.config import GrpoConfig
from learner.update import accumulate_grpo_gradients, merge_metrics, recompute_old_log_probs
from policy.pipeline import (
    LoraSpec,
    add_lora,
    build_pipeline,
    load_lora_state_dict,
    lora_state_dict,
)
from policy.prompt_table import PromptTable, text_source
from policy.sampler import Rollout
from policy.weights import FlatWeights, flatten_weights, unflatten_weights

if TYPE_CHECKING:
    import ray

# Share of the custom resource ``learner`` each rank asks for, when the cluster has it:
# a marker that pins ranks to learner nodes without limiting how many fit on one.
LEARNER_RESOURCE_SHARE = 0.01


def find_free_port() -> int:
    """A TCP port that is free on this node now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def deepspeed_config(grpo: GrpoConfig, zero_stage: int, world_size: int,
                     dtype: str) -> dict[str, Any]:
    """The DeepSpeed config of a rank; see the module docstring for why each entry."""
    if zero_stage not in (0, 1, 2):
        raise ValueError(f"zero_stage must be 0, 1 or 2, got {zero_stage}; ZeRO-3 would partition "
                         "the LoRA weights that the learner publishes")
    if dtype == "float16":
        raise ValueError("model.dtype float16 needs loss scaling, which the learner does not do; "
                         "use bfloat16 or float32")
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world_size,
        "gradient_clipping": grpo.max_grad_norm,
        "optimizer": {"type": "AdamW", "params": {
            "lr": grpo.lr, "weight_decay": grpo.weight_decay, "torch_adam": True}},
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": dtype == "bfloat16"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def shard_rollout(rollout: Rollout, shard: np.ndarray, device: str) -> Rollout:
    """The samples ``shard`` of a numpy rollout, as a torch rollout on ``device``.

    Indexing in numpy copies out of Ray's read-only object store before torch sees it.
    """
    per_sample = ("latents", "log_probs", "seeds", "prompt_ids")
    arrays = {k: np.asarray(getattr(rollout, k))[shard] for k in per_sample}
    sub = replace(rollout, **arrays, sigmas=np.array(rollout.sigmas),
                  prompts=[rollout.prompts[i] for i in shard.tolist()])
    return sub.torch(device)


def rollout_span(shard: np.ndarray, sizes: list[int]) -> tuple[int, int, int]:
    """``(first, last, offset)``: the rollouts ``first..last`` (of ``sizes`` samples each,
    in order) that hold the sorted sample indices ``shard``, and the index of the first
    one's first sample. An empty shard takes rollout 0 (its rank runs zero-weighted passes
    on a sample, in lockstep with the others)."""
    bounds = np.cumsum([0, *sizes])
    if len(shard) == 0:
        return 0, 0, 0
    if shard[0] < 0 or shard[-1] >= bounds[-1]:
        raise ValueError(f"samples {shard[0]}..{shard[-1]} are outside the {bounds[-1]} "
                         "samples the rollouts hold")
    first = int(np.searchsorted(bounds, shard[0], side="right")) - 1
    last = int(np.searchsorted(bounds, shard[-1], side="right")) - 1
    return first, last, int(bounds[first])


@contextlib.contextmanager
def lora_swapped(transformer: torch.nn.Module, flat: FlatWeights | None, device: str):
    """The LoRA weights of ``flat`` in place of the transformer's inside the block, the
    current ones copied back exactly after (no optimizer step may run inside). None: the
    current weights stay."""
    if flat is None:
        yield
        return
    current = {k: v.detach().clone() for k, v in lora_state_dict(transformer).items()}
    load_lora_state_dict(transformer, unflatten_weights(flat, device))
    try:
        yield
    finally:
        load_lora_state_dict(transformer, current)


class LearnerRank:
    """One data-parallel rank: the frozen pipeline, its LoRA, and a DeepSpeed engine.

    Two-phase start: ``__init__`` builds the model (no communication), ``connect`` joins
    the process group once rank 0 has named its address (``master_address``).
    """

    def __init__(self, rank: int, world_size: int, *, lora: LoraSpec, grpo: GrpoConfig,
                 model_path: str = "tiny-random", dtype: str = "float32", device: str = "cpu",
                 num_threads: int = 1, zero_stage: int = 2, max_sequence_length: int = 8,
                 gradient_checkpointing: bool = False, prompt_table: PromptTable | None = None,
                 recompute_old_logprobs: bool = False):
        self.rank, self.world_size, self.device = rank, world_size, device
        self.recompute_old_logprobs = recompute_old_logprobs
        self.grpo, self.zero_stage, self.dtype = grpo, zero_stage, dtype
        self.max_sequence_length = max_sequence_length
        self.config = deepspeed_config(grpo, zero_stage, world_size, dtype)  # fail before building
        torch.set_num_threads(max(1, num_threads))  # inside an actor torch defaults to num_cpus
        self.pipe = build_pipeline(model_path, dtype, device, num_threads,
                                   text_encoders=prompt_table is None)
        self.text = text_source(self.pipe, max_sequence_length, prompt_table)
        names = set(add_lora(self.pipe.transformer, lora))  # same init on every rank
        if gradient_checkpointing:  # activations recomputed in the backward (less memory)
            self.pipe.transformer.enable_gradient_checkpointing()
        self.params = [p for n, p in self.pipe.transformer.named_parameters() if n in names]
        self.negative = self.text.encode([""], device)  # CFG's empty prompt
        self.engine = None
        self.step = 0  # optimizer steps taken

    def master_address(self) -> tuple[str, int]:
        """This node's address and a free port on it, for rank 0 to host the rendezvous."""
        import ray

        return ray.util.get_node_ip_address(), find_free_port()

    def connect(self, master_addr: str, master_port: int) -> None:
        """Join the process group and wrap the transformer in a DeepSpeed engine."""
        import deepspeed

        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK="0",
                          MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        # Decline the shared-memory comm op: building it JIT-compiles for 30+ s (docs/design.md §6).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        backend = "nccl" if self.device.startswith("cuda") else "gloo"
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
        # Only the LoRA weights are trainable and handed to the optimizer.
        self.engine, *_ = deepspeed.initialize(
            model=self.pipe.transformer, model_parameters=self.params, config=self.config)

    def train_step(self, advantages: np.ndarray, shard: np.ndarray, steps: list[int],
                   global_count: int, num_micro_batches: int | None, *rollouts: Rollout,
                   behaviour: FlatWeights | None = None) -> dict[str, float]:
        """One optimizer step, this rank training samples ``shard`` of the step's rollouts.

        ``rollouts`` are the step's numpy rollouts in order (Ray resolves each ``ObjectRef``
        passed as a top-level argument), together N samples; ``advantages`` [N] theirs, ``shard`` [n] int indices of the kept samples
        this rank trains, ``global_count`` the kept samples over all ranks. Every rank
        must get the same ``steps`` and ``num_micro_batches`` (default: what this shard
        needs, only right when all shards need the same). With ``recompute_old_logprobs``
        the rollouts' log-probs are recomputed here first, with ``behaviour`` (the weight
        version that sampled them) swapped in; None: with the current weights.
        """
        if self.engine is None:
            raise RuntimeError("LearnerRank.connect must run before train_step")
        t0 = time.perf_counter()
        rollout = Rollout.concat(rollouts)
        shard = np.asarray(shard, dtype=np.int64)
        count = num_micro_batches or max(1, math.ceil(len(shard) / self.grpo.micro_batch))
        # An empty shard still runs (zero-weighted) passes on sample 0, in lockstep.
        rows = shard if len(shard) else np.zeros(1, dtype=np.int64)
        sub = shard_rollout(rollout, rows, self.device)
        cond = self.text.encode(sub.prompts, self.device)
        adv = torch.as_tensor(np.asarray(advantages, np.float32)[rows], device=self.device)  # [n]
        index = torch.arange(len(shard))  # [n] rows of the sub-rollout trained here
        terms, calls = count * len(steps), 0
        recompute_s = 0.0
        if self.recompute_old_logprobs:  # the ratio's denominator from this rank's kernels
            t1 = time.perf_counter()
            with lora_swapped(self.pipe.transformer, behaviour, self.device):
                sub = recompute_old_log_probs(self.engine, sub, cond, self.negative, index,
                                              steps, self.grpo, count)
            recompute_s = time.perf_counter() - t1

        def backward(loss: torch.Tensor) -> None:
            nonlocal calls
            calls += 1
            # Reduce and allow a step only after the last of this step's backward passes.
            self.engine.set_gradient_accumulation_boundary(calls == terms)
            # DeepSpeed averages gradients over ranks; the update's weights make them sum.
            self.engine.backward(loss * self.world_size)

        metrics = accumulate_grpo_gradients(
            self.engine, sub, cond, self.negative, adv, index, steps, self.grpo, backward,
            global_count, count)
        norm = self._reduced_grad_norm() if self.zero_stage == 0 else None
        self.engine.step()  # clip to max_grad_norm, AdamW, zero the gradients
        self.step += 1
        if norm is None:  # ZeRO >= 1 records the global norm it clipped by
            norm = float(self.engine.get_global_grad_norm())
        metrics["loss/grad_norm"] = norm
        metrics["timing/update_s"] = time.perf_counter() - t0
        if self.recompute_old_logprobs:
            metrics["timing/recompute_s"] = recompute_s
        return metrics

    def _reduced_grad_norm(self) -> float:
        """ZeRO-0 does not record the norm it clips by; after the last backward the
        ``.grad``s are all-reduced, so the norm is the global one."""
        grads = [p.grad.detach().float().norm() for p in self.params if p.grad is not None]
        return float(torch.stack(grads).norm()) if grads else 0.0

    def weights(self, version: int) -> FlatWeights:
        """The LoRA weights as one flat versioned buffer (full on every rank for ZeRO <= 2)."""
        return flatten_weights(lora_state_dict(self.pipe.transformer), version)

    def resident(self) -> list[str]:
        """The pipeline components this rank holds."""
        return sorted(name for name, value in self.pipe.components.items() if value is not None)

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint of this rank: LoRA weights, the step count, and its optimizer state
        (a partition under ZeRO >= 1) as ``torch.save`` bytes: ZeRO's state holds DeepSpeed
        objects, and the driver must not import deepspeed to store them."""
        lora = lora_state_dict(self.pipe.transformer)
        lora = {k: v.detach().cpu().clone() for k, v in lora.items()}
        buffer = io.BytesIO()
        torch.save(self.engine.optimizer.state_dict(), buffer)
        return {"step": self.step, "lora": lora, "optimizer": buffer.getvalue()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from a :meth:`LearnerGroup.state_dict` checkpoint (all ranks' optimizers)."""
        optimizer_states = state["optimizer"]
        if len(optimizer_states) != self.world_size:
            raise ValueError(f"checkpoint has {len(optimizer_states)} optimizer partitions, this "
                             f"group {self.world_size} ranks: resume with the same number of ranks")
        load_lora_state_dict(self.pipe.transformer, state["lora"])
        # weights_only=False: ZeRO's state pickles DeepSpeed classes; these bytes come from
        # this learner's own ranks (state_dict), never from outside.
        optimizer_states = [torch.load(io.BytesIO(b), weights_only=False) for b in optimizer_states]
        if self.zero_stage == 0:
            self.engine.optimizer.load_state_dict(optimizer_states[self.rank])
        else:  # ZeRO picks this rank's partition and restores its fp32 master copy
            self.engine.optimizer.load_state_dict(optimizer_states, load_optimizer_states=True,
                                                  load_from_fp32_weights=True)
        self.step = state["step"]


class PlacementTimeout(RuntimeError):
    """The learner's ranks could not all be placed in time (a partly placed group would
    hang in ``init_distributed``)."""


class LearnerGroup:
    """Driver side: ``num_ranks`` ``LearnerRank`` actors that train as one learner."""

    def __init__(self, num_ranks: int, *, lora: LoraSpec, grpo: GrpoConfig,
                 model_path: str = "tiny-random", dtype: str = "float32", device: str = "cpu",
                 num_threads: int = 1, num_cpus: float = 1, zero_stage: int = 2,
                 max_sequence_length: int = 8, require_resource: bool = False,
                 gradient_checkpointing: bool = False, placement_timeout_s: float = 600.0,
                 prompt_table=None, recompute_old_logprobs: bool = False):
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if num_ranks < 1:
            raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
        deepspeed_config(grpo, zero_stage, num_ranks, dtype)  # fail here, not in every actor
        self.grpo, self.zero_stage = grpo, zero_stage
        wants = require_resource or "learner" in ray.cluster_resources()
        resources = {"learner": LEARNER_RESOURCE_SHARE} if wants else None
        gpus = 1 if device.startswith("cuda") else 0
        actor = ray.remote(num_cpus=num_cpus, num_gpus=gpus, resources=resources)(LearnerRank)
        # The ranks as one gang: all placed, or none (a rank left pending would hang the
        # others in init_distributed). PACK keeps them on as few nodes as fit.
        bundle = {k: v for k, v in (("CPU", num_cpus), ("GPU", gpus),
                                    *((resources or {}).items())) if v}
        self.placement = placement_group([bundle] * num_ranks, strategy="PACK") if bundle else None
        if self.placement is not None:
            try:
                ray.get(self.placement.ready(), timeout=placement_timeout_s)
            except ray.exceptions.GetTimeoutError:
                remove_placement_group(self.placement)
                raise PlacementTimeout(
                    f"the learner's {num_ranks} ranks ({bundle} each) could not all be placed "
                    f"within learner.placement_timeout_s = {placement_timeout_s:g} s; free or "
                    "add those resources (`ray status` shows what is free), or lower "
                    "learner.num_ranks / learner.num_cpus") from None

        def where(r: int) -> dict:
            if self.placement is None:
                return {}
            return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
                self.placement, placement_group_bundle_index=r)}

        self.ranks = [
            actor.options(**where(r)).remote(
                         r, num_ranks, model_path=model_path, dtype=dtype, device=device,
                         num_threads=num_threads, lora=lora, grpo=grpo, zero_stage=zero_stage,
                         max_sequence_length=max_sequence_length,
                         gradient_checkpointing=gradient_checkpointing, prompt_table=prompt_table,
                         recompute_old_logprobs=recompute_old_logprobs)
            for r in range(num_ranks)
        ]
        # Rank 0 hosts the rendezvous: its node's address and a port free there.
        addr, port = ray.get(self.ranks[0].master_address.remote())
        # All ranks must join at once: init_distributed blocks until the group is complete.
        ray.get([rank.connect.remote(addr, port) for rank in self.ranks])

    def train_step(self, rollouts: ray.ObjectRef | Rollout | list, advantages: np.ndarray,
                   keep: np.ndarray, steps: list[int]) -> dict[str, float]:
        """One optimizer step over the kept samples of the step's rollouts.

        ``rollouts`` is one or a list of ``ObjectRef[Rollout]`` (numpy) or rollouts, in the
        order of ``advantages``; a rollout object is put once here. Returns the merged
        metrics of all ranks."""
        return self.finish_train_step(self.submit_train_step(rollouts, advantages, keep, steps))

    def submit_train_step(self, rollouts: ray.ObjectRef | Rollout | list, advantages: np.ndarray,
                          keep: np.ndarray, steps: list[int],
                          sizes: list[int] | None = None,
                          behaviour: ray.ObjectRef | FlatWeights | None = None,
                          ) -> list[ray.ObjectRef]:
        """Start :meth:`train_step` on every rank; returns the ranks' result refs, so the
        caller can do other work (keep the reward pools busy) until they are ready.

        ``sizes``: the samples in each rollout. With them each rank is sent only the
        rollouts its shard draws from (on a cluster, only those travel to its node);
        without, every rank gets every rollout. ``behaviour``: the weights that sampled
        the rollouts, for ranks that recompute their log-probs (``recompute_old_logprobs``)."""
        refs = [self._as_ref(r) for r in (rollouts if isinstance(rollouts, list) else [rollouts])]
        kept = np.flatnonzero(np.asarray(keep))
        if len(kept) == 0:
            raise ValueError("no kept samples: skip the update when every group was dropped")
        shards = np.array_split(kept, len(self.ranks))  # sizes differ by at most one
        count = max(1, math.ceil(len(shards[0]) / self.grpo.micro_batch))
        advantages = np.asarray(advantages, dtype=np.float32)
        calls = []
        for rank, shard in zip(self.ranks, shards, strict=True):
            first, last, offset = (rollout_span(shard, sizes) if sizes is not None
                                   else (0, len(refs) - 1, 0))
            end = offset + (sum(sizes[first:last + 1]) if sizes is not None else len(advantages))
            calls.append(rank.train_step.remote(
                advantages[offset:end], shard - offset, list(steps), len(kept), count,
                *refs[first:last + 1], behaviour=behaviour))
        return calls

    def finish_train_step(self, refs: list[ray.ObjectRef]) -> dict[str, float]:
        """The merged metrics of a submitted step (waits for it)."""
        import ray

        parts = ray.get(refs)
        metrics = merge_metrics(parts)
        metrics["timing/update_s"] = max(p["timing/update_s"] for p in parts)
        return metrics

    @staticmethod
    def _as_ref(rollout: ray.ObjectRef | Rollout) -> ray.ObjectRef:
        import ray

        if isinstance(rollout, ray.ObjectRef):
            return rollout
        return ray.put(rollout.numpy() if isinstance(rollout.latents, torch.Tensor) else rollout)

    def publish(self, version: int) -> ray.ObjectRef:
        """``ObjectRef[FlatWeights]`` of weight version ``version``, stored once.

        The ref is rank 0's task result: the buffer goes from rank 0 to the object store
        without passing through the driver, after every earlier ``train_step`` (actor
        calls run in order)."""
        return self.ranks[0].weights.remote(version)

    def state_dict(self) -> dict[str, Any]:
        """A checkpoint: rank 0's LoRA and step, every rank's optimizer state."""
        import ray

        states = ray.get([rank.state_dict.remote() for rank in self.ranks])
        return {"step": states[0]["step"], "lora": states[0]["lora"],
                "zero_stage": self.zero_stage, "optimizer": [s["optimizer"] for s in states]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` of a group with the same ranks and ZeRO stage."""
        import ray

        if state["zero_stage"] != self.zero_stage or len(state["optimizer"]) != len(self.ranks):
            raise ValueError(
                f"checkpoint is ZeRO-{state['zero_stage']} on {len(state['optimizer'])} ranks, "
                f"this group ZeRO-{self.zero_stage} on {len(self.ranks)}: resume with the same "
                "layout (optimizer states are per-rank partitions)")
        ref = ray.put(state)
        ray.get([rank.load_state_dict.remote(ref) for rank in self.ranks])

    def shutdown(self) -> None:
        import ray

        for rank in self.ranks:
            ray.kill(rank)
        self.ranks = []
        if getattr(self, "placement", None) is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.placement)
            self.placement = None
