"""Peak memory of a workload without running it, and the shapes of SD3.5-M's components.

:func:`traced_peak` runs a function on *fake* tensors (``FakeTensorMode``: shapes, dtypes
and strides, no data, no compute) and counts the bytes of every tensor storage created
inside while it is alive (a weak reference tells when one is freed): the peak of live
bytes is what the workload adds to the memory its module already holds. Kernels that
allocate scratch memory outside torch's tensors (cuBLAS, cuDNN workspaces) are not
seen; ``tests/test_memory.py`` checks the count against a measured CPU peak.

:func:`build_fake` instantiates a module on the meta device and gives it fake storage,
so SD3.5-M's 2.2 B-parameter transformer and T5-XXL cost nothing to "build" here. The
SD3.5-M component configs below are the published ones (the weights are gated and
cannot be downloaded on the development machines).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GIB = 2**30

# SD3.5-Medium's text encoders and VAE (the configs of stabilityai/stable-diffusion-3.5-medium):
# CLIP-L/14 and OpenCLIP bigG/14 text towers with projection, the T5 v1.1 XXL encoder, and
# the 16-channel VAE. The transformer's shape is bench.gpu_mode.SD35M_SHAPE.
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768,
              num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
              hidden_act="quick_gelu")
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, projection_dim=1280,
              num_hidden_layers=32, num_attention_heads=20, max_position_embeddings=77,
              hidden_act="gelu")
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
              num_heads=64, relative_attention_num_buckets=32, feed_forward_proj="gated-gelu",
              is_encoder_decoder=False, use_cache=False)
VAE_SD35 = dict(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512), norm_num_groups=32,
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024,
                scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                use_post_quant_conv=False)


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the tensor storages created inside it while they are alive."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()  # ids of storages alive and counted

    def _freed(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # A view or an in-place result shares an input's storage: nothing new (a view of
        # a weight, e.g. the cropped positional embedding, is the weight's memory).
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in self._seen or key in inputs:
                continue  # counted already, or memory that existed before the op
            nbytes = storage.nbytes()
            self._seen.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, key, nbytes)
        return out


def build_fake(make: Callable[[], torch.nn.Module], mode: Any) -> torch.nn.Module:
    """``make()`` on the meta device, then fake storage on the CPU inside ``mode``."""
    with torch.device("meta"):
        module = make()
    with mode:
        return module.to_empty(device="cpu")


def fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    # Parameters are made on the meta device first, then faked: allow them as inputs.
    return FakeTensorMode(allow_non_fake_inputs=True)


class FlashAttention(TorchFunctionMode):
    """``scaled_dot_product_attention`` as the fused (flash) kernel, which keeps the output
    and one log-sum-exp per query instead of the ``S x S`` score matrix. On fake tensors
    torch would take the unfused math path, which GPUs (and this CPU, for real tensors)
    do not take for these shapes."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            if kwargs.get("attn_mask") is None and len(args) < 4:
                return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    q, k, v, kwargs.get("dropout_p", 0.0), kwargs.get("is_causal", False),
                    scale=kwargs.get("scale"))[0]
        return func(*args, **kwargs)


def traced_peak(run: Callable[[], object], mode: Any) -> int:
    """Peak bytes of the tensors ``run`` creates (inside the fake ``mode``), weights not
    counted (they exist before it starts)."""
    with mode, FlashAttention():
        counter = LiveBytes()
        with counter:
            result = run()
        del result
    return counter.peak


def resident_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers, in the dtypes they have."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def numel(module: torch.nn.Module, trainable: bool | None = None) -> int:
    return sum(p.numel() for p in module.parameters()
               if trainable is None or p.requires_grad == trainable)


def text_encoders(dtype: torch.dtype) -> dict[str, Callable[[], torch.nn.Module]]:
    """Makers of SD3.5-M's three text encoders (transformers' classes), in ``dtype``."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    return {
        "CLIP-L": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L)).to(dtype),
        "CLIP-G": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)).to(dtype),
        "T5-XXL": lambda: T5EncoderModel(T5Config(**T5_XXL)).to(dtype),
    }


def sd35m_vae(dtype: torch.dtype) -> Callable[[], torch.nn.Module]:
    from diffusers import AutoencoderKL

    return lambda: AutoencoderKL(**VAE_SD35).to(dtype)


def measured_peak(run: Callable[[], object]) -> int:
    """Peak bytes the process's resident memory grows by while ``run()`` runs (Linux).

    The kernel's high-water mark (``VmHWM``) is reset first (``/proc/self/clear_refs``)
    and freed heap memory returned to the system (``malloc_trim``). Run it in a process
    started with ``MALLOC_MMAP_THRESHOLD_`` small (see :data:`MEASURE_ENV`), so that every
    tensor-sized block is its own mapping and goes back to the system when freed:
    resident memory then follows the live tensors.
    """
    import ctypes
    import gc

    def status(key: str) -> int:
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith(key + ":"))
        return int(line.split()[1]) * 1024

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident size
    result = run()
    peak = status("VmHWM")
    del result
    return peak - before


# The environment :func:`measured_peak` needs (glibc reads it at process start).
MEASURE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def cpu_check(dtype: str = "float32", grad: bool = False, checkpointing: bool = False,
              batch: int = 8, side: int = 64) -> dict[str, float]:
    """The traced estimate of one transformer call at a small SD3.5-M-like shape, against
    two measurements of the same call run for real on this CPU (MiB): the peak of live
    tensors over the real kernels (:class:`LiveBytes` on real tensors) and the growth of
    the process's resident memory (:func:`measured_peak`; start the process with
    :data:`MEASURE_ENV`). The resident figure counts only pages written, so it reads low
    where a kernel leaves part of a buffer untouched (seen in bf16 on CPU)."""
    from diffusers import SD3Transformer2DModel

    from bench.gpu_mode import SD35M_CPU_SHAPE
    from policy.pipeline import DTYPES, LoraSpec, add_lora

    torch_dtype = DTYPES[dtype]

    def make():
        t = SD3Transformer2DModel(**dict(SD35M_CPU_SHAPE, sample_size=side)).to(torch_dtype)
        t.requires_grad_(False)
        add_lora(t, LoraSpec(rank=32, alpha=64))
        if checkpointing:
            t.enable_gradient_checkpointing()
        return t

    def work(t):
        def run():
            x = torch.randn(batch, 16, side, side, dtype=torch_dtype)
            e = torch.randn(batch, 93, 4096, dtype=torch_dtype)
            p = torch.randn(batch, 2048, dtype=torch_dtype)
            ts = torch.full((batch,), 500.0)
            with torch.set_grad_enabled(grad):
                out = t(hidden_states=x, timestep=ts, encoder_hidden_states=e,
                        pooled_projections=p, return_dict=False)[0]
                if grad:
                    out.float().square().mean().backward()
                    for q in t.parameters():
                        q.grad = None
                    out = None
            return out
        return run

    mode = fake_mode()
    estimate = traced_peak(work(build_fake(make, mode)), mode)
    real = make()
    with torch.no_grad():
        for q in real.parameters():
            q.normal_(0, 0.02)
    work(real)()  # first-call allocations (thread pools, caches) out of the way
    counter = LiveBytes()
    with counter:
        work(real)()
    resident = min(measured_peak(work(real)) for _ in range(2))
    mib = 2**20
    return {"estimate_mib": estimate / mib, "live_tensors_mib": counter.peak / mib,
            "resident_mib": resident / mib}
