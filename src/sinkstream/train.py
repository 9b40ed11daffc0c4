"""`sinkstream train`: pre-train a small decoder from scratch, with or without a dedicated sink.

The paper (sec. 3.3) pre-trains the same model three ways and streams each with 0, 1, 2 and 4 sinks:

- ``vanilla``: plain causal LM; the model picks its own sinks (usually the first tokens);
- ``learnable``: a trainable placeholder token ``<|sink|>`` starts every training sample, so it is
  always there to take the attention nobody needs; streaming keeps it as the one sink. The token is
  also the tokenizer's BOS (added when text is tokenized with special tokens), so every stream starts
  with it;
- ``zero``: softmax-off-by-one in every head (``attention.zero_sink_attention``): attention may go
  "nowhere", so no token has to serve as a sink.

Same architecture (a Llama-style decoder), tokenizer, data order, seed and token budget for the three.
The tokenizer is a byte-level BPE trained on the training text (the held-out book excluded), kept
under ``$SINKSTREAM_CACHE/train``. Checkpoints are Hugging Face folders (``OUT/checkpoint``, resumable,
and ``OUT/final``); ``OUT/train_log.jsonl`` has the losses (``sinkstream train`` plots them in ``OUT/loss.png``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .paths import cache_root

SINK_MODES = ("vanilla", "learnable", "zero")
SINK_TOKEN, EOT = "<|sink|>", "<|endoftext|>"


@dataclass
class TrainConfig:
    sink_mode: str = "vanilla"
    layers: int = 4
    hidden: int = 256
    heads: int = 4
    ffn: int = 1024
    seq: int = 256  # training length (the sink token included in learnable mode)
    vocab: int = 4096
    batch: int = 8
    steps: int = 1000  # 2M tokens: ~15 min per run with the three modes side by side, one thread each
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 50
    weight_decay: float = 0.1
    clip: float = 1.0
    seed: int = 0
    eval_every: int = 100
    save_every: int = 100

    def check(self) -> None:
        if self.sink_mode not in SINK_MODES:
            raise ValueError(f"sink mode must be one of {', '.join(SINK_MODES)}, got '{self.sink_mode}'")
        for name in ("layers", "hidden", "heads", "ffn", "batch", "steps", "eval_every", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seq < 8:
            raise ValueError(f"seq must be >= 8, got {self.seq}")
        if self.vocab < 260:
            raise ValueError(f"vocab must be >= 260 (bytes + specials), got {self.vocab}")
        if self.hidden % self.heads or (self.hidden // self.heads) % 2:
            raise ValueError("hidden must split into heads of an even size")
        if not 0 < self.lr < 1 or not 0 <= self.min_lr <= self.lr:
            raise ValueError("need 0 < lr < 1 and 0 <= min_lr <= lr")


# -- data ----------------------------------------------------------------------------------------------
def train_tokenizer(text: str, vocab: int, cache_dir: Path, sink_first: bool = False):
    """A byte-level BPE of ``vocab`` tokens trained on ``text`` (cached by content), as a transformers
    tokenizer. ``sink_first`` (learnable mode): ``<|sink|>`` is its BOS, put first whenever text is
    tokenized with special tokens, so every stream starts with the sink the model was trained with."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    key = hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()[:16]
    path = cache_dir / f"bpe-{vocab}-{key}.json"
    if not path.is_file():
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab,
            special_tokens=[EOT, SINK_TOKEN],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(_pieces(text), trainer=trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tok.save(str(tmp))
        os.replace(tmp, path)
    tok = Tokenizer.from_file(str(path))
    if sink_first:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{SINK_TOKEN} $A", special_tokens=[(SINK_TOKEN, tok.token_to_id(SINK_TOKEN))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SINK_TOKEN if sink_first else None,
        eos_token=EOT,
        pad_token=EOT,
        additional_special_tokens=[SINK_TOKEN],
    )


