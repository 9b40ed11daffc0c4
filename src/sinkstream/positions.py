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
    "gpt_neox": "GPT-NeoX / Pythia (partial rotary)",
    "falcon": "Falcon (RoPE; multi-query and new decoder architecture)",
}
# Families whose positions are learned absolute embeddings: streaming cannot re-position them.
ABSOLUTE_POSITION_FAMILIES = {"gpt2", "opt", "gpt_bigcode", "gptj_absolute", "biogpt", "xglm"}


class UnsupportedModelError(ValueError):
    """The model's family has no position rule in sinkstream."""


def check_supported(config) -> str:
    """Return the config's model_type, or raise a clear error naming the supported families."""
    model_type = getattr(config, "model_type", None)
    names = ", ".join(f"{k} ({v})" for k, v in SUPPORTED_FAMILIES.items())
    if model_type in SUPPORTED_FAMILIES:
        if getattr(config, "alibi", False):
            raise UnsupportedModelError(f"model type '{model_type}' with ALiBi positions is not supported yet; "
                                        f"supported families: {names}")
        kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
        if kinds != {"full_attention"}:
            raise UnsupportedModelError(
                f"model type '{model_type}' with layer types {sorted(kinds)} is not supported yet: "
                "only models whose layers all use full attention are"
            )
        return model_type
    if model_type in ABSOLUTE_POSITION_FAMILIES:
        raise UnsupportedModelError(
            f"model type '{model_type}' uses learned absolute positions, which cannot be re-positioned "
            f"inside a streaming cache; supported families: {names}"
        )
    raise UnsupportedModelError(f"model type '{model_type}' is not supported yet; supported families: {names}")


@dataclass
class Rope:
    """Rotary layout of one model: inverse frequencies (float64) and the rotated width.

    One instance is shared by all layers of a cache; they re-position their sinks by the same
    shift in the same step, so the cos/sin of the last shift are kept and reused."""

    inv_freq: torch.Tensor  # [rot_dim // 2] float64
    rot_dim: int
    _last: tuple | None = field(default=None, repr=False)

    def cos_sin(self, delta: int, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 cos/sin of shape [n, rot_dim] for a shift of ``delta`` positions."""
        key = (delta, n, device)
        if self._last is None or self._last[0] != key:
            ang = float(delta) * self.inv_freq  # float64: exact enough at any shift
            ang = torch.cat((ang, ang)).expand(n, -1)
            self._last = (key, ang.cos().float().to(device), ang.sin().float().to(device))
        return self._last[1], self._last[2]

    def rotate(self, k: torch.Tensor, delta: int) -> torch.Tensor:
        """Move post-RoPE keys ``k`` [..., n, head_dim] by ``delta`` positions."""
        cos, sin = self.cos_sin(int(delta), k.shape[-2], k.device)
        x = k.float()
        r = x[..., : self.rot_dim]
        half = self.rot_dim // 2
        rh = torch.cat((-r[..., half:], r[..., :half]), dim=-1)
        out = torch.cat((r * cos + rh * sin, x[..., self.rot_dim :]), dim=-1)
        return out.to(k.dtype)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_for(config) -> Rope:
    """The rotary layout of ``config``, with the same inverse frequencies the model uses."""
    check_supported(config)
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    dim = _head_dim(config)
    if rope_type == "default":  # as the models compute it, partial rotary included
        base = params["rope_theta"]
        dim = int(dim * params.get("partial_rotary_factor", 1.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    else:
        inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    return Rope(inv_freq=inv_freq.to(torch.float64), rot_dim=2 * inv_freq.shape[0])
