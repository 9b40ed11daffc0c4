"""ChatSession: each turn prefills only the new message, the transcript is what was generated, and a
stop string closes the turn."""

import json

import pytest

from helpers import tiny_model, tiny_tokenizer
from sinkstream import ChatSession, Engine, SamplingParams


@pytest.fixture(scope="module")
def engine():
    return Engine(tiny_model("llama", layers=2), tiny_tokenizer(), n_sink=4, window=32)


def test_chat_turns_prefill_only_the_new_message(engine):
    chat = ChatSession(engine)
    history_tokens = 0
    for i in range(12):  # 12 turns: far past the 36-token cache
        message = f"question number {i}?"
        before = engine.stats.tokens_prefilled
        expected = len(engine.tokenizer(chat.new_turn_text(message), add_special_tokens=False).input_ids)
        answer = "".join(chat.send(message, SamplingParams(max_new_tokens=10)))
        prefilled = engine.stats.tokens_prefilled - before
        assert prefilled == expected
        # the new turn is the message plus template markers (and the unfed last answer token)
        assert prefilled <= len(message) + 25
        # the transcript keeps the answer as generated (special tokens too); the display skips them
        content = chat.messages[-1]["content"]
        tok = engine.tokenizer
        assert tok.decode(tok(content, add_special_tokens=False).input_ids, skip_special_tokens=True) == answer
        history_tokens += prefilled
        assert engine.tokens_cached <= 36
    assert engine.tokens_seen > 3 * 36
    # everything fed is exactly the rendered conversation so far (nothing fed twice)
    rendered = tiny_tokenizer().apply_chat_template(chat.messages, tokenize=False)
    assert rendered.startswith(chat.fed_text)
    assert json.loads(json.dumps(engine.summary()))["max_cache_tokens"] == 36


def test_chat_after_a_stop_string_closes_the_turn(engine):
    chat = ChatSession(engine)
    first = "".join(chat.send("hello", SamplingParams(max_new_tokens=30)))
    assert first  # greedy continuation of the tiny model
    stop = first[2:4]
    chat.reset()
    cut = "".join(chat.send("hello", SamplingParams(max_new_tokens=30, stop=[stop])))
    assert cut == first[: first.index(stop)] and chat.messages[-1]["content"] == cut  # the transcript is cut too
    delta = chat.new_turn_text("next")
    assert delta.startswith("</s>") and delta.endswith("<s>user: next</s><s>assistant: ")
