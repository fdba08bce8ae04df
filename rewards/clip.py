"""CLIP text-image rewards: CLIPScore and PickScore, as ``(images, prompts, metadata) -> [N]``.

* :class:`CLIPScore` (Hessel et al., 2021, "CLIPScore: A Reference-free Evaluation Metric
  for Image Captioning"): ``w * max(cos(E_image, E_text), 0)`` with ``w = 2.5``.
* :class:`PickScore` (Kirstain et al., 2023, "Pick-a-Pic"): ``logit_scale.exp() *
  cos(E_image, E_text)``, computed as in the ``yuvalkirstain/PickScore_v1`` model card.

Both run a transformers ``CLIPModel`` loaded with ``from_pretrained`` from a local
directory (or a hub id, where the hub or its cache is reachable). Images are resized and
centre-cropped by the checkpoint's image processor; prompts are truncated to the
tokenizer's ``model_max_length`` (77 for CLIP).

Deviations from the papers:

* CLIPScore's paper prefixes each caption with "A photo depicts"; the prompt is encoded
  as is here, since the prompt is what the image was asked to show.
* PickScore is reported raw (around 20 for real image-prompt pairs; ``logit_scale.exp()``
  is ~100).
  Flow-GRPO divides it by 26; a constant factor changes nothing after GRPO's per-group
  standardisation, only the reward's weight when combined with others.
* Image preprocessing uses transformers' PIL backend, whether or not torchvision is
  installed, so CPU and GPU machines see the same pixels (the torchvision backend
  resizes slightly differently).
* Cosines are computed in fp32 whatever the model's dtype.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# "org/name" or "name": the only shapes a hub id can take. Anything else is a local path.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")

NO_DOWNLOAD = (
    "Weights cannot be downloaded on machines without hub access: download them where the "
    "hub is reachable (e.g. `hf download openai/clip-vit-large-patch14 --local-dir "
    "/data/clip-vit-large-patch14`), copy them here and pass the local directory."
)


def load_pretrained(load: Callable[..., Any], name: str, field: str, owner: str,
                    **kwargs: Any) -> Any:
    """``load(name, **kwargs)`` (a ``from_pretrained``) with an error that says what to do.

    A local directory is loaded as is. A hub id is tried in the hub cache first (no
    network), then on the hub; with no network the hub retries for about a minute before
    failing (``HF_HUB_OFFLINE=1`` makes it fail at once).
    """
    path = Path(name).expanduser()
    if path.is_dir():
        return load(str(path), **kwargs)
    if path.exists() or not _HUB_ID.fullmatch(name):
        raise FileNotFoundError(
            f"{owner}: {field}={name!r} is not a directory of saved weights "
            f"({'a file' if path.exists() else 'no such path'}). {NO_DOWNLOAD}")
    try:
        return load(name, local_files_only=True, **kwargs)
    except OSError:
        pass  # not in the cache: try the hub
    try:
        return load(name, **kwargs)
    except Exception as err:
        raise OSError(
            f"{owner}: {field}={name!r} is not a local directory, and neither the Hugging Face "
            f"hub nor its cache could provide it ({type(err).__name__}). {NO_DOWNLOAD}"
        ) from err


def check_images(images: np.ndarray, owner: str) -> np.ndarray:
    """The scorer contract's images: uint8 ``[N, H, W, 3]``."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{owner}: images must be uint8 [N, H, W, 3], got "
                         f"{images.dtype} {list(images.shape)}")
    return images


