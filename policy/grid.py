"""Sample grids: images in rows, each with an optional coloured frame and a caption."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

LINE_HEIGHT = 12


def image_grid(images: np.ndarray, captions: Sequence[Sequence[str]],
               frames: Sequence[tuple[int, int, int] | None] | None = None,
               columns: int = 8, scale: int = 2) -> Image.Image:
    """``images`` uint8 ``[N, H, W, 3]``; ``captions[i]`` is a list of text lines under image i."""
    tile = images.shape[1] * scale
    text_h = LINE_HEIGHT * max((len(c) for c in captions), default=0) + 6
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * (tile + 8), rows * (tile + 8 + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for n, img in enumerate(images):
        x, y = (n % columns) * (tile + 8) + 4, (n // columns) * (tile + 8 + text_h) + 4
        if frames is not None and frames[n] is not None:
            draw.rectangle([x - 3, y - 3, x + tile + 2, y + tile + 2], fill=frames[n])
        grid.paste(Image.fromarray(img).resize((tile, tile), Image.NEAREST), (x, y))
        for k, line in enumerate(captions[n]):
            draw.text((x, y + tile + 4 + LINE_HEIGHT * k), line, fill="black")
    return grid


def prompt_lines(prompt: str) -> list[str]:
    """A shapes-world prompt on two short lines, without the common 'a photo of'."""
    words = prompt.removeprefix("a photo of ").split()
    half = (len(words) + 1) // 2
    return [" ".join(words[:half]), " ".join(words[half:])]


def save_grid(path: str | Path, images: np.ndarray, captions: Sequence[Sequence[str]],
              frames: Sequence[tuple[int, int, int] | None] | None = None, columns: int = 8) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, captions, frames, columns).save(path)
    return path
