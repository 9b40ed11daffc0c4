"""Model loading (models.py) step by step: names and paths resolved or refused with a message that says
what to do, a local folder read, the model checked and given its attention, its weights laid out."""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_model, tiny_tokenizer
from sinkstream import native
from sinkstream.models import ModelLoadError, export_model, lay_out_weights, load_model, resolve, with_attention
from sinkstream.quant import PackedLinear


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return export_model(tiny_model("llama", layers=2), tiny_tokenizer(), tmp_path_factory.mktemp("m") / "llama")


def test_resolve(llama_dir, tmp_path):
    assert resolve(str(llama_dir)) == (llama_dir, None)
    (tmp_path / "weights.bin").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    for name, needle in (("no-such-model", "neither a known model"), (str(tmp_path / "weights.bin"), ".gguf"),
                         (str(tmp_path / "empty"), "config.json")):  # fmt: skip
        with pytest.raises(ModelLoadError, match=needle):
            resolve(name)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve(str(gguf)) == (tmp_path, "m.gguf")


def test_load_a_local_folder(llama_dir):
    model, tok = load_model(str(llama_dir), weights="float32")
    assert model.config._attn_implementation == "sinkstream" and not model.training
    assert tok("ab").input_ids == tiny_tokenizer()("ab").input_ids
    ref = tiny_model("llama", layers=2)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)


def test_weights_are_laid_out_where_the_fused_step_runs():
    llama = tiny_model("llama")
    lay_out_weights(llama, "int8", auto=False, device="cpu", decode_layout=False)
    packed = [m for m in llama.modules() if isinstance(m, PackedLinear)]
    assert packed and all(m.packed == native.available() for m in packed)
    neox = tiny_model("gpt_neox")  # no fused step for this family
    with pytest.raises(ValueError, match="--weights int8 is not available"):
        lay_out_weights(neox, "int8", auto=False, device="cpu", decode_layout=False)
    lay_out_weights(neox, "int8", auto=True, device="cpu", decode_layout=False)  # auto: float32 where int8 cannot run
    assert not any(isinstance(m, PackedLinear) for m in neox.modules())


def test_a_zero_sink_model_keeps_its_own_attention():
    model = tiny_model("llama")
    model.config.sinkstream_sink_mode = "zero"
    with pytest.raises(ValueError, match="zero-sink"):
        with_attention(model, "sdpa")
