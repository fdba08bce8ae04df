"""The LoRA merged into the transformer's weights for a block of forwards, then undone exactly.

peft runs an unmerged adapter as two extra small matmuls beside every adapted linear
layer; merged (``W + s B A``) a forward costs what the base model's does. That is safe
where the forward's exact value does not enter the policy ratio: the self-confidence
reward's probes (issue #17: merged bf16 LoRA moved sampled log-probs by ~3e-4, more
than the clip range, so sampling and training stay unmerged).

peft's own ``unmerge`` subtracts the delta again, which in bf16 does not give the base
weights back (``round(round(W + d) - d) != W``) and would drift a little with every
weight version; :func:`merged_lora` keeps the adapted layers' base weights (on the CPU,
so the GPU holds no second copy) and copies them back. Imports torch and peft only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from peft.tuners.tuners_utils import BaseTunerLayer


@contextlib.contextmanager
def merged_lora(transformer: torch.nn.Module) -> Iterator[None]:
    """Forwards inside the block run with the active adapter merged into the weights.

    On exit the base weights are restored bit for bit and peft's record of the merge is
    cleared, so a new adapter version can be loaded and merged next time. A no-op for a
    model without an active adapter.
    """
    layers = [m for m in transformer.modules()
              if isinstance(m, BaseTunerLayer) and not m.disable_adapters and not m.merged]
    if not layers:
        yield
        return
    saved = [layer.get_base_layer().weight.detach().to("cpu", copy=True) for layer in layers]
    for layer in layers:
        layer.merge()
    try:
        yield
    finally:
        with torch.no_grad():
            for layer, weight in zip(layers, saved, strict=True):
                layer.get_base_layer().weight.copy_(weight)
                layer.merged_adapters.clear()  # peft reads "merged" from this list
