"""The real embedded model (SmolLM2-135M-Instruct). Slow: run with `make test-slow`."""

import pytest
import torch

from sinkstream import Engine, SamplingParams, SinkCache, load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm():
    torch.set_num_threads(2)
    return load_model()


def test_400_greedy_tokens_through_4_plus_60(smollm):
    model, tok = smollm
    engine = Engine(model, tok, n_sink=4, window=60)
    engine.eos_ids = set()  # stream all 400 tokens
    prompt = tok("The history of the printing press begins").input_ids
    toks = [t for t in engine.generate(prompt, SamplingParams(max_new_tokens=400))]
    ids = [t.id for t in toks if t.id >= 0]
    assert len(ids) == 400
    assert engine.tokens_seen == len(prompt) + 399
    assert engine.stats.max_cache_tokens == 64 and engine.tokens_cached == 64
    assert engine.stats.rebases > 0
    text = "".join(t.text for t in toks)
    assert len(set(ids[-200:])) > 20, text  # still fluent text far past the cache, not a collapse
    # until the first eviction, streaming is exactly dense greedy decoding
    model.generation_config.eos_token_id = None
    first = 64 - len(prompt)  # tokens generated before the first eviction
    dense = model.generate(torch.tensor([prompt]), max_new_tokens=first, do_sample=False)[0, len(prompt):]
    assert ids[:first] == dense.tolist()
    cache = SinkCache(4, 60, config=model.config)
    out = model.generate(torch.tensor([prompt]), past_key_values=cache, max_new_tokens=100, do_sample=False)
    assert cache.tokens_cached == 64 and out.shape[1] == len(prompt) + 100


def test_load_from_gguf_file_path_and_exported_folder(smollm, tmp_path):
    from sinkstream.models import KNOWN_MODELS, export_model

    known = KNOWN_MODELS["smollm2-135m"]
    model, tok = load_model(str(known.folder() / known.gguf_file))
    ref, _ = smollm
    ids = torch.tensor([tok("A quick test of loading paths.").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=0, rtol=0)
        folder = export_model(model, tok, tmp_path / "export")
        again, _ = load_model(str(folder))
        torch.testing.assert_close(again(ids).logits, ref(ids).logits, atol=0, rtol=0)
