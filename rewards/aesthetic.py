"""The LAION aesthetic predictor v2 as a reward: an MLP on unit-norm CLIP ViT-L/14 image embeddings.

Source: christophschuhmann/improved-aesthetic-predictor (``sac+logos+ava1-l14-linearMSE.pth``),
the aesthetic reward of DDPO (Black et al., 2023) and Flow-GRPO. Its head is

    Linear(768, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2),
    Linear(128, 64), Dropout(0.1), Linear(64, 16), Linear(16, 1)

with no activations (they are commented out in the original, so the head is affine),
applied to ``E / ||E||`` where ``E`` is CLIP ViT-L/14's projected image embedding. Scores
are on the AVA scale, about 1-10. The state dict's original key names (``layers.0.weight``
... ``layers.7.bias``) load as they are; layer widths are read from the checkpoint. A
linear head (keys ``weight``, ``bias``: the v1 predictor ``sa_0_4_vit_l_14_linear.pth``)
loads too.

Deviations from the original:

* The embedding comes from transformers' ``CLIPModel`` ("openai/clip-vit-large-patch14")
  and its image processor, as in DDPO, not from OpenAI's ``clip`` package; both are the
  same weights and a bicubic resize + 224 px centre crop.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rewards.clip import ClipEmbedder

# (index in nn.Sequential, dropout after it) of each Linear of the v2 head.
_MLP_LAYERS = ((0, 0.2), (2, 0.2), (4, 0.1), (6, None), (7, None))


class AestheticMLP(nn.Module):
    """The v2 head with layer widths ``[in, 1024, 128, 64, 16, 1]`` (or smaller ones).

    The layers sit in ``self.layers`` as in the original, so its key names load unchanged.
    """

    def __init__(self, widths: Sequence[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for (_, p), d_in, d_out in zip(_MLP_LAYERS, widths[:-1], widths[1:], strict=True):
            layers.append(nn.Linear(d_in, d_out))
            if p is not None:
                layers.append(nn.Dropout(p))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def load_head(path: str) -> nn.Module:
    """The head saved at ``path`` (``.pth``/``.pt`` or ``.safetensors``), in eval mode, fp32."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"LaionAesthetic: head={path!r} is not a file. Download "
            "sac+logos+ava1-l14-linearMSE.pth from github.com/christophschuhmann/"
            "improved-aesthetic-predictor where the network is reachable, copy it here and "
            "pass its local path.")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(file))
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
    mlp_keys = {f"layers.{i}.{p}" for i, _ in _MLP_LAYERS for p in ("weight", "bias")}
    if set(state) == {"weight", "bias"}:
        head: nn.Module = nn.Linear(*reversed(state["weight"].shape))
    elif set(state) == mlp_keys:
        weights = [state[f"layers.{i}.weight"] for i, _ in _MLP_LAYERS]  # [out, in] each
        head = AestheticMLP([weights[0].shape[1]] + [w.shape[0] for w in weights])
    else:
        raise ValueError(
            f"LaionAesthetic: {path} holds keys {sorted(state)}; expected the v2 MLP's "
            f"{sorted(mlp_keys)} or a linear head's ['bias', 'weight']")
    head.load_state_dict(state)  # strict: every key used, shapes checked
    return head.float().eval()


class LaionAesthetic:
    """LAION aesthetic score (about 1-10) of each image; prompts and metadata are unused."""

    name = "laion_aesthetic"
    version = "1"

    def __init__(self, head: str, clip_model: str = "openai/clip-vit-large-patch14",
                 device: str = "cpu", dtype: str = "float32", batch_size: int = 32) -> None:
        self.head_path, self.clip_path = head, clip_model
        self.head = load_head(head).to(device)
        self.clip = ClipEmbedder(clip_model, None, device, dtype, batch_size,
                                 owner="LaionAesthetic")
        d_in = next(self.head.parameters()).shape[1]
        if d_in != self.clip.dim:
            raise ValueError(
                f"LaionAesthetic: head {head} takes {d_in}-d embeddings but CLIP {clip_model} "
                f"gives {self.clip.dim}-d ones; the LAION heads need CLIP ViT-L/14 (768)")

    @torch.inference_mode()
    def __call__(self, images: np.ndarray, prompts: Sequence[str] | None = None,
                 metadata: Sequence[dict] | None = None) -> np.ndarray:
        embeddings = self.clip.images(images)  # [N, D] fp32, unit norm
        return self.head(embeddings).squeeze(-1).cpu().numpy().astype(np.float32)  # [N]
