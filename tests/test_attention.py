"""attn_implementation="sinkstream": one-query decode steps by plain matmuls == eager attention."""

import pytest
import torch

from helpers import random_ids, tiny_model, tiny_tokenizer
from sinkstream import Engine
from sinkstream.attention import register

INTERFACE = ["llama", "llama-scaled", "mistral", "qwen2", "qwen3", "phi3", "gemma3", "gpt_neox"]


@pytest.mark.parametrize("family", INTERFACE)
@torch.no_grad()
def test_decode_steps_equal_eager(family):
    register()
    ids = random_ids(160, seed=3)[0].tolist()
    logits = {}
    for attn in ("eager", "sinkstream"):
        model = tiny_model(family, layers=2, attn=attn)
        engine = Engine(model, tiny_tokenizer(), n_sink=4, window=24, prefill_chunk=8)
        engine.prefill(ids[:20])
        logits[attn] = torch.stack([engine.step(t)[0] for t in ids[20:]])  # far past the window, with rebases
    torch.testing.assert_close(logits["sinkstream"], logits["eager"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gemma3", "phi3"])
def test_ragged_batch_with_mask(family):
    from test_batch import _batch_equals_alone

    register()
    _batch_equals_alone(family, "sinkstream")


def test_learned_sinks_refused():
    register()
    model = tiny_model("gpt_oss", layers=2, attn="eager")
    model.set_attn_implementation("sinkstream")
    with pytest.raises(ValueError, match="eager"):
        model(torch.tensor([[5, 6, 7]]))
