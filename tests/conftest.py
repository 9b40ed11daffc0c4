import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

torch.set_num_threads(2)

TINY = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)


def tiny_config(family: str, layers: int = 2, **over):
    """A tiny random config of ``family`` (no downloads)."""
    kw = dict(TINY, num_hidden_layers=layers, **over)
    if family == "llama":
        return LlamaConfig(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **kw)
    if family == "llama-scaled":
        rope = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
        return LlamaConfig(rope_parameters=rope, **kw)
    if family == "mistral":
        return MistralConfig(sliding_window=None, rope_parameters={"rope_type": "default", "rope_theta": 1e6}, **kw)
    if family == "qwen2":
        return Qwen2Config(rope_parameters={"rope_type": "default", "rope_theta": 1e6}, **kw)
    raise ValueError(family)


FAMILIES = ["llama", "llama-scaled", "mistral", "qwen2"]


def tiny_model(family: str, layers: int = 2, attn: str = "eager", seed: int = 0, **over):
    torch.manual_seed(seed)
    cfg = tiny_config(family, layers, **over)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32)
    # random init is small; scale weights up so attention is far from uniform (a stricter test)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8.0)
    return model.eval()


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param
