"""Pre-training with a sink: each mode trains (loss falls), the zero-sink softmax is softmax-off-by-one,
the learnable sink is the first cache entry and survives eviction, and the streaming evaluation is exact
for the trained models."""

import json

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from sinkstream import Engine
from sinkstream.attention import zero_sink_attention, zero_sink_attention_eager
from sinkstream.cli import main
from sinkstream.eval.exact import exact_stream_logits
from sinkstream.models import load_model
from sinkstream.plots import plot_losses
from sinkstream.train import SINK_MODES, TrainConfig, build_model, log_rows, train, train_tokenizer

TINY = dict(
    layers=2,
    hidden=32,
    heads=2,
    ffn=64,
    seq=32,
    vocab=300,
    batch=8,
    steps=60,
    warmup=5,
    lr=3e-3,
    eval_every=30,
    save_every=30,
)


def _text(seed: int, n: int = 3000) -> str:
    """Sentences from a tiny grammar: learnable structure, so the loss must fall."""
    rng = np.random.default_rng(seed)
    subj, verb, obj = (
        ["the cat", "a dog", "my friend", "the old man"],
        ["saw", "liked", "found"],
        ["a hat", "the sea", "bread"],
    )
    return " ".join(f"{rng.choice(subj)} {rng.choice(verb)} {rng.choice(obj)}." for _ in range(n))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, monkeypatch_module):
    out, runs = {}, tmp_path_factory.mktemp("runs")
    for mode in SINK_MODES:
        folder = runs / mode
        out[mode] = (
            train(TrainConfig(sink_mode=mode, **TINY), _text(0), _text(1, 400), folder, progress=False),
            folder,
        )
    return out


