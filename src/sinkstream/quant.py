"""Weight formats: how the linear weights of a model are stored and multiplied.

``float32``   the model as loaded.
``bfloat16``  weights rounded to bf16 (half the bytes); products accumulate in float32.
``int8``      per-output-row symmetric int8 (a quarter of the bytes): ``w ≈ q * scale[row]``,
              ``q = round(w / scale)``, ``scale = max|w[row]| / 127``. Activations stay float32.
``auto``      the fastest format whose perplexity stays within 1% of float32 on this machine: int8 on a
              CPU where sinkstream's kernels build (README: measured perplexities), else float32.

A quantized ``nn.Linear`` becomes a ``PackedLinear`` (module surgery, as torchao's ``quantize_`` does:
the model's own forward calls it like any linear). One-token decode steps run sinkstream's CPU
kernels (``native``) over weights packed in their tile layout; chunks of many rows (prefill)
dequantize and run PyTorch's matmul; without the kernels the weights stay in PyTorch's layout and
``_weight_int8pack_mm`` / a bf16 matmul do the work. Tied input embeddings share the quantized
lm_head storage (``PackedEmbedding``).
"""

from __future__ import annotations

import torch
from torch import nn

from . import native

WEIGHT_FORMATS = ("auto", "float32", "bfloat16", "int8")
TILE_ROWS, TILE_BLOCK = 4, 8  # the kernels' packed layout: [N / 4, K / 8, 4, 8]
DEQUANT_ROWS = 1024  # output rows dequantized at a time for many-row products (multiple of TILE_ROWS)
SMALL_BATCH = 16  # rows up to which the kernels beat dequantize + PyTorch's matmul (which blocks for cache)


