"""A tiny, random-weight `StableDiffusion3Pipeline` built entirely offline.

The shapes world (docs/design.md section 5) needs a real SD3 pipeline that a laptop can
run and that no hub download is needed for. Every component is the stock diffusers /
transformers class, only small:

* `tokenizer`, `tokenizer_2`: transformers' `CLIPTokenizer` (tokenizers-backed in
  transformers 5) with a byte-level BPE vocabulary built here: all 256 byte symbols,
  with and without the `</w>` end-of-word suffix, as in CLIP, plus merges learned
  from `vocabulary` so each vocabulary word is one token. An unknown word falls back
  to byte symbols, so it never maps to the unknown token.
* `text_encoder`, `text_encoder_2`: two 2-layer `CLIPTextModelWithProjection`s (the
  pipeline reads `hidden_states[-2]`, so one layer would not do). Their
  `eos_token_id` is the real id of `<|endoftext|>`, so the pooled output is taken at
  the first EOS token (an `eos_token_id` of 2 would select CLIP's legacy argmax rule).
* `text_encoder_3`, `tokenizer_3` (with ``t5_layers > 0``): a ``t5_layers``-layer
  `T5EncoderModel` (gated GELU, as T5 v1.1 in SD3) at the transformer's
  `joint_attention_dim`, and a `T5TokenizerFast` whose Unigram vocabulary holds each
  vocabulary word as one piece, plus single characters so that an unknown word
  spells out rather than mapping to `<unk>`. With ``t5_layers=0`` both are None and
  the pipeline feeds zeros in the T5 slot. Either way the slot is
  `max_sequence_length` tokens long (diffusers' default is 256).
* `vae`: an `AutoencoderKL` with 4 latent channels and one 2x downsample, so a
  64 px image is a 4x32x32 latent (`sample_size` is the latent side).
* `transformer`: an `SD3Transformer2DModel` with patch 2 and 4 channels in and out.
* `scheduler`: `FlowMatchEulerDiscreteScheduler(shift=3.0)`, as for SD3.5.

The weights are random but drawn from `seed` only, so two builds with the same seed
have bit-identical state dicts; the T5 is drawn last, so adding it leaves the other
components' weights unchanged. `pipe.save_pretrained(d)` round-trips offline through
`policy.pipeline.load_pipeline(d)`; with a T5 also through plain
`StableDiffusion3Pipeline.from_pretrained(d)`. Without one, that call needs
`text_encoder_3=None, tokenizer_3=None`: diffusers saves the missing T5 as null and
refuses to load a null component that is not passed explicitly. The tokenizers are
saved as `tokenizer.json` only (no `vocab.json`/`merges.txt`/`spiece.model`), which
`CLIPTokenizer` and `T5TokenizerFast` read back.
"""

from collections import Counter
from collections.abc import Sequence
from itertools import pairwise

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tokenizers import pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

# The words of the shapes world's prompts ("a photo of a circle left of a blue
# triangle"). Unlisted words still tokenize, as several byte tokens each.
DEFAULT_VOCABULARY: tuple[str, ...] = (
    "a", "an", "photo", "of", "and", "left", "right", "above", "below",
    "one", "two", "three", "four",
    "red", "green", "blue", "yellow", "purple", "orange", "pink", "cyan",
    "white", "black", "gray", "brown",
    "circle", "circles", "square", "squares", "triangle", "triangles",
    "star", "stars", "hexagon", "hexagons", "diamond", "diamonds",
)  # fmt: skip

# The default VAE downsamples once (2x), so the default 32-px latent decodes to 64 px.
VAE_SCALE_FACTOR = 2
TINY_IMAGE_SIZE = 32 * VAE_SCALE_FACTOR


def vae_scale_factor(vae_channels: Sequence[int]) -> int:
    """A VAE with ``n`` block levels downsamples ``2 ** (n - 1)`` times."""
    return 2 ** (len(vae_channels) - 1)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"


