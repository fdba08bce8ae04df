"""Pretrain the shipped tiny SD3 model on the shapes world, from a seed.

    python -m shapes.pretrain --out models/tiny-shapes-sd3 [--config configs/pretrain_tiny_shapes.yaml]

Two stages, both on freshly rendered scenes (``shapes.world``), never on files:

1. the VAE: an ``AutoencoderKL`` (64 px <-> 4x32x32) trained to reconstruct renders,
   then SD3's latent ``shift_factor``/``scaling_factor`` measured on its latents;
2. the transformer: rectified-flow matching, ``x_t = (1 - t) x0 + t eps``, target
   ``v = eps - x0``, with ``t`` logit-normal (SD3) and the caption dropped to the empty
   prompt 10 % of the time so that CFG works. The saved weights are an EMA.

A second stage may continue from a saved model (``init_from``): its VAE is kept, a T5
text encoder may be added (``t5_layers``), and the transformer trains on, with the
tags drawn in proportion to ``tag_weights``. ``long_sequence_share`` of the batches
pad the T5 slot to a length drawn log-uniformly up to ``long_sequence_max`` instead of
``max_sequence_length``, so the model also works at diffusers' default of 256 tokens.

The text encoders stay at their seeded random initialisation, frozen: the
vocabulary is ~40 words, a random encoder already gives every prompt a distinct,
position-aware token sequence, and SD3's joint attention learns to bind colours to
shapes from it. Freezing keeps pretraining cheap and leaves the text side identical
in every stage that loads the model (the RL stage never trains it either).

Deviations from SD3's recipe: a 2-layer T5 at 64 wide (or none: the pipeline then pads
its slots with zeros), a 4x VAE with 8 channels instead of 8x with 16, and small
batches; all for a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm import tqdm

from policy.pipeline import load_pipeline
from policy.sampler import encode_prompts
from policy.tiny import build_tiny_pipeline, vae_scale_factor
from shapes.world import TAGS, pretraining_metadata, render

IMAGE_SIZE = 64  # the shapes world's render size


class PretrainConfig(BaseModel):
    """Everything that defines the shipped weights; the same config and seed reproduce them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(0, description="seed of the weights' init, the scenes and the noise")
    num_threads: int = Field(2, ge=1, description="torch CPU threads")
    transformer_layers: int = Field(4, ge=1, description="SD3 transformer blocks")
    transformer_heads: int = Field(4, ge=1, description="attention heads")
    head_dim: int = Field(24, ge=4, description="width of one head (inner width = heads x head_dim)")
    vae_channels: tuple[int, ...] = Field(
        (16, 32, 32), description="VAE block widths; n levels downsample 2^(n-1) times"
    )
    latent_channels: int = Field(8, ge=1, description="VAE latent channels")
    max_sequence_length: int = Field(8, ge=1, description="T5 slots in the text sequence")
    t5_layers: int = Field(0, ge=0, description="layers of the T5 text encoder; 0: no T5 (zeros)")
    init_from: str | None = Field(
        None, description="continue from this saved model: keep its VAE and text encoders "
        "(adding a T5 if t5_layers asks and it has none) and train its transformer on")
    tag_weights: dict[str, float] | None = Field(
        None, description="relative share of each tag's scenes; None: uniform over tags")
    long_sequence_share: float = Field(
        0.0, ge=0, le=1, description="share of batches whose T5 slot is longer than max_sequence_length")
    long_sequence_max: int = Field(256, ge=1, description="longest T5 slot those batches draw")
    vae_steps: int = Field(900, ge=0, description="VAE optimiser steps")
    vae_batch: int = Field(32, ge=1, description="VAE batch size")
    vae_lr: float = Field(2e-3, gt=0, description="VAE AdamW learning rate")
    vae_kl_weight: float = Field(1e-6, ge=0, description="weight of the VAE's KL term")
    steps: int = Field(8000, ge=1, description="transformer optimiser steps")
    batch: int = Field(64, ge=1, description="transformer batch size")
    lr: float = Field(2e-3, gt=0, description="transformer peak AdamW learning rate")
    warmup: int = Field(400, ge=0, description="linear warm-up steps, then cosine decay to 10 %")
    weight_decay: float = Field(0.0, ge=0, description="transformer AdamW weight decay")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient norm clip")
    caption_dropout: float = Field(0.1, ge=0, le=1, description="share of empty captions (for CFG)")
    ema_decay: float = Field(0.999, ge=0, lt=1, description="EMA decay of the saved transformer")
    log_every: int = Field(100, ge=1, description="steps between loss-log lines")


    @model_validator(mode="after")
    def _check(self) -> PretrainConfig:
        if self.tag_weights is not None:
            unknown = sorted(set(self.tag_weights) - set(TAGS))
            if unknown or not any(w > 0 for w in self.tag_weights.values()):
                raise ValueError(f"tag_weights: tags must be among {list(TAGS)} with a positive "
                                 f"weight somewhere; got {self.tag_weights}")
            if any(w < 0 for w in self.tag_weights.values()):
                raise ValueError(f"tag_weights must be >= 0, got {self.tag_weights}")
        if self.long_sequence_share and self.long_sequence_max <= self.max_sequence_length:
            raise ValueError("long_sequence_max must exceed max_sequence_length when "
                             "long_sequence_share > 0")
        if self.init_from and not (Path(self.init_from) / "model_index.json").exists():
            raise ValueError(f"init_from: {self.init_from} holds no model_index.json; "
                             "name a saved diffusers directory")
        return self


