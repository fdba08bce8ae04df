"""Text conditioning computed once for a fixed prompt set.

A run's prompts are known before it starts (the training and evaluation files, plus the
empty prompt CFG uses). With ``model.prompt_table`` on, one short-lived process encodes
them all with the pipeline's text encoders, and the rollout, reward and learner actors
look their conditioning up in the table instead of holding the text encoders: for SD3
that is CLIP-L, CLIP-G and T5-XXL, ~10 GB of weights in bf16 per actor.

The table keeps each prompt's conditioning exactly as the encoders returned it, in their
dtype (bf16 as its raw 16 bits, which numpy has no type for), so a looked-up batch equals
the one the pipeline would have encoded, up to the batch size's effect on the encoders'
kernels. Size: prompts x tokens x width x 2 bytes in bf16; SD3 at 256 T5 slots is
333 x 4096, 2.7 MB a prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from policy.sampler import Conditioning, encode_prompts

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass(frozen=True)
class PromptTable:
    """Conditioning of every prompt in ``prompts``: rows of ``embeds`` and ``pooled``."""

    prompts: tuple[str, ...]  # unique; the row order of the arrays
    embeds: np.ndarray  # [P, L, D]: the joint-attention tokens (CLIP then T5 slots)
    pooled: np.ndarray  # [P, Q]: the pooled CLIP projections
    dtype: str  # the encoders' dtype; the arrays hold its bits (bf16 as int16)
    max_sequence_length: int  # the T5 slots the table was encoded with

    @classmethod
    def build(cls, pipe, prompts: Sequence[str], max_sequence_length: int,
              batch: int = 64) -> PromptTable:
        """Encode the unique ``prompts`` (and the empty prompt) in batches of ``batch``."""
        unique = tuple(dict.fromkeys(["", *prompts]))
        parts = [encode_prompts(pipe, unique[i:i + batch], max_sequence_length)
                 for i in range(0, len(unique), batch)]
        cond = Conditioning.cat(parts)
        return cls(unique, _bits(cond.embeds), _bits(cond.pooled), DTYPE_NAMES[cond.embeds.dtype],
                   max_sequence_length)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_rows", {p: i for i, p in enumerate(self.prompts)})

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def nbytes(self) -> int:
        return self.embeds.nbytes + self.pooled.nbytes

    def encode(self, prompts: Sequence[str], device: str | torch.device = "cpu") -> Conditioning:
        """The conditioning of ``prompts``, in order, as ``encode_prompts`` would give it."""
        missing = [p for p in prompts if p not in self._rows]
        if missing:
            raise KeyError(f"{len(missing)} prompt(s) are not in the prompt table of "
                           f"{len(self)} prompts, e.g. {missing[0]!r}; the table holds the "
                           "run's training and evaluation prompts only (model.prompt_table)")
        rows = np.fromiter((self._rows[p] for p in prompts), dtype=np.int64, count=len(prompts))
        return Conditioning(self._tensor(self.embeds[rows], device),
                            self._tensor(self.pooled[rows], device))

    def _tensor(self, bits: np.ndarray, device) -> torch.Tensor:
        out = torch.from_numpy(bits)  # a copy already (fancy indexing)
        if self.dtype == "bfloat16":
            out = out.view(torch.bfloat16)
        return out.to(device)


def _bits(x: torch.Tensor) -> np.ndarray:
    """``x`` as a numpy array of the same bits (bf16 as int16)."""
    x = x.detach().cpu()
    return (x.view(torch.int16) if x.dtype == torch.bfloat16 else x).numpy()


class PipelineText:
    """The same interface over a pipeline that holds its text encoders."""

    def __init__(self, pipe, max_sequence_length: int) -> None:
        self.pipe, self.max_sequence_length = pipe, max_sequence_length

    def encode(self, prompts: Sequence[str], device: str | torch.device | None = None) -> Conditioning:
        return encode_prompts(self.pipe, prompts, self.max_sequence_length)


def text_source(pipe, max_sequence_length: int, table: PromptTable | None):
    """What an actor encodes prompts with: ``table`` if given, else its own pipeline."""
    if table is None:
        return PipelineText(pipe, max_sequence_length)
    if table.max_sequence_length != max_sequence_length:
        raise ValueError(f"the prompt table was encoded with max_sequence_length "
                         f"{table.max_sequence_length}, this actor uses {max_sequence_length}")
    return table
