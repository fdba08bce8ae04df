"""The short-lived actor that builds a run's prompt table (``model.prompt_table``).

It loads the pipeline's text encoders (no VAE; no transformer unless the model has no
T5, whose zero slots diffusers sizes from the transformer's config), encodes every
prompt the run will use, and hands back a ``policy.prompt_table.PromptTable``; the
driver puts the table in the object store and kills the actor before the rollout,
reward and learner actors start, so its memory is free for them.
"""

from __future__ import annotations

from collections.abc import Sequence

from policy.pipeline import build_pipeline
from policy.prompt_table import PromptTable

GIB = 2**30


class PromptEncoder:
    """The text encoders of ``model_path``, building prompt tables."""

    def __init__(self, model_path: str, dtype: str, device: str, num_threads: int) -> None:
        self.pipe = build_pipeline(model_path, dtype, device, num_threads, denoiser=False)

    def build(self, prompts: Sequence[str], max_sequence_length: int, max_gib: float,
              batch: int = 64) -> PromptTable:
        """The table of ``prompts`` (and the empty prompt); refused, after one batch shows
        the size per prompt, if the whole table would exceed ``max_gib``."""
        unique = list(dict.fromkeys(["", *prompts]))
        probe = PromptTable.build(self.pipe, unique[:1], max_sequence_length)
        need = probe.nbytes * len(unique) / GIB
        if need > max_gib:
            raise ValueError(
                f"the prompt table of {len(unique)} prompts would take {need:.1f} GiB "
                f"({probe.nbytes / 2**20:.2f} MiB a prompt) > model.prompt_table_max_gib = "
                f"{max_gib:g}; raise it if the object store has room, use fewer prompts, "
                "or set model.prompt_table: false (every actor then holds the text encoders)")
        return PromptTable.build(self.pipe, unique, max_sequence_length, batch)
