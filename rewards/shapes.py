"""ShapesEval as a reward scorer: ``(images, prompts, metadata) -> partial credit [N]``.

The common scorer call of ``actors.reward.ExternalRewardWorker``; configure it as
``external_rewards: [{name: shapes, target: "rewards.shapes:ShapesReward"}]``.
Partial credit is the reward (strict correctness is too sparse to rank a group by);
strict correctness stays the evaluation metric. ``credit="soft"`` (``kwargs: {credit:
soft}``) gives ShapesEval's soft credit instead: the same formula with each blob counted
as a class to the degree it resembles it, a dense reward that moves with every step
towards a recognisable shape (``shapes.evaluate``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from shapes.evaluate import ShapesEval


class ShapesReward:
    """Partial-credit ShapesEval score of each image against its prompt's metadata."""

    def __init__(self, position_threshold: float = 0.1, credit: str = "partial") -> None:
        if credit not in ("partial", "soft"):
            raise ValueError(f"ShapesReward credit must be 'partial' or 'soft', got {credit!r}")
        self.grader = ShapesEval(position_threshold=position_threshold)
        self.credit = credit

    def __call__(self, images: np.ndarray, prompts: Sequence[str], metadata: Sequence[dict]
                 ) -> np.ndarray:
        for prompt, meta in zip(prompts, metadata, strict=True):
            if meta.get("prompt") != prompt or "include" not in meta:
                raise ValueError(f"ShapesReward needs the shapes-world metadata of {prompt!r}; "
                                 "train on a prompt file of shapes/data")
        scores = self.grader(images, list(metadata))
        return getattr(scores, self.credit).astype(np.float32)
