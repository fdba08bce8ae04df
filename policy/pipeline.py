"""Loading the SD3 pipeline, attaching LoRA, and running the base model for KL.

The policy is a frozen SD3 pipeline plus one peft LoRA adapter on the transformer.
The KL reference (docs/design.md section 4) is the same transformer with the adapter
disabled, so no second copy of the weights is kept.

Imports torch, diffusers, peft and the standard library only.
"""

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.utils import logging as diffusers_logging
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer

from policy.tiny import build_tiny_pipeline

MODEL_INDEX = "model_index.json"


def load_pipeline(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    text_encoders: bool = True,
    denoiser: bool = True,
) -> StableDiffusion3Pipeline:
    """Load an SD3 pipeline from a hub id or a local diffusers directory, frozen.

    Components saved as null in `model_index.json` (the tiny model has no T5) are
    passed as None explicitly: diffusers refuses a null non-optional component
    otherwise. ``text_encoders=False`` loads neither text encoders nor tokenizers (an
    actor that looks its prompts up in a ``policy.prompt_table.PromptTable``);
    ``denoiser=False`` loads no VAE, and no transformer unless the pipeline lacks a T5
    (diffusers then sizes the T5 slot's zeros from the transformer's config): what
    builds such a table.
    """
    if looks_local(name_or_path):
        _check_pipeline_dir(Path(name_or_path))
    config = StableDiffusion3Pipeline.load_config(name_or_path)
    absent = {name: None for name, value in config.items() if value == [None, None]}
    if not text_encoders:
        absent |= {name: None for name in TEXT_COMPONENTS}
    if not denoiser:
        absent |= {name: None for name in denoiser_components("text_encoder_3" in absent)}
    # Precision: every component follows `dtype`, the VAE included, because the stock
    # pipeline hands latents to `vae.decode` without a cast. A caller that decodes
    # itself may keep the VAE in fp32 (`pipe.vae.to(torch.float32)`); it is run once
    # per image, so the cost is small.
    pipe = StableDiffusion3Pipeline.from_pretrained(name_or_path, dtype=dtype, **absent)
    pipe.to(device)
    for module in _modules(pipe):
        module.requires_grad_(False)
    for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        if module is not None:
            module.eval()
    return pipe


TEXT_COMPONENTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                   "text_encoder_3", "tokenizer_3")


def denoiser_components(without_t5: bool) -> tuple[str, ...]:
    """What ``denoiser=False`` leaves out (see ``load_pipeline``)."""
    return ("vae",) if without_t5 else ("transformer", "vae")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TINY_RANDOM = "tiny-random"


def build_pipeline(
    path: str, dtype: str = "float32", device: str = "cpu", num_threads: int = 0,
    text_encoders: bool = True, denoiser: bool = True,
) -> StableDiffusion3Pipeline:
    """The frozen pipeline named by a config: a diffusers dir or hub id, or ``tiny-random``.

    ``tiny-random`` builds the offline tiny random-weight pipeline of ``policy.tiny``
    (seed 0: the model's identity does not depend on the run seed). ``num_threads > 0``
    sets torch's CPU threads, which inside a Ray actor default to the actor's num_cpus.
    ``text_encoders=False``: without text encoders and tokenizers; ``denoiser=False``:
    without VAE and (given a T5) transformer (see ``load_pipeline``).
    """
    if num_threads:
        torch.set_num_threads(num_threads)
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "1":
        # huggingface_hub's switch for its bars; diffusers' "Loading pipeline components"
        # bar does not read it, so it is applied here (learner.console sets it)
        diffusers_logging.disable_progress_bar()
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if path != TINY_RANDOM:
        return load_pipeline(path, dtype=DTYPES[dtype], device=device,
                             text_encoders=text_encoders, denoiser=denoiser)
    pipe = build_tiny_pipeline(seed=0)
    dropped = (TEXT_COMPONENTS if not text_encoders else ()) + (
        denoiser_components(pipe.text_encoder_3 is None) if not denoiser else ())
    pipe.register_modules(**{name: None for name in dropped})
    if (device, dtype) != ("cpu", "float32"):  # it is built on the CPU in fp32
        pipe.to(device, DTYPES[dtype])
    for module in _modules(pipe):
        module.requires_grad_(False)
    return pipe


