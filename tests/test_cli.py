"""The sinkstream command: bad input exits 2 with one line; happy paths print JSON stats last."""

import json
import subprocess
import sys

import pytest

from sinkstream.cli import main


def run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture
def prompts_file(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("# comment\nhello there\n\nhow are you?\nthird round\n")
    return p


BAD = [
    (["generate", "--prompt", "x", "--window", "0"], "--window must be > 0"),
    (["generate", "--prompt", "x", "--window", "-5"], "--window must be > 0"),
    (["generate", "--prompt", "x", "--sink", "-1"], "--sink must be >= 0"),
    (["generate", "--prompt", "x", "--model", "/no/such/model"], "neither a known model"),
    (["generate", "--prompt", "x", "--dtype", "float8"], "unknown --dtype"),
    (["generate", "--prompt", "x", "--max-new-tokens", "-2"], "must be >= 0"),
    (["generate", "--prompt", "x", "--top-k", "-1"], "must be >= 0"),
    (["generate", "--prompt", "x", "--top-p", "0"], "--top-p"),
    (["generate", "--prompt", "   "], "--prompt is empty"),
    (["generate"], "required"),
    (["chat", "--prompts", "/no/such/file.txt"], "does not exist"),
    (["frobnicate"], "invalid choice"),
    (["generate", "--prompt", "x", "--weights", "int9"], "--weights: invalid choice"),
    (["chat", "--weights", "int8", "--device", "cuda"], "--weights int8 is for float32 models on the CPU"),
    (["generate", "--prompt", "x", "--weights", "bfloat16", "--dtype", "bfloat16"], "use --weights float32"),
    (["generate", "--prompt", "x", "--decode", "fast"], "--decode: invalid choice"),
    (["serve", "--weights", "int4"], "--weights: invalid choice"),
    (["bench", "decode", "--decode", "quick"], "--decode: invalid choice"),
    (["generate", "--prompt", "x", "--seed", str(2**64)], "--seed must be in"),
    (["generate", "--prompt", "x", "--temperature", "nan"], "--temperature must be a finite number"),
    (["chat", "--pin", "all"], "--pin must be auto, none or a number of tokens"),
    (["generate", "--prompt", "x", "--pin", "-3"], "--pin must be auto, none or a number of tokens"),
    (["serve", "--pin", "1024"], "--pin 1024 leaves no window in a 1024-token cache"),
    (["eval", "streameval", "--pin", "2000", "--window", "60"], "--pin 2000 leaves no window"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_exits_2_with_one_line(capsys, argv, message):
    rc, out, err = run(capsys, *argv)
    assert rc == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sinkstream: error:") and message in lines[0]


def test_empty_or_unreadable_prompt_file(capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only a comment\n  \n")
    rc, _, err = run(capsys, "chat", "--prompts", str(empty))
    assert rc == 2 and "has no prompts" in err and len(err.strip().splitlines()) == 1
    binary = tmp_path / "bad.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    rc, _, err = run(capsys, "chat", "--prompts", str(binary))
    assert rc == 2 and "cannot read prompt file" in err
    unreadable_model = tmp_path / "model.bin"
    unreadable_model.write_text("not a model")
    rc, _, err = run(capsys, "generate", "--prompt", "x", "--model", str(unreadable_model))
    assert rc == 2 and "not a .gguf file" in err


def test_model_folder_of_unsupported_family(capsys, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path)
    from helpers import tiny_tokenizer

    tiny_tokenizer().save_pretrained(tmp_path)
    rc, _, err = run(capsys, "generate", "--prompt", "x", "--model", str(tmp_path))
    assert rc == 2 and "absolute positions" in err and "llama" in err


def test_fused_decode_where_the_family_has_none(capsys, tmp_path):
    from helpers import tiny_model, tiny_tokenizer

    tiny_model("gpt_neox").save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    capsys.readouterr()
    rc, _, err = run(capsys, "generate", "--prompt", "x", "--model", str(tmp_path), "--decode", "fused")
    assert rc == 2 and "--decode fused: the fused step covers llama" in err and len(err.strip().splitlines()) == 1
    rc, _, err = run(capsys, "generate", "--prompt", "x", "--model", str(tmp_path), "--weights", "int8")
    assert rc == 2 and "--weights int8 is not available for this model" in err
    rc, _out, _ = run(capsys, "generate", "--prompt", "x", "--model", str(tmp_path), "--max-new-tokens", "3")
    assert rc == 0  # auto: float32 weights and the transformers step


def test_no_traceback_in_a_real_process():
    proc = subprocess.run(
        [sys.executable, "-m", "sinkstream", "generate", "--prompt", "x", "--window", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "sinkstream: error: --window must be > 0, got 0"


def test_generate_streams_and_prints_json_last(capsys, tiny_dir):
    rc, out, _ = run(
        capsys,
        "generate",
        "--model",
        str(tiny_dir),
        "--prompt",
        "hello world",
        "--sink",
        "2",
        "--window",
        "8",
        "--max-new-tokens",
        "40",
        "--json",
    )
    assert rc == 0
    stats = json.loads(out.strip().splitlines()[-1])
    for key in ("tokens_generated", "tokens_seen", "max_cache_tokens", "tokens_per_s", "peak_rss_mb"):
        assert key in stats
    assert stats["max_cache_tokens"] <= 10 and stats["tokens_seen"] >= 40


def test_chat_scripted_rounds(capsys, tiny_dir, prompts_file):
    rc, out, _ = run(
        capsys,
        "chat",
        "--model",
        str(tiny_dir),
        "--prompts",
        str(prompts_file),
        "--sink",
        "4",
        "--window",
        "24",
        "--max-new-tokens",
        "12",
        "--json",
    )
    assert rc == 0
    assert out.count("### round") == 3
    stats = json.loads(out.strip().splitlines()[-1])
    assert stats["rounds"] == 3 and stats["max_cache_tokens"] <= 28 and stats["tokens_seen"] > 28


def test_chat_pins_the_system_prompt_and_reports_it(capsys, tiny_dir, prompts_file):
    """The template's preamble with the system prompt stays in the cache (--json shows how many tokens);
    --pin none keeps the sinks alone; auto with a prefix over a quarter of the cache says so on stderr."""
    common = ["chat", "--model", str(tiny_dir), "--prompts", str(prompts_file), "--max-new-tokens", "12", "--json"]
    system = ["--system", "Be brief."]
    rc, out, err = run(capsys, *common, *system, "--window", "124")
    pinned = json.loads(out.strip().splitlines()[-1])["tokens_pinned"]
    assert rc == 0 and 4 < pinned <= 32 and "not pinned" not in err
    rc, out, _ = run(capsys, *common, *system, "--window", "124", "--pin", "none")
    assert json.loads(out.strip().splitlines()[-1])["tokens_pinned"] == 4
    rc, out, err = run(capsys, *common, *system, "--window", "60")  # a quarter of 64 is less than the preamble
    assert json.loads(out.strip().splitlines()[-1])["tokens_pinned"] == 4
    assert f"the system prompt: {pinned} tokens, more than a quarter of the 64-token cache" in err
    rc, out, err = run(capsys, *common, *system, "--window", "60", "--pin", str(pinned))
    assert json.loads(out.strip().splitlines()[-1])["tokens_pinned"] == pinned


def test_chat_repl(tiny_dir):
    script = "hello\n/stats\n/reset\nagain\n/quit\n"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sinkstream",
            "chat",
            "--model",
            str(tiny_dir),
            "--window",
            "16",
            "--max-new-tokens",
            "5",
            "--json",
        ],
        input=script,
        capture_output=True,
        text=True,
        timeout=120,
        env={"HOME": str(tiny_dir), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "[conversation reset]" in proc.stderr and '"turns": 1' in proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["turns"] == 1


def test_export_round_trip(capsys, tiny_dir, tmp_path):
    import torch

    from sinkstream import load_model

    rc, out, _ = run(capsys, "export", "--model", str(tiny_dir), "--out", str(tmp_path / "exported"))
    assert rc == 0 and json.loads(out.strip().splitlines()[-1])["exported"].endswith("exported")
    a, tok = load_model(str(tiny_dir))
    b, _ = load_model(str(tmp_path / "exported"))
    ids = torch.tensor([tok("round trip").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, atol=0, rtol=0)
    rc, _, err = run(capsys, "export", "--model", str(tiny_dir))
    assert rc == 2 and "--out" in err


def test_generate_batch_file_in_order(capsys, tiny_dir, prompts_file):
    common = ["--model", str(tiny_dir), "--sink", "2", "--window", "12", "--max-new-tokens", "30"]
    rc, out, _ = run(capsys, "generate", "--batch-file", str(prompts_file), *common, "--json")
    assert rc == 0
    lines = [json.loads(x) for x in out.strip().splitlines()]
    rows, stats = lines[:-1], lines[-1]
    assert [r["index"] for r in rows] == [1, 2, 3] and stats["batch_size"] == 3
    assert all(r["tokens"] > 0 for r in rows)
    assert [r["prompt"] for r in rows] == ["hello there", "how are you?", "third round"]
    for r in rows:  # each row is what the prompt gives alone
        rc, alone, _ = run(capsys, "generate", "--prompt", r["prompt"], *common)
        assert rc == 0 and alone.rstrip("\n") == r["text"]
    rc, _, err = run(capsys, "generate", "--batch-file", str(prompts_file), "--prompt", "x")
    assert rc == 2 and "not allowed with" in err


def test_eval_ppl_methods_files_and_bad_input(capsys, tiny_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 12)
    out = tmp_path / "ev"
    rc, stdout, _ = run(
        capsys,
        "eval",
        "ppl",
        "--model",
        str(tiny_dir),
        "--text",
        str(text),
        "--tokens",
        "300",
        "--method",
        "streaming,dense,recompute",
        "--sink",
        "4",
        "--window",
        "28",
        "--stride",
        "10",
        "--chunk",
        "16",
        "--out",
        str(out),
        "--no-progress",
        "--json",
    )
    assert rc == 0
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert set(summary["methods"]) == {"streaming 4+28", "dense", "recompute 28"}
    assert summary["methods"]["recompute 28"]["targets"] == 30 and summary["common_targets"] == 30
    assert summary["methods"]["streaming 4+28"]["exact_chunks"] is True
    for f in ("nll_streaming_4+28.npy", "nll_dense.npy", "nll_recompute_28.npy", "ppl.png", "summary.json"):
        assert (out / f).is_file()
    rc, stdout, _ = run(
        capsys,
        "eval",
        "ppl",
        "--model",
        str(tiny_dir),
        "--text",
        str(text),
        "--tokens",
        "100",
        "--sink-prefix",
        "\\n\\n",
        "--window",
        "28",
        "--positions",
        "text",
        "--out",
        str(out),
        "--no-progress",
        "--json",
    )
    info = json.loads(stdout.strip().splitlines()[-1])
    assert rc == 0 and info["methods"]["streaming 2+28 text-positions prefix-sinks"]["n_sink"] == 2
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff\xfe not utf-8")
    for argv, message in [
        (["--text", str(bad)], "not valid UTF-8"),
        (["--text", "/no/file"], "does not exist"),
        (["--text", str(text), "--method", "magic"], "unknown --method"),
        (["--text", str(text), "--stride", "0"], "--stride must be >= 1"),
        (["--text", str(text), "--window", "0"], "--window must be > 0"),
        (["--corpus", "gutenberg", "--text", str(text)], "not allowed with"),
    ]:
        rc, stdout, err = run(capsys, "eval", "ppl", "--model", str(tiny_dir), *argv)
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)


def test_attn_maps_and_first_token_mass(capsys, tiny_dir, tmp_path):
    rc, stdout, _ = run(
        capsys,
        "attn",
        "--model",
        str(tiny_dir),
        "--prompt",
        "attention sinks, seen " * 4,
        "--tokens",
        "40",
        "--out",
        str(tmp_path / "a"),
        "--json",
    )
    assert rc == 0
    s = json.loads(stdout.strip().splitlines()[-1])
    assert s["tokens"] == 40 and len(s["first_token_mass"]) == 2 and all(0 <= m <= 1 for m in s["first_token_mass"])
    for f in ("attention_maps.png", "first_token_mass.png", "attention_maps.npy"):
        assert (tmp_path / "a" / f).is_file()
    rc, _, err = run(capsys, "attn", "--model", str(tiny_dir), "--tokens", "1")
    assert rc == 2 and "--tokens must be >= 2" in err


def test_eval_sweep_table(capsys, tiny_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("a sink sweep over a short text, again and again. " * 10)
    rc, stdout, _ = run(
        capsys,
        "eval",
        "sweep",
        "--model",
        str(tiny_dir),
        "--text",
        str(text),
        "--tokens",
        "200",
        "--sinks",
        "0,1,4",
        "--caches",
        "16,32",
        "--stride",
        "20",
        "--chunk",
        "16",
        "--out",
        str(tmp_path / "s"),
        "--no-progress",
        "--json",
    )
    assert rc == 0
    s = json.loads(stdout.strip().splitlines()[-1])
    assert len([r for r in s["rows"] if r["sinks"] is not None]) == 6
    table = (tmp_path / "s" / "sweep.md").read_text()
    assert "| 16 |" in table and "(4+28)" in table and (tmp_path / "s" / "sweep.png").is_file()
    rc, _, err = run(capsys, "eval", "sweep", "--model", str(tiny_dir), "--text", str(text), "--sinks", "a,b")
    assert rc == 2 and "--sinks must be comma-separated integers" in err


def test_eval_streameval_records(capsys, tiny_dir, tmp_path):
    rc, stdout, _ = run(
        capsys,
        "eval",
        "streameval",
        "--model",
        str(tiny_dir),
        "--lines",
        "30",
        "--back",
        "2-15",
        "--sink",
        "4",
        "--window",
        "200",
        "--out",
        str(tmp_path / "se"),
        "--no-progress",
        "--json",
    )
    assert rc == 0
    s = json.loads(stdout.strip().splitlines()[-1])
    assert s["questions"] == 3 and s["within_cache"]["questions"] + s["beyond_cache"]["questions"] == 3
    records = [json.loads(x) for x in (tmp_path / "se" / "answers.jsonl").read_text().splitlines()]
    assert all(r["distance_tokens"] > 0 for r in records) and (tmp_path / "se" / "accuracy.png").is_file()
    assert any(not r["in_cache"] for r in records)  # 200 slots: lines 15 back (~600 chars) have left
    rc, _, err = run(capsys, "eval", "streameval", "--model", str(tiny_dir), "--back", "9-3")
    assert rc == 2 and "--back must be MIN-MAX" in err


def test_streameval_lines_are_unique_and_parseable():
    from sinkstream.eval.streameval import make_lines

    lines = make_lines(500, seed=3)
    assert len({x.name for x in lines}) == 500
    assert lines[7].text() == f"line {lines[7].name}: REGISTER_CONTENT is <{lines[7].value}>"


def test_eval_chat_streaming_and_dense_baseline(capsys, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SINKSTREAM_CACHE", str(tmp_path / "cache"))  # MT-Bench from the cache, no fetch
    data = tmp_path / "cache" / "data" / "mt-bench" / "mt-en.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text(
        "\n".join(
            json.dumps({"question_id": i, "category": "x", "turns": [f"question {i}?", "more?"]}) for i in range(3)
        )
    )
    rc, stdout, _ = run(
        capsys,
        "eval",
        "chat",
        "--model",
        str(tiny_dir),
        "--questions",
        "3",
        "--max-new-tokens",
        "20",
        "--sink",
        "4",
        "--window",
        "60",
        "--max-rss-mb",
        "1",
        "--out",
        str(tmp_path / "c"),
        "--no-progress",
        "--json",
    )
    assert rc == 0
    s = json.loads(stdout.strip().splitlines()[-1])
    stream = s["runs"]["streaming 4+60"]
    assert stream["turns_answered"] == 6 and stream["max_tokens_cached"] <= 64 and stream["tokens_seen"] > 64
    assert s["runs"]["dense"]["turns_answered"] == 0 and "memory passed" in s["runs"]["dense"]["ended"]
    answers = (tmp_path / "c" / "answers_streaming_4+60.jsonl").read_text().splitlines()
    assert len(answers) == 6 and (tmp_path / "c" / "chat.png").is_file()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--tokens", "0"], "--tokens must be >= 2"),
        (["--sink", "40", "--window", "8"], "must be <= --window"),
        (["--method", "streaming,nope"], "unknown --method"),
        (["--book", "x"], "--book needs --corpus"),
    ],
)
def test_eval_ppl_bad_input(capsys, tmp_path, argv, message):
    text = tmp_path / "t.txt"
    text.write_text("some text")
    rc, out, err = run(capsys, "eval", "ppl", "--text", str(text), *argv)
    assert rc == 2 and out == "" and message in err and len(err.strip().splitlines()) == 1


def test_bench_decode_reports_every_figure(capsys, tiny_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 120)
    out = tmp_path / "bd"
    rc, stdout, _ = run(
        capsys,
        "bench",
        "decode",
        "--model",
        str(tiny_dir),
        "--text",
        str(text),
        "--tokens",
        "1500",
        "--measure",
        "4",
        "--sink",
        "4",
        "--window",
        "60",
        "--compare",
        "recompute,dense",
        "--recompute-caches",
        "16,32",
        "--reps",
        "1",
        "--dense-tokens",
        "1200",
        "--out",
        str(out),
        "--no-progress",
        "--json",
    )
    assert rc == 0
    result = json.loads(stdout.strip().splitlines()[-1])
    assert list(result["latency_ms"]) == ["1000", "1500"] and list(result["rss_mb"]) == ["1000", "1500"]
    assert all(v > 0 for v in result["latency_ms"].values())
    assert result["streaming"]["1500"]["tokens_cached"] == 64  # bounded: sinks + window
    assert list(result["recompute_ratio"]) == ["16", "32"] and all(v > 0 for v in result["recompute_ratio"].values())
    assert list(result["dense"]) == ["1000", "1200"] and result["dense"]["1200"]["tokens_cached"] == 1200
    assert result["dense"]["1200"]["cache_mb"] > result["streaming"]["1500"]["cache_mb"]
    assert result["flat"]["from"] == 1000 and result["flat"]["to"] == 1500
    assert (out / "decode.png").is_file() and (out / "decode.json").is_file()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--compare", "fast"], "unknown --compare"),
        (["--tokens", "10", "--measure", "20"], "--tokens must be >"),
        (["--recompute-caches", "1,x"], "--recompute-caches"),
        (["--measure", "0"], "--measure must be >= 1"),
    ],
)
def test_bench_decode_bad_input(capsys, argv, message):
    rc, out, err = run(capsys, "bench", "decode", *argv)
    assert rc == 2 and out == "" and message in err and len(err.strip().splitlines()) == 1


def test_eval_ppl_bos_first(capsys, tiny_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 4)
    rc, stdout, _ = run(
        capsys,
        "eval",
        "ppl",
        "--model",
        str(tiny_dir),
        "--text",
        str(text),
        "--tokens",
        "50",
        "--bos",
        "--window",
        "28",
        "--out",
        str(tmp_path / "o"),
        "--no-progress",
        "--json",
    )
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert rc == 0 and summary["text"].endswith("(BOS first)") and summary["tokens"] == 51
