"""Re-positioning of cached keys per model family.

A post-RoPE key stored at rotary position ``p`` becomes the key at ``p + delta`` by one exact
rotation of angle ``delta * inv_freq`` per frequency; ``rotate`` always starts from the key as it
was stored, so no error accumulates however often a sink is re-positioned.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

# model_type -> family description. Families listed here are covered by the tests.
SUPPORTED_FAMILIES: dict[str, str] = {
    "llama": "Llama / SmolLM2 (RoPE)",
    "mistral": "Mistral (RoPE)",
    "qwen2": "Qwen2 / Qwen2.5 (RoPE)",
    "qwen3": "Qwen3 (RoPE, q/k norm)",
    "phi3": "Phi3 (RoPE, fused qkv)",
    "gemma3_text": "Gemma3 (RoPE; sliding-window + full layers)",
    "gpt_neox": "GPT-NeoX / Pythia (partial rotary)",
    "falcon": "Falcon (RoPE; multi-query and new decoder architecture)",
    "mpt": "MPT (ALiBi)",
    "bloom": "BLOOM (ALiBi)",
    "gpt_oss": "gpt-oss (RoPE, learned per-head sinks, sliding + full layers)",
}
ALIBI_FAMILIES = {"mpt", "bloom"}
# Families whose positions are learned absolute embeddings: streaming cannot re-position them.
ABSOLUTE_POSITION_FAMILIES = {"gpt2", "opt", "gpt_bigcode", "gptj_absolute", "biogpt", "xglm"}


class UnsupportedModelError(ValueError):
    """The model's family has no position rule in sinkstream."""


def check_supported(config) -> str:
    """Return the config's model_type, or raise a clear error naming the supported families."""
    model_type = getattr(config, "model_type", None)
    names = ", ".join(f"{k} ({v})" for k, v in SUPPORTED_FAMILIES.items())
    if model_type in SUPPORTED_FAMILIES:
        if model_type == "falcon" and getattr(config, "alibi", False):
            raise UnsupportedModelError(
                "Falcon with ALiBi positions (falcon-rw) is not supported: its bias is "
                f"built from absolute token counts; supported families: {names}"
            )
        kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
        if not kinds <= {"full_attention", "sliding_attention"}:
            raise UnsupportedModelError(
                f"model type '{model_type}' with layer types {sorted(kinds)} is not supported: "
                "only full-attention and sliding-window layers are"
            )
        if "full_attention" not in kinds:
            raise UnsupportedModelError(
                f"every layer of this '{model_type}' model uses a sliding window: its cache "
                "is bounded already and attention sinks do not apply"
            )
        if "sliding_attention" in kinds and not getattr(config, "sliding_window", None):
            raise UnsupportedModelError("the config has sliding-window layers but no sliding_window size")
        return model_type
    if model_type in ABSOLUTE_POSITION_FAMILIES:
        raise UnsupportedModelError(
            f"model type '{model_type}' uses learned absolute positions, which cannot be re-positioned "
            f"inside a streaming cache; supported families: {names}"
        )
    raise UnsupportedModelError(f"model type '{model_type}' is not supported yet; supported families: {names}")


def layer_kinds(config, cache_size: int) -> list[str]:
    """The cache layout of every layer: "rope" (sinks + window), "sliding" (the model's own sliding
    window) or "alibi" (contiguous sinks + window)."""
    model_type = check_supported(config)
    if model_type in ALIBI_FAMILIES:
        return ["alibi"] * config.num_hidden_layers
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    slide = getattr(config, "sliding_window", None)
    if model_type == "mistral" and slide and cache_size > slide:  # Mistral slides on every layer
        raise ValueError(
            f"a cache of {cache_size} tokens is larger than this model's sliding window ({slide}): "
            f"use n_sink + window <= {slide}"
        )
    return ["sliding" if t == "sliding_attention" else "rope" for t in types]


@dataclass
class Rope:
    """Rotary layout of one model: inverse frequencies (float64) and the rotated width.

    One instance is shared by all layers of a cache; they re-position their sinks by the same
    shift in the same step, so the cos/sin of the last shift are kept and reused."""

    inv_freq: torch.Tensor  # [rot_dim // 2] float64
    rot_dim: int
    _last: tuple | None = field(default=None, repr=False)

    def cos_sin(self, deltas: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 cos/sin [R, 1, 1, rot_dim] for shifts of ``deltas[r]`` positions (one per batch row)."""
        key = (tuple(deltas), device)
        if self._last is None or self._last[0] != key:
            ang = torch.tensor(deltas, dtype=torch.float64)[:, None] * self.inv_freq  # exact at any shift
            ang = torch.cat((ang, ang), dim=-1)[:, None, None, :]
            self._last = (key, ang.cos().float().to(device), ang.sin().float().to(device))
        return self._last[1], self._last[2]

    def rotate(self, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Move post-RoPE keys ``k`` [R, H, n, head_dim] by the shifts ``cos``/``sin`` were made for."""
        x = k.float()
        r = x[..., : self.rot_dim]
        half = self.rot_dim // 2
        rh = torch.cat((-r[..., half:], r[..., :half]), dim=-1)
        out = torch.cat((r * cos + rh * sin, x[..., self.rot_dim :]), dim=-1)
        return out.to(k.dtype)

    def shift(self, k: torch.Tensor, delta: int) -> torch.Tensor:
        """Move keys ``k`` [..., n, head_dim] (every row) by ``delta`` positions."""
        cos, sin = self.cos_sin([delta], k.device)
        return self.rotate(k, cos[0, 0], sin[0, 0])


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_for(config, layer_type: str = "full_attention") -> Rope:
    """The rotary layout of ``config``'s layers of ``layer_type``, with the inverse frequencies the model uses."""
    check_supported(config)
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type in params:  # per layer type (Gemma3)
        params = params[layer_type]
    rope_type = params.get("rope_type", "default")
    dim = _head_dim(config)
    if rope_type == "default":  # as the models compute it, partial rotary included
        base = params["rope_theta"]
        dim = int(dim * params.get("partial_rotary_factor", 1.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    else:
        layer = layer_type if layer_type in (getattr(config, "rope_parameters", None) or {}) else None
        inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", layer_type=layer)
    return Rope(inv_freq=inv_freq.to(torch.float64), rot_dim=2 * inv_freq.shape[0])