def build_vae(path: str, dtype: str = "float32", device: str = "cpu",
              num_threads: int = 0) -> AutoencoderKL:
    """The pipeline's VAE alone, frozen: what an actor that only decodes latents needs
    (no transformer, no text encoders resident)."""
    if num_threads:
        torch.set_num_threads(num_threads)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if path == TINY_RANDOM:
        vae = build_tiny_pipeline(seed=0).vae
    else:
        if looks_local(path):
            _check_pipeline_dir(Path(path))
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
    vae.to(device, DTYPES[dtype])
    vae.requires_grad_(False)
    return vae.eval()


def looks_local(name_or_path: str) -> bool:
    """True unless `name_or_path` reads as a hub id ("org/name" with no local match).

    A relative path whose first folder exists here ("models/tiny" next to `models/`)
    counts as local, so a typo there fails with a file error, not a hub lookup.
    """
    path = Path(name_or_path).expanduser()
    if path.exists() or path.is_absolute() or name_or_path.startswith((".", "~")):
        return True
    return len(path.parts) != 2 or Path(path.parts[0]).is_dir()


@dataclass(frozen=True)
class T5Overflow:
    """Prompts longer than the T5 slot: the encoder sees them cut short."""

    count: int  # prompts longer than the slot
    longest: str  # the longest prompt
    tokens: int  # its length in T5 tokens, EOS included


def t5_overflow(tokenizer, prompts: list[str], max_sequence_length: int) -> T5Overflow | None:
    """Which ``prompts`` a T5 slot of ``max_sequence_length`` tokens truncates, or None.

    ``tokenizer`` is the pipeline's ``tokenizer_3``; None (no T5) truncates nothing.
    """
    if tokenizer is None or not prompts:
        return None
    lengths = [len(ids) for ids in tokenizer(list(prompts)).input_ids]
    over = [n for n in lengths if n > max_sequence_length]
    if not over:
        return None
    i = max(range(len(lengths)), key=lengths.__getitem__)
    return T5Overflow(len(over), prompts[i], lengths[i])


def local_t5_tokenizer(model_dir: str | Path):
    """The T5 tokenizer a local pipeline directory holds (``tokenizer_3/``), or None."""
    folder = Path(model_dir).expanduser() / "tokenizer_3"
    if not folder.is_dir():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _check_pipeline_dir(path: Path) -> None:
    """Fail with the path and what was expected, not diffusers' hub error."""
    path = path.expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"pipeline directory {str(path)!r} does not exist; expected a diffusers "
            f"pipeline directory containing {MODEL_INDEX} (e.g. from pipe.save_pretrained)"
        )
    if not (path / MODEL_INDEX).is_file():
        raise FileNotFoundError(
            f"{str(path)!r} has no {MODEL_INDEX}; expected a diffusers pipeline "
            f"directory (e.g. from pipe.save_pretrained), found: {sorted(os.listdir(path))[:10]}"
        )


def _modules(pipe: StableDiffusion3Pipeline) -> list[torch.nn.Module]:
    """The pipeline's torch modules (transformer, VAE, text encoders present)."""
    return [value for value in pipe.components.values() if isinstance(value, torch.nn.Module)]


@dataclass(frozen=True)
class LoraSpec:
    """Shape and placement of the LoRA adapter (docs/design.md defaults for SD3.5-M)."""

    rank: int = 32
    """LoRA rank r."""
    alpha: float = 64
    """LoRA alpha; the update is scaled by alpha / r."""
    target_modules: tuple[str, ...] = (
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_q_proj",
        "attn.add_k_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
    )
    """Module-name suffixes that get an adapter; each must match at least one module."""
    init_seed: int = 0
    """Seed for the random A matrices (B starts at zero)."""
    init: str = "gaussian"
    """A's init: "gaussian" (normal, std 1/r, as both references) or "kaiming" (peft's default)."""


def lora_config(spec: LoraSpec) -> LoraConfig:
    """The peft config of ``spec``; B starts at zero, so the adapter starts as the identity."""
    return LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        init_lora_weights={"gaussian": "gaussian", "kaiming": True}[spec.init],
        target_modules=list(spec.target_modules),
    )


