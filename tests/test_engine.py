"""Engine: seeded generation, stop conditions, chat turns prefill only the new message."""

import pytest

from helpers import tiny_model, tiny_tokenizer
from sinkstream import Engine, SamplingParams


@pytest.fixture(scope="module")
def engine():
    return Engine(tiny_model("llama", layers=2), tiny_tokenizer(), n_sink=4, window=32)


def test_seeded_sampling_is_reproducible(engine):
    ids = engine.tokenizer("Once upon a time").input_ids
    params = SamplingParams(max_new_tokens=40, temperature=0.9, top_p=0.95, seed=7)
    runs = []
    for _ in range(2):
        engine.reset()
        runs.append([t.id for t in engine.generate(ids, params)])
    assert runs[0] == runs[1] and len(runs[0]) > 0


def test_eos_stops_generation(engine):
    ids = engine.tokenizer("hello").input_ids
    engine.reset()
    greedy = [t.id for t in engine.generate(ids, SamplingParams(max_new_tokens=5))]
    saved = engine.eos_ids
    engine.eos_ids = {greedy[2]}  # pretend the third greedy token is EOS
    try:
        engine.reset()
        answer = engine.generate(ids, SamplingParams(max_new_tokens=5))
        toks = [t.id for t in answer if t.id >= 0]
    finally:
        engine.eos_ids = saved
    assert (
        toks == greedy[:2] == answer.row.generated and engine.stats.finish_reason == answer.row.finish_reason == "stop"
    )
    assert not answer.row.last_unfed  # every yielded token was fed before EOS was sampled


def test_dense_engine_breaks_at_max_positions_streaming_does_not():
    from sinkstream.eval.chatrun import run_chat

    model, tok = tiny_model("llama", layers=2), tiny_tokenizer()
    questions = [{"question_id": i, "turns": [f"tell me about {i}", "and more"]} for i in range(6)]
    params = SamplingParams(max_new_tokens=30)
    dense = Engine(model, tok, dense=True)
    recs, ended = run_chat(dense, questions, params, max_positions=200, progress=False)
    assert 0 < len(recs) < 12 and "200 positions" in ended and recs[-1]["tokens_cached"] == recs[-1]["tokens_seen"]
    stream = Engine(model, tok, n_sink=4, window=60)
    recs, ended = run_chat(stream, questions, params, progress=False)
    assert len(recs) == 12 and ended == "all turns answered" and max(r["tokens_cached"] for r in recs) <= 64
