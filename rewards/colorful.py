"""Hasler & Suesstrunk's colourfulness as a reward, ``(images, prompts, metadata) -> [N]``.

Hasler and Suesstrunk (2003), "Measuring colourfulness in natural images", on RGB in
[0, 255]:

    rg = R - G,   yb = (R + G) / 2 - B
    M  = sqrt(std(rg)^2 + std(yb)^2) + 0.3 * sqrt(mean(rg)^2 + mean(yb)^2)

with population statistics over each image's pixels. Gray images score 0; the paper's
"extremely colourful" natural images score above ~109. The reward is ``scale * M`` with
``scale = 0.01``, so natural images fall roughly in [0, 1.5]; saturated fills go further
(half pure red, half pure green: 2.93). It is an easy reward to hack, which is its use:
reproduction experiments whose reward should visibly rise.

Deviations: none in M; the common OpenCV recipe that takes ``|R - G|`` and ``|yb|`` is
not the paper's and is not used. Statistics accumulate in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def colorfulness(images: np.ndarray) -> np.ndarray:
    """float64 ``[N]``: M of each uint8 ``[N, H, W, 3]`` image (unscaled)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"Colorfulness: images must be uint8 [N, H, W, 3], got "
                         f"{images.dtype} {list(images.shape)}")
    rgb = images.reshape(len(images), -1, 3).astype(np.float32)  # [N, HW, 3], exact for uint8
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    rg = r - g  # [N, HW]
    yb = 0.5 * (r + g) - b  # [N, HW]
    # float64 accumulators: a float32 sum over a megapixel loses the variance's low digits.
    std = np.sqrt(rg.var(axis=1, dtype=np.float64) + yb.var(axis=1, dtype=np.float64))
    mean = np.hypot(rg.mean(axis=1, dtype=np.float64), yb.mean(axis=1, dtype=np.float64))
    return std + 0.3 * mean


class Colorfulness:
    """``scale * M`` (Hasler & Suesstrunk, 2003) of each image; prompts are unused."""

    name = "colorfulness"
    version = "1"

    def __init__(self, scale: float = 0.01) -> None:
        self.scale = scale

    def __call__(self, images: np.ndarray, prompts: Sequence[str] | None = None,
                 metadata: Sequence[dict] | None = None) -> np.ndarray:
        return (self.scale * colorfulness(images)).astype(np.float32)