def add_lora(transformer: SD3Transformer2DModel, spec: LoraSpec) -> list[str]:
    """Attach a LoRA adapter, make only its weights trainable, return their names.

    B is initialised to zero, so the adapted model starts equal to the base model.
    """
    _check_targets(transformer, spec.target_modules)
    config = lora_config(spec)
    # Seed A's init without moving the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.init_seed)
        transformer.add_adapter(config)
    trainable = []
    for name, param in transformer.named_parameters():
        param.requires_grad_("lora_" in name)
        if param.requires_grad:
            trainable.append(name)
    return trainable


def _check_targets(model: torch.nn.Module, targets: tuple[str, ...]) -> None:
    """Each target must match some module, by peft's rule (equal or dotted suffix).

    peft only complains when no target matches at all; a misspelled single target
    would silently leave those layers untrained.
    """
    names = [name for name, _ in model.named_modules()]
    for target in targets:
        if not any(name == target or name.endswith("." + target) for name in names):
            linear = sorted(
                {
                    name.split(".", 2)[-1]
                    for name, module in model.named_modules()
                    if isinstance(module, torch.nn.Linear)
                }
            )
            raise ValueError(
                f"LoRA target {target!r} matches no module of {type(model).__name__}; "
                f"some linear modules are: {linear[:12]}"
            )


@contextlib.contextmanager
def adapter_disabled(transformer: torch.nn.Module) -> Iterator[None]:
    """Run the base model (the KL reference) inside the block; restore on exit.

    A no-op when the model has no adapter or it is already disabled. peft toggles
    `requires_grad` of the LoRA weights when disabling, so those flags are restored
    as they were, not as peft would set them.
    """
    layers = [module for module in transformer.modules() if isinstance(module, BaseTunerLayer)]
    if not layers or all(layer.disable_adapters for layer in layers):
        yield
        return
    requires_grad = {param: param.requires_grad for param in transformer.parameters()}
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for param, flag in requires_grad.items():
            param.requires_grad_(flag)


def _adapter_name(transformer: torch.nn.Module) -> str:
    """The name of the transformer's only adapter ("default", or "default_0" when loaded)."""
    names = list(getattr(transformer, "peft_config", {}))
    if len(names) != 1:
        raise ValueError(f"expected exactly one LoRA adapter on the transformer, found {names}")
    return names[0]


def lora_state_dict(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights, keyed as peft saves them (no adapter name in the keys)."""
    return get_peft_model_state_dict(transformer, adapter_name=_adapter_name(transformer))


def load_lora_state_dict(transformer: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load adapter weights; the keys must match the adapter's exactly."""
    expected = set(lora_state_dict(transformer))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"LoRA state dict does not match the adapter: missing {missing[:5]} "
            f"({len(missing)} in all), unexpected {unexpected[:5]} ({len(unexpected)} in all)"
        )
    set_peft_model_state_dict(transformer, state, adapter_name=_adapter_name(transformer))


def save_lora(
    pipe_or_transformer: StableDiffusion3Pipeline | SD3Transformer2DModel, directory: str | Path
) -> None:
    """Write the adapter where `StableDiffusion3Pipeline.load_lora_weights` reads it.

    The LoRA config goes along as metadata: without it the loader would assume
    alpha = r and scale the update differently.
    """
    transformer = getattr(pipe_or_transformer, "transformer", pipe_or_transformer)
    config = transformer.peft_config[_adapter_name(transformer)]
    save_lora_state(lora_state_dict(transformer), config, directory)


def load_fused_lora(pipe: StableDiffusion3Pipeline, directory: str | Path) -> None:
    """Load a saved adapter (``save_lora``) and fuse it into the transformer's weights.

    For sampling only: peft's separate LoRA matmuls made the tiny model's 40-step sampling
    ~3x slower; fused, the images differ by at most 1/255 in 0.003 % of pixels.
    """
    pipe.load_lora_weights(str(directory))
    pipe.fuse_lora()
    pipe.unload_lora_weights()


def save_lora_state(
    state: dict[str, torch.Tensor], config: LoraConfig | LoraSpec, directory: str | Path
) -> None:
    """Write a LoRA state dict (peft keys) as ``save_lora`` does, without a model at hand."""
    if isinstance(config, LoraSpec):
        config = lora_config(config)
    StableDiffusion3Pipeline.save_lora_weights(
        str(directory),
        transformer_lora_layers={k: v.detach().contiguous() for k, v in state.items()},
        transformer_lora_adapter_metadata=config.to_dict(),
    )
