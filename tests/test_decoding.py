"""One stream's decoding: detokenization with stop strings, and the row that decides when an answer
ends (EOS unseen, a stop string cut, max_new_tokens) and what was fed."""

import torch

from helpers import tiny_tokenizer
from sinkstream.decoding import Detokenizer, RowState
from sinkstream.sampling import SamplingParams


def test_stop_string_cuts_text():
    tok = tiny_tokenizer()
    d = Detokenizer(tok, stop=["END"])
    out, hit = "", False
    for i in tok("abc ENx yz END tail").input_ids:
        piece, hit = d.add(i)
        out += piece
        if hit:
            break
    assert hit and out + d.flush() == "abc ENx yz " and d.text == "abc ENx yz "


def _row(**params) -> tuple[RowState, list[int]]:
    tok = tiny_tokenizer()
    return RowState.start(tok, SamplingParams(**params), {tok.eos_token_id}, "cpu"), tok("hello world").input_ids


def test_row_ends_at_length_with_its_last_token_unfed():
    row, ids = _row(max_new_tokens=3)
    texts = []
    for tid in ids[:3]:
        assert not row.done
        texts.append(row.accept(tid))
        if not row.done:
            row.fed()
    assert row.finish_reason == "length" and row.generated == ids[:3] and row.last_unfed
    assert "".join(texts) + row.flush() == "hel" == row.text


def test_row_ends_unseen_on_eos_and_cut_on_a_stop_string():
    row, ids = _row(max_new_tokens=10)
    row.accept(ids[0])
    row.fed()
    assert row.accept(row.eos_ids.copy().pop()) is None
    assert row.finish_reason == "stop" and row.generated == ids[:1] and not row.last_unfed and not row.stop_hit
    row, ids = _row(max_new_tokens=50, stop=["lo w"])
    for tid in ids:
        row.accept(tid)
        if row.done:
            break
    assert row.stop_hit and row.finish_reason == "stop" and row.text == "hel"


def test_row_sampling_applies_its_bias_and_generator():
    tok = tiny_tokenizer()
    biased = RowState.start(tok, SamplingParams(temperature=0), set(), "cpu", logit_bias={7: 5.0}, vocab=40)
    assert biased.sample(torch.zeros(1, 40)) == 7
    logits = torch.randn(1, 40, generator=torch.Generator().manual_seed(0))
    a, b, c = (RowState.start(tok, SamplingParams(temperature=1.0, seed=s), set(), "cpu") for s in (3, 3, 4))
    draws = [[r.sample(logits) for _ in range(20)] for r in (a, b, c)]
    assert draws[0] == draws[1] != draws[2]  # each row its own generator, seeded alike
