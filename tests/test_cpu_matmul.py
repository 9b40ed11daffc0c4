import pytest
import torch

from sinkstream import cpu_matmul


def test_fast_cpu_matmul_restores_the_setting_and_keeps_fp32_accuracy():
    before = torch.backends.mkldnn.matmul.fp32_precision
    a, b = torch.randn(128, 576, dtype=torch.float64), torch.randn(576, 700, dtype=torch.float64)
    with cpu_matmul.fast_cpu_matmul() as on:
        assert on == cpu_matmul.onednn_is_fp32_exact()
        got = a.float() @ b.float()
    assert torch.backends.mkldnn.matmul.fp32_precision == before
    rel = ((got.double() - a @ b).abs() / (a.abs() @ b.abs())).max()
    assert rel < 1e-5  # bf16 arithmetic would give ~1e-3


def test_default_mode_leaves_pytorch_choice(monkeypatch):
    monkeypatch.setenv("SINKSTREAM_CPU_MATMUL", "default")
    before = torch.backends.mkldnn.matmul.fp32_precision
    with cpu_matmul.fast_cpu_matmul() as on:
        assert not on
        assert torch.backends.mkldnn.matmul.fp32_precision == before


def test_bad_mode_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("SINKSTREAM_CPU_MATMUL", "fastest")
    with pytest.raises(ValueError, match="SINKSTREAM_CPU_MATMUL"), cpu_matmul.fast_cpu_matmul():
        pass


@torch.no_grad()
def test_decode_layout_keeps_every_family_s_logits_and_greedy_tokens(family):
    import copy

    from helpers import random_ids, tiny_model, tiny_tokenizer
    from sinkstream import Engine

    ref = tiny_model(family, layers=2)
    fast = copy.deepcopy(ref)
    moved = cpu_matmul.decode_layout(fast)
    linears = [m for m in fast.modules() if isinstance(m, torch.nn.Linear)]
    assert moved >= 2 and all(not m.weight.is_contiguous() for m in linears if min(m.weight.shape) > 1)
    out_emb, in_emb = fast.get_output_embeddings(), fast.get_input_embeddings()
    if ref.get_output_embeddings().weight is ref.get_input_embeddings().weight:
        assert out_emb.weight is in_emb.weight  # still tied: one tensor moved once
    ids = random_ids(40)
    torch.testing.assert_close(fast(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)
    tok = tiny_tokenizer()
    runs = []
    for model in (ref, fast):
        engine = Engine(model, tok, n_sink=2, window=14)
        logits = engine.prefill(ids[0, :20].tolist())
        tokens = []
        for _ in range(40):  # past the 16-token cache: evictions and rebases on the moved weights
            tokens.append(int(logits.argmax()))
            logits = engine.step(tokens[-1])
        runs.append(tokens)
    assert runs[0] == runs[1]


def test_decode_layout_models_export_and_save(tmp_path, tiny_dir):
    from transformers import AutoModelForCausalLM

    from sinkstream import export_model, load_model

    model, tok = load_model(str(tiny_dir), weights="float32")
    assert any(not p.is_contiguous() for p in model.parameters())  # on by default on CPU
    plain, _ = load_model(str(tiny_dir), decode_layout=False, weights="float32")
    assert all(p.is_contiguous() for p in plain.parameters())
    export_model(model, tok, tmp_path / "exported")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    for (name, a), b in zip(plain.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    assert cpu_matmul.standard_layout(model) > 0 and all(p.is_contiguous() for p in model.parameters())
    model.save_pretrained(tmp_path / "saved")  # what save_pretrained needs


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads /proc/self/maps")
def test_decode_layout_hands_back_the_loaded_file_s_pages_and_nothing_else(tmp_path):
    import mmap

    from sinkstream.memory import rss_mb

    values = torch.arange(8 * 2**20, dtype=torch.float32)  # 32 MB
    (tmp_path / "w.bin").write_bytes(values.numpy().tobytes())
    with open(tmp_path / "w.bin", "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private file mapping, like safetensors'
    model = torch.nn.Linear(2048, 4096, bias=False)
    model.weight.data = torch.frombuffer(buf, dtype=torch.float32).view(4096, 2048)
    anon = torch.nn.Linear(2048, 4096, bias=False)
    anon_before = anon.weight.detach().clone()
    mapped = cpu_matmul._file_mappings()

    still_used = model.weight.data
    assert float(still_used.sum()) > 0  # every page now resident
    assert not cpu_matmul._release(still_used, model, mapped)  # the model still views it
    assert not cpu_matmul._release(anon.weight.data, torch.nn.Linear(1, 1), mapped)  # not a file page
    assert torch.equal(anon.weight, anon_before)

    before = rss_mb()
    assert cpu_matmul.decode_layout(model) == 1
    assert torch.equal(model.weight, values.view(4096, 2048)) and not model.weight.is_contiguous()
    assert rss_mb() - before < 16  # the 32 MB copy replaced the 32 MB of file pages
    assert torch.equal(still_used, values.view(4096, 2048))  # released pages read back from the file