def resolve_format(weights: str, device: str | torch.device, dtype: torch.dtype) -> str:
    """The concrete format for ``weights`` (``auto`` resolved) on this device, or ValueError."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weights '{weights}'; choose one of {', '.join(WEIGHT_FORMATS)}")
    cpu = torch.device(device).type == "cpu"
    if weights == "auto":
        return "int8" if cpu and dtype == torch.float32 and native.available() else "float32"
    if weights != "float32" and (not cpu or dtype != torch.float32):
        raise ValueError(
            f"--weights {weights} is for float32 models on the CPU; on {torch.device(device).type} "
            f"or with --dtype {str(dtype).removeprefix('torch.')} use --weights float32"
        )
    return weights


def pack(w: torch.Tensor) -> torch.Tensor:
    """[N, K] -> the kernels' tile layout [N / 4, K / 8, 4, 8] (same values, same dtype)."""
    n, k = w.shape
    return w.reshape(n // TILE_ROWS, TILE_ROWS, k // TILE_BLOCK, TILE_BLOCK).permute(0, 2, 1, 3).contiguous()


def unpack(p: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack``: [N / 4, K / 8, 4, 8] -> [N, K]."""
    t, kb, r, b = p.shape
    return p.permute(0, 2, 1, 3).reshape(t * r, kb * b)


def quantize_int8(w: torch.Tensor, rows: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8: (q [N, K] int8, scale [N] float32) with ``w ≈ q * scale[:, None]``.
    Works ``rows`` rows at a time, so a large matrix (an lm_head) needs no full-size float temporaries."""
    w = w.detach()
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for lo in range(0, w.shape[0], rows):
        block = w[lo : lo + rows].float()
        s = (block.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        q[lo : lo + rows] = torch.round(block / s[:, None]).clamp(-127, 127).to(torch.int8)
        scale[lo : lo + rows] = s
    return q, scale


class PackedLinear(nn.Module):
    """A linear layer over int8 (with a scale per output row) or bf16 weights.

    ``weight`` is packed ([N/4, K/8, 4, 8]) when ``packed`` is true, else [N, K]. Float32 activations in
    and out: the kernels convert eight weights at a time and accumulate in float32."""

    def __init__(
        self,
        weight: torch.Tensor,
        scale: torch.Tensor | None,
        bias: torch.Tensor | None,
        in_features: int,
        out_features: int,
        packed: bool,
    ):
        super().__init__()
        self.in_features, self.out_features, self.packed = in_features, out_features, packed
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    @property
    def format(self) -> str:
        return "int8" if self.weight.dtype == torch.int8 else "bfloat16"

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str) -> PackedLinear:
        w = linear.weight.detach()
        n, k = w.shape
        packed = native.available() and n % TILE_ROWS == 0 and k % TILE_BLOCK == 0
        if fmt == "int8":
            q, scale = quantize_int8(w)
        elif fmt == "bfloat16":
            q, scale = w.to(torch.bfloat16), None
        else:
            raise ValueError(f"PackedLinear stores int8 or bfloat16 weights, not {fmt}")
        bias = None if linear.bias is None else linear.bias.detach().float().clone()
        return cls(pack(q) if packed else q.contiguous(), scale, bias, k, n, packed)

    @classmethod
    def concat(cls, parts: list[PackedLinear]) -> PackedLinear:
        """One layer computing the parts' outputs side by side (e.g. q, k, v); the parts are not changed."""
        first = parts[0]
        if any(
            p.packed != first.packed or p.weight.dtype != first.weight.dtype or p.in_features != first.in_features
            for p in parts
        ):
            raise ValueError("only layers of one format and input size can be concatenated")
        biases = [p.bias if p.bias is not None else torch.zeros(p.out_features) for p in parts]
        return cls(
            torch.cat([p.weight for p in parts]),
            None if first.scale is None else torch.cat([p.scale for p in parts]),
            torch.cat(biases) if any(p.bias is not None for p in parts) else None,
            first.in_features,
            sum(p.out_features for p in parts),
            first.packed,
        )

    def rows(self, lo: int, hi: int) -> PackedLinear:
        """The layer of output rows [lo, hi), sharing this one's memory."""
        if self.packed and (lo % TILE_ROWS or hi % TILE_ROWS):
            raise ValueError("packed rows are taken in tiles of 4")
        div = TILE_ROWS if self.packed else 1
        return PackedLinear(
            self.weight[lo // div : hi // div],
            None if self.scale is None else self.scale[lo:hi],
            None if self.bias is None else self.bias[lo:hi],
            self.in_features,
            hi - lo,
            self.packed,
        )

    def dequantized(self, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """The weights of output rows [lo, hi) as float32 [hi - lo, K] (all rows by default)."""
        hi = self.out_features if hi is None else hi
        if self.packed and lo % TILE_ROWS == 0 and hi % TILE_ROWS == 0:  # one pass in the kernels
            return native.ops().dequantize_tiles(self.weight, self.scale, lo // TILE_ROWS, hi // TILE_ROWS)
        div = TILE_ROWS if self.packed else 1
        w = self.weight[lo // div : hi // div]
        w = (unpack(w) if self.packed else w).float()
        return w * self.scale[lo:hi, None] if self.scale is not None else w

    def forward(self, x: torch.Tensor, acc: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W.T + bias`` over the last dim of ``x``; with ``acc`` ([M, N]) the product is added into it."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.packed and x2.shape[0] <= SMALL_BATCH and x2.dtype == torch.float32:
            out = native.ops().packed_linear(x2.contiguous(), self.weight, self.scale, self.bias, acc)
        else:
            out = self._fallback(x2)
            if acc is not None:
                out = acc.add_(out)
        return out.reshape(*lead, self.out_features)

    def _fallback(self, x: torch.Tensor) -> torch.Tensor:
        if not self.packed and self.weight.dtype == torch.int8 and x.shape[0] <= SMALL_BATCH:
            out = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.weight, self.scale.to(torch.bfloat16))
            out = out.float()
            return out + self.bias if self.bias is not None else out
        return self._blocked_matmul(x.float())

    def _blocked_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` for many rows (prefill): the weights dequantized DEQUANT_ROWS output rows at a time,
        so each block is converted in cache and multiplied by PyTorch's matmul, never the whole matrix."""
        out = torch.empty(x.shape[0], self.out_features, dtype=torch.float32, device=x.device)
        for lo in range(0, self.out_features, DEQUANT_ROWS):
            hi = min(self.out_features, lo + DEQUANT_ROWS)
            out[:, lo:hi] = x @ self.dequantized(lo, hi).t()
        return out + self.bias if self.bias is not None else out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}"


class PackedEmbedding(nn.Module):
    """An input embedding that reads its rows from a tied ``PackedLinear`` (the lm_head)."""

    def __init__(self, table: PackedLinear, padding_idx: int | None = None):
        super().__init__()
        self.table, self.padding_idx = table, padding_idx
        self.embedding_dim = table.in_features

    @property
    def weight(self) -> torch.Tensor:  # what code that reads ``embed_tokens.weight`` (dtype, device) sees
        return self.table.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = self.table
        if t.packed:
            rows = t.weight.permute(0, 2, 1, 3)[ids // TILE_ROWS, ids % TILE_ROWS]  # [..., K/8, 8]
            rows = rows.reshape(*ids.shape, t.in_features)
        else:
            rows = t.weight[ids]
        rows = rows.float()
        return rows * t.scale[ids][..., None] if t.scale is not None else rows


def quantize_model(model, fmt: str) -> int:
    """Replace the model's linear layers (decoder layers and lm_head) by ``PackedLinear`` in ``fmt``; a tied
    input embedding reads the quantized lm_head. Returns how many layers were replaced."""
    if fmt == "float32":
        return 0
    from .cpu_matmul import release_file_pages

    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    tied = head is not None and emb is not None and head.weight is emb.weight
    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    for name, mod in targets:
        new = PackedLinear.from_linear(mod, fmt)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
        if tied and mod is head:
            model.set_input_embeddings(PackedEmbedding(new, getattr(emb, "padding_idx", None)))
        release_file_pages(mod.weight.data, model)  # the float32 copy leaves memory as it goes
    model.config.sinkstream_weights = fmt
    return len(targets)
