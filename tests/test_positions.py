"""RoPE maths and the family registry: the cache's rotary frequencies are the model's own, rotations
compose, and the families that cannot be re-positioned are refused."""

import pytest
import torch

from helpers import model_inv_freq, tiny_model
from sinkstream.positions import ALIBI_FAMILIES, UnsupportedModelError, check_supported, layer_kinds, rope_for


def test_rope_matches_the_models_rotary_embedding(family):
    model = tiny_model(family, layers=2)
    if model.config.model_type in ALIBI_FAMILIES:
        assert model_inv_freq(model, "full_attention") is None
        return
    for layer_type in set(getattr(model.config, "layer_types", None) or ["full_attention"]):
        ours = rope_for(model.config, layer_type).inv_freq.float()
        torch.testing.assert_close(ours, model_inv_freq(model, layer_type).float(), atol=0, rtol=1e-6)


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt_neox"])
def test_shifts_compose_and_undo(family):
    cfg = tiny_model(family, layers=1).config
    rope = rope_for(cfg)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    k = torch.randn(2, 3, 5, head_dim)
    torch.testing.assert_close(rope.shift(rope.shift(k, 700), 300), rope.shift(k, 1000), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rope.shift(rope.shift(k, 1234), -1234), k, atol=1e-4, rtol=1e-4)
    if rope.rot_dim < head_dim:  # partial rotary: the rest of each head is never touched
        torch.testing.assert_close(rope.shift(k, 99)[..., rope.rot_dim :], k[..., rope.rot_dim :], atol=0, rtol=0)


def test_layer_kinds_and_refusals():
    from transformers import GPT2Config

    assert set(layer_kinds(tiny_model("gemma3", layers=2).config, 64)) == {"rope", "sliding"}
    assert set(layer_kinds(tiny_model("mpt", layers=2).config, 64)) == {"alibi"}
    with pytest.raises(UnsupportedModelError, match="absolute positions"):
        check_supported(GPT2Config())