def build_tiny_pipeline(
    *,
    seed: int = 0,
    sample_size: int = 32,
    vocabulary: Sequence[str] = DEFAULT_VOCABULARY,
    model_max_length: int = 20,
    transformer_layers: int = 2,
    transformer_heads: int = 2,
    head_dim: int = 16,
    text_hidden_size: int = 32,
    text_projection_dim: int = 32,
    vae_channels: tuple[int, ...] = (16, 32),
    latent_channels: int = 4,
    t5_layers: int = 0,
) -> StableDiffusion3Pipeline:
    """Build the tiny SD3 pipeline with weights drawn from `seed`.

    `sample_size` is the latent side; images are `sample_size * 2 ** (len(vae_channels) - 1)`
    pixels square (64 px by default). ``t5_layers > 0`` adds a T5 text encoder of that
    many layers; 0 leaves the T5 slot empty (zeros).
    The caller's global torch RNG state is left untouched.
    """
    tokenizer = build_tokenizer(vocabulary, model_max_length=model_max_length)
    # fork_rng restores the global RNG afterwards, so building a model does not
    # shift the random stream of whoever called us.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = _build_text_encoder(tokenizer, text_hidden_size, text_projection_dim)
        text_encoder_2 = _build_text_encoder(tokenizer, text_hidden_size, text_projection_dim)
        vae = _build_vae(sample_size * vae_scale_factor(vae_channels), vae_channels,
                         latent_channels)
        transformer = SD3Transformer2DModel(
            sample_size=sample_size,
            patch_size=2,
            in_channels=latent_channels,
            out_channels=latent_channels,
            num_layers=transformer_layers,
            attention_head_dim=head_dim,
            num_attention_heads=transformer_heads,
            # The pipeline zero-pads the concatenated CLIP states to this width.
            joint_attention_dim=2 * text_hidden_size,
            # The context stream runs at the image stream's width.
            caption_projection_dim=transformer_heads * head_dim,
            pooled_projection_dim=2 * text_projection_dim,
            pos_embed_max_size=sample_size // 2,
            qk_norm="rms_norm",  # as in SD3.5
        )
        # Last, so that a T5 leaves every other component's weights as they were.
        tokenizer_3 = build_t5_tokenizer(vocabulary) if t5_layers else None
        text_encoder_3 = (_build_t5_encoder(tokenizer_3, 2 * text_hidden_size, t5_layers)
                          if t5_layers else None)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        # Two tokenizer objects, as a saved pipeline loads two.
        tokenizer_2=build_tokenizer(vocabulary, model_max_length=model_max_length),
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def build_tokenizer(vocabulary: Sequence[str], *, model_max_length: int = 20) -> CLIPTokenizer:
    """A byte-level BPE `CLIPTokenizer` in which each vocabulary word is one token."""
    words = sorted({_checked_word(word) for word in vocabulary})
    # CLIP's layout: byte symbols, then the same with `</w>`, then merges, then specials.
    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = learn_merges(words)
    tokens = byte_symbols + [symbol + END_OF_WORD for symbol in byte_symbols]
    tokens += [left + right for left, right in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return CLIPTokenizer(
        vocab={token: index for index, token in enumerate(tokens)},
        merges=merges,
        model_max_length=model_max_length,
    )


T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
T5_WORD_START = "\u2581"  # sentencepiece's word-boundary mark
T5_CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()"


def build_t5_tokenizer(vocabulary: Sequence[str], *, model_max_length: int = 256) -> T5TokenizerFast:
    """A Unigram `T5TokenizerFast` in which each vocabulary word is one piece.

    T5's layout: pad 0, EOS 1, unk 2, then the pieces. A word's piece outscores any
    spelling of it; other words fall back to the bare word mark and one piece per
    character, which is what T5's sentencepiece model does with a rare word.
    """
    words = sorted({_checked_word(word) for word in vocabulary})
    pieces = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0)]
    pieces += [(T5_WORD_START + word, -1.0) for word in words]
    pieces += [(T5_WORD_START, -2.0)] + [(char, -5.0) for char in T5_CHARACTERS]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def _build_t5_encoder(tokenizer: T5TokenizerFast, width: int, layers: int) -> T5EncoderModel:
    """A small T5 v1.1-style encoder (gated GELU, untied, no dropout) of ``width``."""
    heads = 4 if width % 4 == 0 else 1
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=width,
        d_kv=width // heads,
        d_ff=2 * width,
        num_layers=layers,
        num_heads=heads,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config).eval()


def learn_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """Learn BPE merges until every word is a single symbol.

    Standard BPE training (merge the most frequent adjacent pair, ties broken by the
    pair itself, so it is deterministic). Because encoding replays merges in the
    order they were learned, each training word encodes to exactly one token.
    """
    spellings = [[*word[:-1], word[-1] + END_OF_WORD] for word in words]
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter(pair for symbols in spellings for pair in pairwise(symbols))
        if not pairs:
            return merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        spellings = [_apply_merge(symbols, best) for symbols in spellings]


def _apply_merge(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """Replace each left-to-right occurrence of `pair` in `symbols` by its join."""
    merged: list[str] = []
    index = 0
    while index < len(symbols):
        if index + 1 < len(symbols) and (symbols[index], symbols[index + 1]) == pair:
            merged.append(symbols[index] + symbols[index + 1])
            index += 2
        else:
            merged.append(symbols[index])
            index += 1
    return merged


def _checked_word(word: str) -> str:
    """Accept lowercase ASCII words only: CLIP's pre-tokenizer keeps those whole."""
    if not (word.isascii() and word.isalpha() and word.islower()):
        raise ValueError(
            f"vocabulary word {word!r} must be lowercase ASCII letters only; "
            "CLIP's pre-tokenizer would split anything else into several words"
        )
    return word


def _build_text_encoder(
    tokenizer: CLIPTokenizer, hidden_size: int, projection_dim: int
) -> CLIPTextModelWithProjection:
    """A 2-layer CLIP text encoder whose pooled output is read at the EOS token."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection_dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config).eval()


def _build_vae(image_size: int, channels: tuple[int, ...], latent_channels: int) -> AutoencoderKL:
    """An `AutoencoderKL` with `len(channels)` levels (SD3's has 4 levels and 16 channels).

    No attention in the mid block: at 64 px it attends over every latent pixel, which
    costs more than the rest of the tiny VAE and buys nothing on flat shapes.
    """
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=latent_channels,
        mid_block_add_attention=False,
        norm_num_groups=8,
        sample_size=image_size,
        # SD3's latent statistics; a trained replacement VAE should re-measure them.
        scaling_factor=1.5305,
        shift_factor=0.0609,
        # SD3's VAE has no 1x1 (post-)quant convolutions.
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()
