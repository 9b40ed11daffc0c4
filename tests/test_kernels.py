import shutil

import pytest
import torch

from sinkstream import kernels


def test_fast_cpu_matmul_restores_the_setting_and_keeps_fp32_accuracy():
    before = torch.backends.mkldnn.matmul.fp32_precision
    a, b = torch.randn(128, 576, dtype=torch.float64), torch.randn(576, 700, dtype=torch.float64)
    with kernels.fast_cpu_matmul() as on:
        assert on == kernels.onednn_is_fp32_exact()
        got = a.float() @ b.float()
    assert torch.backends.mkldnn.matmul.fp32_precision == before
    rel = ((got.double() - a @ b).abs() / (a.abs() @ b.abs())).max()
    assert rel < 1e-5  # bf16 arithmetic would give ~1e-3


def test_default_mode_leaves_pytorch_choice(monkeypatch):
    monkeypatch.setenv("SINKSTREAM_CPU_MATMUL", "default")
    before = torch.backends.mkldnn.matmul.fp32_precision
    with kernels.fast_cpu_matmul() as on:
        assert not on
        assert torch.backends.mkldnn.matmul.fp32_precision == before


def test_bad_mode_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("SINKSTREAM_CPU_MATMUL", "fastest")
    with pytest.raises(ValueError, match="SINKSTREAM_CPU_MATMUL"):
        with kernels.fast_cpu_matmul():
            pass


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")
@torch.no_grad()
def test_compiled_decode_gives_the_same_greedy_tokens():
    from helpers import random_ids, tiny_model, tiny_tokenizer

    from sinkstream import Engine, SamplingParams

    prompt = random_ids(40, seed=4)[0].tolist()
    params = SamplingParams(max_new_tokens=60, temperature=0.0)
    ref_model = tiny_model("llama", layers=2, attn="sdpa")
    ref = Engine(ref_model, tiny_tokenizer(), n_sink=4, window=24)
    want = [t.id for t in ref.generate(prompt, params)]
    model = tiny_model("llama", layers=2, attn="sdpa")
    engine = Engine(model, tiny_tokenizer(), n_sink=4, window=24, compile=True)
    assert engine.compiled == ["model.layers.0.mlp", "model.layers.1.mlp", "lm_head"]
    got = [t.id for t in engine.generate(prompt, params)]
    assert got == want
    torch.testing.assert_close(engine.step(5), ref.step(5), atol=1e-4, rtol=0)
