"""An exponential moving average of the LoRA weights, for evaluation and checkpoints.

Flow-GRPO evaluates and saves an EMA of its LoRA rather than the raw weights: a single
update is mostly gradient noise (docs/learning.md), and the average keeps the direction
that recurs. Here the driver keeps the average of the published flat buffers
(``policy.weights.FlatWeights``; a LoRA is megabytes), updated every ``ema.every`` steps:

    ema <- decay * ema + (1 - decay) * weights

It starts from the weights at the run's first version, so a run that has not moved has
an EMA equal to its weights.

An EMA is not a weight version of the run: actors cache weights by version, so it is
handed to them under its own id, :func:`ema_version`, past any training version (ids are
non-negative: seeds derive from them, the same for the EMA of a version in every run).
"""

from __future__ import annotations

import numpy as np

from policy.weights import FlatWeights

EMA_IDS = 1 << 40  # no run trains this many versions


def ema_version(version: int) -> int:
    """The id the EMA at training version ``version`` travels under."""
    return EMA_IDS + version


class WeightsEMA:
    """The running average of flat LoRA buffers, all of one layout."""

    def __init__(self, decay: float, start: FlatWeights) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.buffer = np.array(start.buffer, dtype=np.float64)  # float64: no drift over steps
        self.names, self.shapes = start.names, start.shapes
        self.version = start.version  # the training version last averaged in

    def update(self, flat: FlatWeights) -> None:
        if flat.names != self.names or flat.buffer.size != self.buffer.size:
            raise ValueError("EMA update with weights of another layout")
        self.buffer *= self.decay
        self.buffer += (1.0 - self.decay) * np.asarray(flat.buffer, dtype=np.float64)
        self.version = flat.version

    def flat(self) -> FlatWeights:
        """The average as a flat buffer, under :func:`ema_version` of the last version."""
        return FlatWeights(ema_version(self.version), self.buffer.astype(np.float32),
                           self.names, self.shapes)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "buffer": self.buffer, "version": self.version}

    def load_state_dict(self, state: dict) -> None:
        if state["buffer"].size != self.buffer.size:
            raise ValueError("checkpoint EMA has another layout than this run's LoRA")
        self.buffer = np.array(state["buffer"], dtype=np.float64)
        self.version = state["version"]