def _pieces(text: str, size: int = 1 << 16):
    """``text`` in pieces of about ``size`` characters, cut at paragraph breaks where there are some."""
    i = 0
    while i < len(text):
        end = min(len(text), i + size)
        if end < len(text):
            brk = text.rfind("\n\n", i + size // 2, end)
            end = brk + 2 if brk != -1 else end
        yield text[i:end]
        i = end


def encode(tokenizer, text: str) -> np.ndarray:
    """Token ids of ``text`` (no sink token), as int32."""
    ids = []
    for piece in _pieces(text, 1 << 20):
        ids.extend(tokenizer(piece, add_special_tokens=False).input_ids)
    return np.asarray(ids, dtype=np.int32)


def batches(ids: np.ndarray, cfg: TrainConfig, sink_id: int):
    """Step -> [batch, seq] token ids: random windows of the text (the same for every sink mode, from
    ``cfg.seed``), with the sink token first in learnable mode."""
    text_len = cfg.seq - (cfg.sink_mode == "learnable")
    data = torch.from_numpy(ids.astype(np.int64))
    g = torch.Generator()  # reseeded per step: a step's batch depends on (seed, step) only, so resuming repeats it

    def get(step: int) -> torch.Tensor:
        g.manual_seed(cfg.seed * 1_000_003 + step)
        starts = torch.randint(0, len(data) - cfg.seq, (cfg.batch,), generator=g)
        x = torch.stack([data[s : s + text_len] for s in starts.tolist()])
        if cfg.sink_mode == "learnable":
            x = torch.cat([torch.full((cfg.batch, 1), sink_id, dtype=x.dtype), x], dim=1)
        return x

    return get


# -- model ---------------------------------------------------------------------------------------------
def build_model(cfg: TrainConfig, tokenizer):
    """A Llama-style decoder from scratch (same initial weights for every sink mode)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from .attention import register_zero

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden,
        intermediate_size=cfg.ffn,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.seq,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids(SINK_TOKEN) if cfg.sink_mode == "learnable" else None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        sinkstream_sink_mode=cfg.sink_mode,
    )
    attn = register_zero() if cfg.sink_mode == "zero" else "sdpa"
    torch.manual_seed(cfg.seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )


def _held_out_windows(ids: np.ndarray, cfg: TrainConfig, sink_id: int, windows: int) -> torch.Tensor:
    """``windows`` evenly spaced training-length windows of the held-out text (the sink first in learnable mode)."""
    text_len = cfg.seq - (cfg.sink_mode == "learnable")
    starts = np.linspace(0, len(ids) - text_len - 1, windows).astype(int)
    x = torch.stack([torch.from_numpy(ids[s : s + text_len].astype(np.int64)) for s in starts])
    if cfg.sink_mode == "learnable":
        x = torch.cat([torch.full((len(x), 1), sink_id, dtype=x.dtype), x], dim=1)
    return x


@torch.no_grad()
def held_out_loss(model, ids: np.ndarray, cfg: TrainConfig, sink_id: int, windows: int = 16) -> float:
    """Mean next-token loss on ``windows`` evenly spaced training-length windows of the held-out text."""
    was = model.training
    model.eval()
    x = _held_out_windows(ids, cfg, sink_id, windows)
    loss = float(model(input_ids=x, labels=x).loss)  # the sink (position 0) is never a target
    model.train(was)
    return loss


@torch.no_grad()
def held_out_sink(model, ids: np.ndarray, cfg: TrainConfig, sink_id: int, windows: int = 4) -> dict:
    """Is there a sink yet? Per layer, over ``windows`` held-out windows: the attention mass on the first
    token (mean over heads and queries) and the strongest head's mass on it from the late queries."""
    from .attention_maps import attention_maps, first_token_mass, sink_head_mass

    was = model.training
    model.eval()
    maps = np.mean(
        [attention_maps(model, w, per_head=True) for w in _held_out_windows(ids, cfg, sink_id, windows)], axis=0
    )
    model.train(was)
    return {
        "first_token_mass": [round(float(m), 4) for m in first_token_mass(maps.mean(axis=1))],
        "sink_head_mass": [round(float(m), 4) for m in sink_head_mass(maps)],
    }


# -- the loop ------------------------------------------------------------------------------------------
def _save(model, tokenizer, opt, step: int, cfg: TrainConfig, folder: Path) -> None:
    """An HF folder (+ optimizer state and step), written next to ``folder`` then renamed into place."""
    from transformers.utils import logging as hf_logging

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(tmp)
    finally:
        hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(tmp)
    if opt is not None:
        torch.save({"optimizer": opt.state_dict(), "step": step, "config": asdict(cfg)}, tmp / "trainer_state.pt")
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def train(
    cfg: TrainConfig,
    train_text: str,
    eval_text: str,
    out: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    eval_source: str | None = None,
) -> dict:
    """Train; returns the summary (also written to ``out/summary.json``)."""
    cfg.check()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(train_text, cfg.vocab, cache_root() / "train", sink_first=cfg.sink_mode == "learnable")
    sink_id = tokenizer.convert_tokens_to_ids(SINK_TOKEN)
    train_ids, eval_ids = encode(tokenizer, train_text), encode(tokenizer, eval_text)
    if len(train_ids) < cfg.seq + 1 or len(eval_ids) < cfg.seq + 1:
        raise ValueError(
            f"the training and held-out texts need more than {cfg.seq} tokens each "
            f"(have {len(train_ids)} and {len(eval_ids)})"
        )
    ckpt, log_path = out / "checkpoint", out / "train_log.jsonl"
    model, opt, start = _start(cfg, tokenizer, ckpt if resume else None)
    if not start and log_path.exists():
        log_path.unlink()
    params = sum(p.numel() for p in model.parameters())
    meta = {"parameters": params, "train_tokens": len(train_ids), "eval_tokens": len(eval_ids)}
    (out / "train_config.json").write_text(json.dumps(asdict(cfg) | meta | {"eval_source": eval_source}, indent=2))
    t0 = time.perf_counter()
    tokens, first_loss = _steps(model, opt, tokenizer, cfg, start, (train_ids, eval_ids, sink_id), out, progress)
    seconds = time.perf_counter() - t0
    _save(model, tokenizer, None, cfg.steps, cfg, out / "final")
    rows = log_rows(out)
    summary = _summary(cfg, rows, params, tokens, seconds, first_loss, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def log_rows(out: Path) -> list[dict]:
    """The rows of a run's ``train_log.jsonl`` (one per step)."""
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def _steps(model, opt, tokenizer, cfg: TrainConfig, start: int, data, out: Path, progress: bool):
    """The training steps from ``start``: each logged, the held-out loss and sink measured every
    ``eval_every``, a checkpoint every ``save_every``. Returns (tokens trained, the first loss)."""
    from tqdm import tqdm

    from .cpu_matmul import fast_cpu_matmul

    train_ids, eval_ids, sink_id = data
    get, t0, tokens, ema, first_loss = batches(train_ids, cfg, sink_id), time.perf_counter(), 0, None, None
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress,
               desc=f"train {cfg.sink_mode}", unit="step")  # fmt: skip
    with fast_cpu_matmul(), open(out / "train_log.jsonl", "a") as logf:
        for step in bar:
            lr, x = lr_at(step, cfg), get(step)
            value, norm = _step(model, opt, x, lr, cfg.clip)
            first_loss = value if first_loss is None else first_loss
            ema = value if ema is None else 0.95 * ema + 0.05 * value
            tokens += x.numel()
            row = {"step": step + 1, "loss": round(value, 4), "lr": round(lr, 6), "grad_norm": round(norm, 3)}
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                row["held_out_loss"] = round(held_out_loss(model, eval_ids, cfg, sink_id), 4)
                row |= held_out_sink(model, eval_ids, cfg, sink_id)
            logf.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=f"{ema:.3f}", tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
            if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                logf.flush()
                _save(model, tokenizer, opt, step + 1, cfg, out / "checkpoint")
    return tokens, first_loss


def _start(cfg: TrainConfig, tokenizer, ckpt: Path | None):
    """(model, optimizer, first step): fresh, or resumed from ``ckpt`` when it holds a checkpoint."""
    model = build_model(cfg, tokenizer)
    start = 0
    if ckpt is not None and (ckpt / "trainer_state.pt").is_file():
        from transformers import AutoModelForCausalLM

        state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
        if state["config"] != asdict(cfg):
            raise ValueError(f"{ckpt} was written with another configuration; start a new --out")
        model = AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation=model.config._attn_implementation)
        start = state["step"]
    model.train()
    opt = optimizer(model, cfg)
    if start:
        opt.load_state_dict(state["optimizer"])
    return model, opt, start


def _step(model, opt, x: torch.Tensor, lr: float, clip: float) -> tuple[float, float]:
    """One optimizer step at learning rate ``lr``: (loss, gradient norm before clipping)."""
    for group in opt.param_groups:
        group["lr"] = lr
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach()), norm


def _summary(cfg: TrainConfig, rows: list[dict], params: int, tokens: int, seconds: float, first_loss, out: Path):
    return {
        "sink_mode": cfg.sink_mode,
        "steps": cfg.steps,
        "parameters": params,
        "tokens_trained": cfg.steps * cfg.batch * cfg.seq,
        "train_seconds": round(seconds, 1),
        "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
        "first_loss": rows[0]["loss"] if rows else first_loss,
        "last_loss_avg10": round(float(np.mean([r["loss"] for r in rows[-10:]])), 4) if rows else None,
        "held_out_loss": next((r["held_out_loss"] for r in reversed(rows) if "held_out_loss" in r), None),
        "model": str(out / "final"),
    }