class ClipEmbedder:
    """A ``CLIPModel`` with its tokenizer and image processor: L2-normalised fp32 embeddings.

    ``processor`` is the directory (or hub id) of the tokenizer and image processor when
    they are not saved beside the model (PickScore's are LAION's CLIP-ViT-H-14's).
    """

    def __init__(self, model: str, processor: str | None = None, device: str = "cpu",
                 dtype: str = "float32", batch_size: int = 32, owner: str = "CLIP") -> None:
        if dtype not in DTYPES:
            raise ValueError(f"{owner}: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if batch_size < 1:
            raise ValueError(f"{owner}: batch_size must be >= 1, got {batch_size}")
        self.owner, self.device, self.batch_size = owner, torch.device(device), batch_size
        field = "model" if processor is None else "processor"
        processor = model if processor is None else processor
        self.model = load_pretrained(CLIPModel.from_pretrained, model, "model", owner,
                                     dtype=DTYPES[dtype]).to(self.device).eval()
        self.tokenizer = load_pretrained(AutoTokenizer.from_pretrained, processor, field, owner)
        self.image_processor = load_pretrained(AutoImageProcessor.from_pretrained, processor,
                                               field, owner, backend="pil")

    @property
    def dim(self) -> int:
        return self.model.config.projection_dim

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().float().exp())

    @torch.inference_mode()
    def images(self, images: np.ndarray) -> torch.Tensor:
        """``[N, D]`` unit-norm fp32 image embeddings of uint8 ``[N, H, W, 3]`` images."""
        images = check_images(images, self.owner)
        out = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.image_processor(
                images=list(images[start:start + self.batch_size]), return_tensors="pt",
                input_data_format="channels_last")["pixel_values"]  # [b, 3, S, S]
            pixels = pixels.to(self.device, self.model.dtype)
            out.append(_pooled(self.model.get_image_features(pixel_values=pixels)))
        return _unit(torch.cat(out))

    @torch.inference_mode()
    def texts(self, prompts: Sequence[str]) -> torch.Tensor:
        """``[N, D]`` unit-norm fp32 text embeddings; each distinct prompt is encoded once."""
        unique = list(dict.fromkeys(prompts))  # a GRPO group repeats one prompt
        out = []
        for start in range(0, len(unique), self.batch_size):
            tokens = self.tokenizer(
                unique[start:start + self.batch_size], padding=True, truncation=True,
                max_length=self.tokenizer.model_max_length, return_tensors="pt",
            ).to(self.device)
            out.append(_pooled(self.model.get_text_features(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])))
        embeddings = _unit(torch.cat(out))  # [U, D]
        index = {prompt: i for i, prompt in enumerate(unique)}
        return embeddings[[index[prompt] for prompt in prompts]]  # [N, D]

    def cosine(self, images: np.ndarray, prompts: Sequence[str]) -> torch.Tensor:
        """``[N]`` fp32 cosine between each image and its own prompt."""
        if len(prompts) != len(images):
            raise ValueError(f"{self.owner}: {len(images)} images but {len(prompts)} prompts")
        return (self.images(images) * self.texts(prompts)).sum(-1)


def _pooled(out: Any) -> torch.Tensor:
    """The projected embedding: transformers 5 returns an output whose ``pooler_output`` it is,
    transformers 4 the tensor itself."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _unit(x: torch.Tensor) -> torch.Tensor:
    # fp32: a half-precision norm of a 768-wide vector loses the third digit of the cosine.
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True)


class CLIPScore:
    """``w * max(cos(E_image, E_prompt), 0)`` (Hessel et al., 2021), in [0, w].

    ``w = 2.5`` is the paper's rescaling, chosen so that scores spread over about [0, 1]
    for ViT-B/32 (cosines of real image-caption pairs rarely exceed 0.4).
    """

    name = "clip_score"
    version = "1"

    def __init__(self, model: str = "openai/clip-vit-large-patch14", device: str = "cpu",
                 dtype: str = "float32", batch_size: int = 32, w: float = 2.5) -> None:
        self.model_path, self.w = model, w
        self.clip = ClipEmbedder(model, None, device, dtype, batch_size, owner="CLIPScore")

    def __call__(self, images: np.ndarray, prompts: Sequence[str],
                 metadata: Sequence[dict] | None = None) -> np.ndarray:
        cos = self.clip.cosine(images, prompts)  # [N]
        return (self.w * cos.clamp(min=0)).cpu().numpy().astype(np.float32)


class PickScore:
    """``logit_scale.exp() * cos(E_image, E_prompt)`` with PickScore_v1 (Kirstain et al., 2023).

    ``processor`` holds the tokenizer and image processor (PickScore_v1 ships none; its
    card uses those of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``). Raw, not divided by 26
    (module docstring).
    """

    name = "pickscore"
    version = "1"

    def __init__(self, model: str = "yuvalkirstain/PickScore_v1",
                 processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", device: str = "cpu",
                 dtype: str = "float32", batch_size: int = 32) -> None:
        self.model_path, self.processor_path = model, processor
        self.clip = ClipEmbedder(model, processor, device, dtype, batch_size, owner="PickScore")

    def __call__(self, images: np.ndarray, prompts: Sequence[str],
                 metadata: Sequence[dict] | None = None) -> np.ndarray:
        cos = self.clip.cosine(images, prompts)  # [N]
        return (self.clip.logit_scale * cos).cpu().numpy().astype(np.float32)
