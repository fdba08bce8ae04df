"""policy.prompt_table: conditioning encoded once and looked up, exactly as encoded."""

import pytest
import torch

from policy.pipeline import build_pipeline
from policy.prompt_table import PromptTable, text_source
from policy.sampler import encode_prompts

PROMPTS = ["a photo of a circle", "a photo of two red squares", "a photo of a circle"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_lookup_is_what_the_encoders_returned_in_their_dtype(dtype):
    pipe = build_pipeline("tiny-random", dtype=dtype)
    table = PromptTable.build(pipe, PROMPTS, 8)
    assert table.prompts == ("", PROMPTS[0], PROMPTS[1]) and table.dtype == dtype
    direct = encode_prompts(pipe, ["", *PROMPTS[:2]], 8)  # the batch the table encoded
    got = table.encode(["", *PROMPTS[:2]])
    assert got.embeds.dtype == direct.embeds.dtype == getattr(torch, dtype)
    assert torch.equal(got.embeds, direct.embeds) and torch.equal(got.pooled, direct.pooled)
    # rows come back in the order asked, repeats included
    again = table.encode([PROMPTS[1], PROMPTS[0], PROMPTS[1]])
    assert torch.equal(again.embeds[0], again.embeds[2])
    assert torch.equal(again.embeds[1], got.embeds[1])
    assert table.nbytes == table.embeds.nbytes + table.pooled.nbytes


def test_an_actor_refuses_a_table_of_another_length():
    pipe = build_pipeline("tiny-random")
    table = PromptTable.build(pipe, PROMPTS, 8)
    assert text_source(pipe, 8, table) is table
    with pytest.raises(ValueError, match="encoded with max_sequence_length 8, this actor uses 16"):
        text_source(pipe, 16, table)
    assert text_source(pipe, 16, None).encode(PROMPTS[:1]).embeds.shape[1] > 16
