"""The flat weight buffer round-trips a LoRA state dict exactly."""

import numpy as np
import pytest
import torch

from policy.weights import flatten_weights, unflatten_weights


def test_round_trip_is_exact_and_layout_is_sorted():
    g = torch.Generator().manual_seed(0)
    state = {"b.lora_A": torch.randn(4, 3, generator=g), "a.lora_B": torch.randn(2, 4, generator=g),
             "c": torch.randn(5, generator=g)}
    flat = flatten_weights(state, version=7)
    assert flat.version == 7 and flat.names == ("a.lora_B", "b.lora_A", "c")
    assert flat.buffer.dtype == np.float32 and flat.buffer.size == 8 + 12 + 5
    back = unflatten_weights(flat)
    assert back.keys() == state.keys()
    for k in state:
        assert torch.equal(back[k], state[k])


def test_read_only_buffer_and_bad_layout():
    flat = flatten_weights({"w": torch.ones(3)}, version=0)
    flat.buffer.setflags(write=False)  # as numpy arrays come out of Ray's object store
    assert torch.equal(unflatten_weights(flat)["w"], torch.ones(3))
    bad = type(flat)(0, np.zeros(4, np.float32), ("w",), ((3,),))
    with pytest.raises(ValueError, match="layout"):
        unflatten_weights(bad)
