"""Which kernels run fp32 matmuls on the CPU.

PyTorch sends fp32 CPU matmuls to MKL. MKL runs its AVX-512 kernels only on Intel CPUs; elsewhere
(the AMD EPYC we measure on) it runs at AVX2 speed. oneDNN, also inside PyTorch, has fast fp32
AVX-512 kernels on any CPU, and PyTorch routes fp32 matmuls to it when
``torch.backends.mkldnn.matmul.fp32_precision`` is ``"bf16"``. That setting *permits* bf16
arithmetic: where oneDNN has bf16 kernels for the shape (AMX CPUs) results really lose precision.
So ``fast_cpu_matmul`` switches only after a probe shows oneDNN gives fp32-accurate results here.

Many-row fp32 products (the exact chunked evaluation, training) gain most; one-token decode steps use
it too, with the weights in ``decode_layout`` (with the standard layout oneDNN is slower than MKL).
Not the engine's prefill, nor the one-query attention matmuls (``default_matmul``): oneDNN caches a
primitive per matmul shape, and shapes that change with every chat turn or every step while the cache
fills grow a process without bound. The measurements are in docs/performance.md.

``SINKSTREAM_CPU_MATMUL=default`` keeps PyTorch's choice everywhere; ``=onednn`` skips the probe.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

MODES = ("auto", "onednn", "default")
_probed: bool | None = None


def _mode() -> str:
    mode = os.environ.get("SINKSTREAM_CPU_MATMUL", "auto").strip().lower()
    if mode not in MODES:
        raise ValueError(f"SINKSTREAM_CPU_MATMUL must be one of {', '.join(MODES)}, got '{mode}'")
    return mode


def onednn_is_fp32_exact() -> bool:
    """Whether oneDNN, allowed bf16, still computes fp32-accurate matmuls on this CPU (probed once)."""
    global _probed
    if _probed is None:
        if not torch.backends.mkldnn.is_available():
            _probed = False
            return _probed
        gen = torch.Generator().manual_seed(0)
        a, b = torch.randn(64, 576, generator=gen), torch.randn(576, 1536, generator=gen)
        q, k = torch.randn(3, 64, 64, generator=gen), torch.randn(3, 64, 300, generator=gen)
        with _precision("bf16"):
            got = [a @ b, torch.matmul(q, k)]
        worst = 0.0
        for out, (x, y) in zip(got, [(a, b), (q, k)]):
            ref = x.double() @ y.double()
            scale = x.double().abs() @ y.double().abs()
            worst = max(worst, float(((out.double() - ref).abs() / scale).max()))
        _probed = worst < 1e-5  # fp32 accumulation: ~1e-7; bf16 inputs: ~1e-3
    return _probed


class _precision:
    """Set ``torch.backends.mkldnn.matmul.fp32_precision`` inside a block (a class: entered once a
    layer on the decode path, where a generator-based context manager costs more)."""

    __slots__ = ("before", "value")

    def __init__(self, value: str):
        self.value = value

    def __enter__(self) -> None:
        self.before = torch.backends.mkldnn.matmul.fp32_precision
        if self.before != self.value:
            torch.backends.mkldnn.matmul.fp32_precision = self.value

    def __exit__(self, *exc) -> None:
        if self.before != self.value:
            torch.backends.mkldnn.matmul.fp32_precision = self.before


def default_matmul() -> _precision:
    """Inside the block, PyTorch's default fp32 CPU matmuls (undoes ``fast_cpu_matmul`` there)."""
    return _precision("none")


@contextmanager
def fast_cpu_matmul() -> Iterator[bool]:
    """Inside the block, fp32 CPU matmuls run on oneDNN where that is fp32-exact (yields whether it is on)."""
    mode = _mode()
    on = mode == "onednn" or (mode == "auto" and onednn_is_fp32_exact())
    if not on:
        yield False
        return
    with _precision("bf16"):
        yield True