def load_pretrain_config(path: str | Path | None, overrides: list[str] = ()) -> PretrainConfig:
    tree = yaml.safe_load(Path(path).read_text()) if path else {}
    for item in overrides:
        key, _, raw = item.partition("=")
        tree[key.strip()] = yaml.safe_load(raw)
    return PretrainConfig.model_validate(tree or {})


def render_batch(rng: np.random.Generator, n: int,
                 tag_weights: dict[str, float] | None = None) -> tuple[torch.Tensor, list[str]]:
    """``n`` random scenes as images in [-1, 1] ``[n, 3, 64, 64]`` and their prompts."""
    metas = [pretraining_metadata(rng, tag_weights) for _ in range(n)]
    images = np.stack([render(m, rng) for m in metas])  # [n, 64, 64, 3] uint8
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, [m["prompt"] for m in metas]


def train_vae(pipe, cfg: PretrainConfig, rng: np.random.Generator, log) -> None:
    """Reconstruction + tiny KL on fresh renders; then measure the latent statistics."""
    vae = pipe.vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    bar = tqdm(range(cfg.vae_steps), desc="vae", mininterval=5)
    for step in bar:
        x, _ = render_batch(rng, cfg.vae_batch)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        rec = F.mse_loss(recon, x)
        loss = rec + cfg.vae_kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % cfg.log_every == 0 or step == cfg.vae_steps - 1:
            bar.set_postfix(rec=f"{rec.item():.5f}")
            log({"stage": "vae", "step": step, "recon_mse": rec.item()})
    vae.eval().requires_grad_(False)
    # SD3 normalises latents as (z - shift) * scale; measure both on 1024 fresh renders.
    with torch.no_grad():
        z = torch.cat([vae.encode(render_batch(rng, 128)[0]).latent_dist.sample() for _ in range(8)])
    vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1.0 / z.std()))


