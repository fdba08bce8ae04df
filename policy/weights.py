"""LoRA weights as one flat, versioned buffer: what the learner publishes to the actors.

Pushing a state dict parameter by parameter, or by value to each actor, is slow
(docs/design.md trap 6): the learner flattens the adapter into one contiguous fp32 numpy
array, ``ray.put``s it once, and hands the reference to every actor. numpy arrays are
read zero-copy from Ray's object store, so an actor on the same node maps the buffer
rather than copying it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class FlatWeights:
    """A LoRA state dict packed into one buffer, tagged with its weight version."""

    version: int
    buffer: np.ndarray  # [n] float32
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes


def flatten_weights(state: dict[str, torch.Tensor], version: int) -> FlatWeights:
    """Pack ``state`` (sorted by name, so every rank packs the same layout) into fp32."""
    names = tuple(sorted(state))
    parts = [state[n].detach().to("cpu", torch.float32).reshape(-1) for n in names]
    buffer = torch.cat(parts).numpy() if parts else np.zeros(0, np.float32)
    return FlatWeights(version, buffer, names, tuple(tuple(state[n].shape) for n in names))


def unflatten_weights(flat: FlatWeights, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The state dict back, as tensors on ``device`` (copies: the buffer may be read-only)."""
    out, offset = {}, 0
    source = torch.from_numpy(np.array(flat.buffer, copy=True))
    for name, shape in zip(flat.names, flat.shapes, strict=True):
        size = int(np.prod(shape)) if shape else 1
        out[name] = source[offset:offset + size].view(shape).to(device, dtype)
        offset += size
    if offset != flat.buffer.size:
        raise ValueError(f"flat buffer holds {flat.buffer.size} values but the layout needs {offset}")
    return out
