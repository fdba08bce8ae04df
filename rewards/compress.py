"""DDPO's JPEG (in)compressibility rewards (Black et al., 2023, "Training Diffusion Models
with Reinforcement Learning"), as ``(images, prompts, metadata) -> [N]``.

Each image is JPEG-encoded by PIL at ``quality`` (95, as in DDPO's ``rewards.py``); its
size in kB (bytes / 1000, as DDPO) is the reward of :class:`JpegIncompressibility`, and
its negative that of :class:`JpegCompressibility`. No deviation from DDPO. Deterministic
for a given libjpeg build; sizes can differ by a few bytes between Pillow builds.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image


def jpeg_kilobytes(images: np.ndarray, quality: int) -> np.ndarray:
    """float32 ``[N]``: size in kB of each uint8 ``[N, H, W, 3]`` image saved as JPEG."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"JPEG reward: images must be uint8 [N, H, W, 3], got "
                         f"{images.dtype} {list(images.shape)}")
    sizes = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return np.asarray(sizes, dtype=np.float32)


def _checked_quality(quality: int) -> int:
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG reward: quality must be in [1, 100], got {quality}")
    return quality


class JpegCompressibility:
    """``-(JPEG size in kB)``: higher for images that compress well (flat, smooth)."""

    name = "jpeg_compressibility"
    version = "1"

    def __init__(self, quality: int = 95) -> None:
        self.quality = _checked_quality(quality)

    def __call__(self, images: np.ndarray, prompts: Sequence[str] | None = None,
                 metadata: Sequence[dict] | None = None) -> np.ndarray:
        return -jpeg_kilobytes(images, self.quality)


class JpegIncompressibility:
    """``+(JPEG size in kB)``: higher for images that compress badly (detailed, noisy)."""

    name = "jpeg_incompressibility"
    version = "1"

    def __init__(self, quality: int = 95) -> None:
        self.quality = _checked_quality(quality)

    def __call__(self, images: np.ndarray, prompts: Sequence[str] | None = None,
                 metadata: Sequence[dict] | None = None) -> np.ndarray:
        return jpeg_kilobytes(images, self.quality)