def lr_at(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def sequence_length(cfg: PretrainConfig, gen: torch.Generator) -> int:
    """The T5 slot's length for one batch: ``max_sequence_length``, or for
    ``long_sequence_share`` of the batches log-uniform up to ``long_sequence_max``."""
    if not cfg.long_sequence_share:
        return cfg.max_sequence_length
    u, v = torch.rand(2, generator=gen).tolist()
    if u >= cfg.long_sequence_share:
        return cfg.max_sequence_length
    low, high = math.log(cfg.max_sequence_length + 1), math.log(cfg.long_sequence_max)
    return round(math.exp(low + v * (high - low)))


def train_transformer(pipe, cfg: PretrainConfig, rng: np.random.Generator, log) -> None:
    """Rectified-flow matching on VAE latents of fresh renders, with an EMA copy."""
    tf = pipe.transformer.train().requires_grad_(True)
    ema = {k: v.detach().clone() for k, v in tf.state_dict().items()}
    opt = torch.optim.AdamW(tf.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    vae = pipe.vae
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    bar = tqdm(range(cfg.steps), desc="transformer", mininterval=5)
    for step in bar:
        x, prompts = render_batch(rng, cfg.batch, cfg.tag_weights)
        with torch.no_grad():
            x0 = (vae.encode(x).latent_dist.sample(generator=gen) - shift) * scale  # [n,4,32,32]
            drop = torch.rand(cfg.batch, generator=gen) < cfg.caption_dropout
            prompts = ["" if d else p for d, p in zip(drop.tolist(), prompts, strict=True)]
            cond = encode_prompts(pipe, prompts, sequence_length(cfg, gen))
        # x_t = (1 - t) x0 + t eps with t logit-normal; target v = eps - x0
        t = torch.sigmoid(torch.randn(cfg.batch, generator=gen))  # [n]
        eps = torch.randn(x0.shape, generator=gen)
        tb = t.view(-1, 1, 1, 1)
        x_t = (1.0 - tb) * x0 + tb * eps
        v = tf(hidden_states=x_t, timestep=t * 1000.0, encoder_hidden_states=cond.embeds,
               pooled_projections=cond.pooled, return_dict=False)[0]
        loss = F.mse_loss(v, eps - x0)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tf.parameters(), cfg.max_grad_norm)
        opt.step()
        with torch.no_grad():
            for k, p in tf.state_dict().items():
                ema[k].lerp_(p, 1.0 - cfg.ema_decay)
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            log({"stage": "transformer", "step": step, "loss": loss.item(), "lr": lr_at(step, cfg)})
    tf.load_state_dict(ema)
    tf.eval().requires_grad_(False)


def continued(cfg: PretrainConfig, fresh):
    """The saved model ``cfg.init_from``, with ``fresh``'s T5 added if it has none."""
    pipe = load_pipeline(cfg.init_from)
    for name in ("transformer", "vae"):
        saved, built = getattr(pipe, name).state_dict(), getattr(fresh, name).state_dict()
        if {k: v.shape for k, v in saved.items()} != {k: v.shape for k, v in built.items()}:
            raise ValueError(f"init_from {cfg.init_from}: its {name} does not have the shapes "
                             "this config builds; copy its pretrain_config.yaml's architecture")
    if pipe.text_encoder_3 is None and fresh.text_encoder_3 is not None:
        pipe.register_modules(text_encoder_3=fresh.text_encoder_3, tokenizer_3=fresh.tokenizer_3)
    elif (pipe.text_encoder_3 is None) != (fresh.text_encoder_3 is None):
        raise ValueError(f"init_from {cfg.init_from} has a T5 and t5_layers is 0; set t5_layers")
    return pipe


def pretrain(cfg: PretrainConfig, out: Path) -> Path:
    """Build the tiny pipeline from ``cfg.seed``, train VAE then transformer, save to ``out``."""
    torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    fresh = build_tiny_pipeline(
        seed=cfg.seed, transformer_layers=cfg.transformer_layers,
        transformer_heads=cfg.transformer_heads, head_dim=cfg.head_dim,
        vae_channels=cfg.vae_channels, latent_channels=cfg.latent_channels,
        sample_size=IMAGE_SIZE // vae_scale_factor(cfg.vae_channels), t5_layers=cfg.t5_layers,
    )
    pipe = fresh if cfg.init_from is None else continued(cfg, fresh)
    for module in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        if module is not None:
            module.eval().requires_grad_(False)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(out / "pretrain_log.jsonl", "w") as f:
        def log(row: dict) -> None:
            row["elapsed_s"] = round(time.perf_counter() - started, 1)
            f.write(json.dumps(row) + "\n")
            f.flush()

        if cfg.init_from is None:  # a continued model keeps its VAE and latent statistics
            train_vae(pipe, cfg, rng, log)
        train_transformer(pipe, cfg, rng, log)
        log({"stage": "done"})
    pipe.save_pretrained(out)
    (out / "pretrain_config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Pretrain the tiny shapes-world SD3 model.")
    parser.add_argument("--out", type=Path, required=True, help="output diffusers directory")
    parser.add_argument("--config", help="YAML of PretrainConfig fields (default: the built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    args = parser.parse_args(argv)
    cfg = load_pretrain_config(args.config, args.overrides)
    started = time.perf_counter()
    pretrain(cfg, args.out)
    print(f"saved {args.out} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