@pytest.fixture(scope="module")
def monkeypatch_module(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("SINKSTREAM_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield mp
    mp.undo()


@pytest.mark.parametrize("mode", SINK_MODES)
def test_training_lowers_the_loss(trained, mode):
    summary, folder = trained[mode]
    assert summary["last_loss_avg10"] < summary["first_loss"] - 1.0
    rows = [json.loads(x) for x in (folder / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 61))
    held = [r["held_out_loss"] for r in rows if "held_out_loss" in r]
    assert len(held) == 2 and held[1] < held[0]
    sink = [r for r in rows if "sink_head_mass" in r]
    assert len(sink) == 2 and all(len(r["sink_head_mass"]) == len(r["first_token_mass"]) == 2 for r in sink)
    assert all(0 < m <= 1 for r in sink for m in r["sink_head_mass"] + r["first_token_mass"])
    assert (folder / "final" / "config.json").is_file()
    plot_losses(log_rows(folder), folder / "loss.png", mode, TINY["seq"])  # what `sinkstream train` draws
    assert (folder / "loss.png").stat().st_size > 1000
    model, _tok = load_model(str(folder / "final"))
    assert model.config.sinkstream_sink_mode == mode
    assert model.config._attn_implementation == ("sinkstream_zero" if mode == "zero" else "sinkstream")


def test_same_start_for_every_mode(monkeypatch_module, tmp_path):
    plain, sink_first = train_tokenizer(_text(0), 300, tmp_path), train_tokenizer(_text(0), 300, tmp_path, True)
    assert plain.get_vocab() == sink_first.get_vocab()
    models = [build_model(TrainConfig(sink_mode=m, **TINY), plain) for m in SINK_MODES]
    for other in models[1:]:
        for a, b in zip(models[0].parameters(), other.parameters()):
            assert torch.equal(a, b)
    sink = sink_first.convert_tokens_to_ids("<|sink|>")
    assert sink_first("a cat").input_ids[0] == sink_first.bos_token_id == sink
    assert plain("a cat").input_ids == sink_first("a cat").input_ids[1:] and plain.bos_token_id is None


def _reference(q, k, v, mask, scale):
    """Softmax-off-by-one written plainly: the scores with a 0 logit appended, softmax, drop it."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ k.transpose(-1, -2) * scale + mask
    s = torch.cat([s, torch.zeros(*s.shape[:-1], 1, dtype=s.dtype)], -1)
    return (s.softmax(-1)[..., :-1] @ v).transpose(1, 2)


@pytest.mark.parametrize("q_len, kv_len", [(7, 7), (3, 11), (1, 9)])
def test_zero_sink_is_softmax_off_by_one(q_len, kv_len):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, q_len, 16), torch.randn(2, 2, kv_len, 16), torch.randn(2, 2, kv_len, 16)
    allowed = torch.arange(kv_len)[None] <= torch.arange(q_len)[:, None] + kv_len - q_len
    additive = torch.zeros(q_len, kv_len).masked_fill(~allowed, float("-inf"))
    ref = _reference(q, k, v, additive, 0.25)
    module = torch.nn.Module()
    for mask in (None, allowed[None, None].expand(2, 1, -1, -1), additive[None, None]):
        out, _ = zero_sink_attention(module, q, k, v, mask, scaling=0.25)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
        out, w = zero_sink_attention_eager(module, q, k, v, mask, scaling=0.25)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
        assert (w.sum(-1) < 1).all()  # attention may go nowhere


@pytest.mark.parametrize("mode", ["zero", "learnable"])
@torch.no_grad()
def test_streaming_exact_for_trained_models(trained, mode):
    """The exact chunked evaluation == the engine's ring cache, token by token, for both sink kinds."""
    model, tok = load_model(str(trained[mode][1] / "final"))
    ids = torch.tensor(tok(_text(2, 60)).input_ids[:150])  # learnable: starts with <|sink|>
    assert (ids[0] == tok.bos_token_id) == (mode == "learnable")
    engine = Engine(model, tok, n_sink=1, window=20)
    ref = torch.stack([engine.step(int(t))[0] for t in ids])
    got = torch.cat([lg for _, lg in exact_stream_logits(model, ids, 1, 20, chunk=8)])
    assert (got - ref).abs().max() < 1e-4


@torch.no_grad()
def test_learnable_sink_is_kept_as_the_sink(trained):
    model, tok = load_model(str(trained["learnable"][1] / "final"))
    ids = tok(_text(3, 80)).input_ids[:300]
    engine = Engine(model, tok, n_sink=1, window=24)
    engine.prefill(ids)
    assert engine.tokens_seen == 300 and engine.tokens_cached == 25  # the sink plus the window
    alone = DynamicCache(config=model.config)
    model(input_ids=torch.tensor([[tok.bos_token_id]]), past_key_values=alone, use_cache=True)
    for i, layer in enumerate(engine.cache.layers):
        _k, v, pos = layer.contents()
        # the first cache entry is still the sink token's, 276 evictions later (values carry no position)
        torch.testing.assert_close(v[:, :, 0], alone.layers[i].values[:, :, 0], atol=1e-5, rtol=0)
        assert pos[1] - pos[0] == 1  # in-cache positions: the sink right before the window


def test_train_cli_errors(capsys):
    for argv, msg in (
        (["--sink-mode", "odd", "--out", "x"], "--sink-mode"),
        (["--sink-mode", "zero", "--out", "x", "--hidden", "30", "--heads", "4"], "heads"),
        (["--sink-mode", "zero", "--out", "x", "--text", "a.txt"], "--eval-text"),
    ):
        assert main(["train", *argv]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1


def test_sinkgrid(trained, tmp_path, capsys):
    """Table 3 on the tiny runs, through the CLI: every cell, the dense reference, first-token mass per layer."""
    held_out = tmp_path / "held.txt"
    held_out.write_text(_text(4, 200))
    runs = trained["vanilla"][1].parent
    assert (
        main(
            [
                "eval",
                "sinkgrid",
                "--runs",
                str(runs),
                "--text",
                str(held_out),
                "--tokens",
                "300",
                "--stride",
                "10",
                "--out",
                str(tmp_path / "grid"),
                "--json",
                "--no-progress",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = summary["rows"]
    assert summary["cache"] == 32 and list(rows) == ["vanilla", "zero", "learnable"]
    for mode, col in (("vanilla", "0+32"), ("zero", "0+32"), ("learnable", "1+31")):
        # the whole cache as window: close to recomputing (not equal: streamed keys keep their old context)
        assert rows[mode][f"{col} (sample)"] == pytest.approx(rows[mode]["dense_in_training_length"], rel=0.05)
        assert all(1 < rows[mode][f"{k}+{32 - k}"] < 300 for k in (0, 1, 2, 4))
        for key in ("first_token_mass", "sink_head_mass"):
            assert len(rows[mode][key]) == 2 and all(0 <= m <= 1 for m in rows[mode][key])
    assert (tmp_path / "grid" / "sinkgrid.md").is_file() and (tmp_path / "grid" / "sinkgrid.png").is_file()
    curves = summary["training"]  # the sink measures the training logged at steps 30 and 60
    assert list(curves) == ["vanilla", "zero", "learnable"]
    assert [r["tokens"] for r in curves["vanilla"]] == [30 * 8 * 32, 60 * 8 * 32]
    assert (tmp_path / "grid" / "sink_over_training.png").is_file()
    assert main(["eval", "sinkgrid", "--runs", str(tmp_path)]) == 2  # no runs there: one line, exit 2
    capsys.readouterr()
    for mode in ("learnable", "zero"):  # `sinkstream attn` on a trained model: its own sink first, its own softmax
        assert (
            main(
                [
                    "attn",
                    "--model",
                    str(runs / mode / "final"),
                    "--text",
                    str(held_out),
                    "--tokens",
                    "20",
                    "--out",
                    str(tmp_path / f"attn-{mode}"),
                    "--json",
                ]
            )
            == 0
        )
        attn = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert (attn["first_token"] == "<|sink|>") == (mode == "learnable")