# -- weight layout for one-row steps ------------------------------------------------------------------
def decode_layout(model) -> int:
    """Keep every ``nn.Linear`` weight (shape [out, in]) transposed in memory, [in, out] row-major.

    Values, shapes and the module code stay as they are: ``F.linear`` computes ``x @ weight.T``, and
    ``weight.T`` is now the contiguous [in, out] matrix, so MKL runs a plain NN product. For a one-row
    decode step that streams the weight row after row; with the default [out, in] layout MKL's AVX2
    path (on non-Intel CPUs) runs a transposed product that moves a third fewer bytes per second.
    Many-row forwards (prefill, evaluation) are no slower.
    Tied weights (embeddings = LM head) are one tensor and move once. Returns how many weights moved.

    ``save_pretrained`` cannot write such weights (safetensors wants contiguous tensors):
    ``export_model`` writes contiguous copies, or call ``standard_layout`` first.
    """
    moved = 0
    mapped = _file_mappings()
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if (
            isinstance(mod, torch.nn.Linear)
            and w is not None
            and w.dim() == 2
            and w.is_floating_point()
            and w.device.type == "cpu"
            and w.is_contiguous()
            and w.shape[0] > 1
            and w.shape[1] > 1
        ):
            old = w.data
            w.data = old.t().contiguous().t()
            _release(old, model, mapped)
            moved += 1
    if moved:  # the rest too: one tensor still on the loaded file's memory map keeps all its pages in RSS
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_contiguous() and t.device.type == "cpu":
                old = t.data
                t.data = old.clone()
                _release(old, model, mapped)
    return moved


# The loaded safetensors file is one private memory map that stays mapped until its last tensor is
# freed, so every page the copies above read stays in RSS until the end: loading the embedded model
# peaked at 1,389 MB instead of ~900. Each tensor's pages are handed back as soon as nothing in the
# model views them. Only whole pages of a private *file* mapping are released: the kernel re-reads
# them from the file if anything touches them again, so no data can be lost.
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_MADV_DONTNEED = 4


def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's private mappings of regular files (Linux; empty elsewhere)."""
    try:
        with open("/proc/self/maps") as maps:
            lines = maps.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[1].endswith("p") and parts[5].startswith("/") and os.path.isfile(parts[5]):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            out.append((start, end))
    return out


def release_file_pages(old: torch.Tensor, model) -> bool:
    """Hand ``old``'s pages back if it lies in a private file mapping and no tensor of ``model`` uses it."""
    return _release(old, model, _file_mappings())


def _release(old: torch.Tensor, model, mapped: list[tuple[int, int]]) -> bool:
    """Drop ``old``'s pages from RSS if it lies in a file mapping and no model tensor still uses its storage."""
    if not mapped:
        return False
    storage = old.untyped_storage()
    start, size = storage.data_ptr(), storage.nbytes()
    if size < _PAGE or not any(a <= start and start + size <= b for a, b in mapped):
        return False
    if any(t.untyped_storage().data_ptr() == start for t in [*model.parameters(), *model.buffers()]):
        return False
    first = -(-start // _PAGE) * _PAGE
    last = (start + size) // _PAGE * _PAGE
    if last <= first:
        return False
    return _madvise()(first, last - first, _MADV_DONTNEED) == 0


@functools.cache
def _madvise():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise


def standard_layout(model) -> int:
    """Undo ``decode_layout``: every weight contiguous again (what ``save_pretrained`` needs)."""
    moved = 0
    for p in model.parameters():
        if not p.is_contiguous():
            p.data = p.data.contiguous()
            moved += 1
    return moved


def decode_layout_wanted(device: str | torch.device) -> bool:
    """The default: on for CPU models unless ``SINKSTREAM_CPU_MATMUL=default`` asks for PyTorch's own choices."""
    return torch.device(device).type == "cpu" and _mode() != "default"
