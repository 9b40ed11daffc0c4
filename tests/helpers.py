"""Tiny models and a character tokenizer built in the tests (no downloads)."""

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    FalconConfig,
    Gemma3TextConfig,
    GPTNeoXConfig,
    GptOssConfig,
    LlamaConfig,
    MistralConfig,
    MptConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

SPECIALS = ["<unk>", "<s>", "</s>"]
CHARS = ["\n"] + [chr(i) for i in range(32, 127)]
VOCAB = 100  # 3 specials + 96 characters + 1 unused

TINY = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
FAMILIES = [
    "llama",
    "llama-scaled",
    "mistral",
    "qwen2",
    "qwen3",
    "phi3",
    "gemma3",
    "gpt_neox",
    "falcon-mq",
    "falcon-new",
    "mpt",
    "bloom",
    "gpt_oss",
]
SLIDING_WINDOW = 12  # hybrid families: their own sliding window, smaller than the test caches


def tiny_config(family: str, layers: int = 2, **over):
    """A tiny random config of ``family``."""
    kw = dict(TINY, num_hidden_layers=layers, **over)
    if family == "llama":
        return LlamaConfig(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **kw)
    if family == "llama-scaled":  # rope scaling from config.rope_parameters
        return LlamaConfig(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}, **kw)
    if family == "mistral":
        return MistralConfig(
            **{"sliding_window": None, **kw}, rope_parameters={"rope_type": "default", "rope_theta": 1e6}
        )
    if family == "qwen2":
        return Qwen2Config(rope_parameters={"rope_type": "default", "rope_theta": 1e6}, **kw)
    if family == "qwen3":
        return Qwen3Config(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 1e6}, **kw)
    if family == "phi3":  # fused qkv, partial rotary
        rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
        return Phi3Config(rope_parameters=rope, **kw)
    if family == "gpt_neox":  # Pythia: partial rotary (rotary_pct), parallel residual, no GQA
        kw.pop("num_key_value_heads")
        rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}
        return GPTNeoXConfig(rope_parameters=rope, **kw)
    if family.startswith("falcon"):  # RoPE Falcon: multi-query (7B) or new decoder architecture (40B/180B)
        for k in ("num_key_value_heads", "intermediate_size", "max_position_embeddings", "tie_word_embeddings"):
            kw.pop(k)
        new = family == "falcon-new"
        return FalconConfig(
            alibi=False,
            multi_query=not new,
            new_decoder_architecture=new,
            num_kv_heads=2,
            parallel_attn=True,
            bias=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4},
            **kw,
        )
    if family == "gemma3":  # sliding layers (own window, own rope) + full layers; layer 0 slides
        types = ["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (layers % 2)
        if layers == 1:
            types = ["full_attention"]
        rope = {
            "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        }
        return Gemma3TextConfig(
            head_dim=16,
            layer_types=types,
            sliding_window=SLIDING_WINDOW,
            rope_parameters=rope,
            query_pre_attn_scalar=16,
            **kw,
        )
    if family == "gpt_oss":  # learned per-head sink logits, sliding + full layers, YaRN, MoE
        types = ["sliding_attention", "full_attention"] * (layers // 2) + ["full_attention"] * (layers % 2)
        rope = {
            "rope_type": "yarn",
            "factor": 4.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": 1024,
            "rope_theta": 150000.0,
        }
        return GptOssConfig(
            head_dim=16,
            layer_types=types,
            sliding_window=SLIDING_WINDOW,
            rope_parameters=rope,
            num_local_experts=4,
            num_experts_per_tok=2,
            **kw,
        )
    for k in ("num_key_value_heads", "intermediate_size", "max_position_embeddings", "tie_word_embeddings"):
        kw.pop(k)
    if family == "mpt":  # ALiBi, bias from key indices
        return MptConfig(
            d_model=kw.pop("hidden_size"),
            n_heads=kw.pop("num_attention_heads"),
            n_layers=kw.pop("num_hidden_layers"),
            max_seq_len=4096,
            expansion_ratio=2,
            **kw,
        )
    if family == "bloom":  # ALiBi, bias from the 2D mask / key count
        return BloomConfig(
            hidden_size=kw.pop("hidden_size"),
            n_head=kw.pop("num_attention_heads"),
            n_layer=kw.pop("num_hidden_layers"),
            **kw,
        )
    raise ValueError(family)


def tiny_model(family: str = "llama", layers: int = 2, attn: str = "eager", seed: int = 0, **over):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        tiny_config(family, layers, **over), attn_implementation=attn, dtype=torch.float32
    )
    with torch.no_grad():  # sharpen attention so that a wrong position or a missing key shows
        for name, p in model.named_parameters():
            if name.endswith(
                ("q_proj.weight", "k_proj.weight", "qkv_proj.weight", "query_key_value.weight", "Wqkv.weight")
            ):
                p.mul_(8.0)
    return model.eval()


def tiny_tokenizer(drop_unknown: bool = False) -> PreTrainedTokenizerFast:
    """Character-level tokenizer with a chat template; ids fit ``VOCAB``. Characters it does not know
    become ``<unk>``, or (``drop_unknown``, as byte-level tokenizers do with some control characters)
    no token at all."""
    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None if drop_unknown else "<unk>"))
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>"
    )
    fast.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant: {% endif %}"
    )
    return fast


def random_ids(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB - 1, (1, n), generator=g)


def model_inv_freq(model, layer_type: str) -> torch.Tensor:
    """The inverse frequencies the model's own rotary embedding uses for ``layer_type`` layers."""
    bufs = {n.rsplit(".", 1)[-1]: b for n, b in model.named_buffers() if "rotary_emb" in n}
    return bufs.get(f"{layer_type}_inv_freq", bufs.get("inv_freq"))
