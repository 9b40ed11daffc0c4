"""sinkstream's CPU decode kernels (``decode.cpp``), compiled for this machine on first use.

The kernels stream packed int8 / bf16 weights and the KV cache at memory speed, which PyTorch's
one-row kernels for those formats do not (see ``decode.cpp``). The build needs a C++ compiler
(``$CXX``, else ``c++``/``g++``/``clang++``) and PyTorch's headers, which its wheel ships. It is compiled
with ``-march=native`` and kept under ``$SINKSTREAM_CACHE/native/<key>`` where the key covers the source,
the torch version, the compiler and this CPU's feature flags, so a build never runs on a CPU it was not
made for. Building takes ~20 s once.

When there is no compiler, the build fails, or its self-check disagrees with PyTorch, ``available()`` is
False, ``unavailable_reason()`` says why, and callers use PyTorch's kernels. ``SINKSTREAM_NATIVE=0``
turns the kernels off.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from ..paths import cache_root

SOURCE = Path(__file__).with_name("decode.cpp")
_state: dict = {}
log = logging.getLogger(__name__)


def _cpu_flags() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _command(cxx: str, out: Path) -> list[str]:
    from torch.utils import cpp_extension

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [
        cxx,
        "-O3",
        "-march=native",
        "-fopenmp",
        "-shared",
        "-fPIC",
        "-std=c++20",
        "-w",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        str(SOURCE),
        "-o",
        str(out),
    ]
    cmd += [f"-I{p}" for p in cpp_extension.include_paths()]
    for p in cpp_extension.library_paths():
        cmd += [f"-L{p}", f"-Wl,-rpath,{p}"]
    return cmd + ["-ltorch", "-ltorch_cpu", "-lc10"]


def _build_dir(cxx: str) -> Path:

    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), torch.__version__.encode(), cxx.encode(), _cpu_flags().encode()):
        key.update(part)
    return cache_root() / "native" / key.hexdigest()[:16]


def _build() -> Path:
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    folder = _build_dir(cxx)
    lib = folder / "libsinkstream_decode.so"
    if lib.is_file():
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        out = Path(tmp) / lib.name
        log.info("compiling sinkstream's CPU kernels for this machine (once, ~20 s)")
        res = subprocess.run(_command(cxx, out), capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE.name} failed: {(res.stderr or res.stdout).strip()[-800:]}")
        os.replace(out, lib)  # atomic: a concurrent build of the same key writes the same file
    return lib


def _self_check() -> None:
    """The kernels against PyTorch on a small random case (a miscompiled build must not serve)."""
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 64, generator=gen), torch.randn(8, 64, generator=gen)
    packed = w.to(torch.bfloat16).reshape(2, 4, 8, 8).permute(0, 2, 1, 3).contiguous()
    got = torch.ops.sinkstream.packed_linear(x, packed, None, None, None)
    ref = x @ w.to(torch.bfloat16).float().t()
    if not torch.allclose(got, ref, atol=1e-4, rtol=1e-4):
        raise RuntimeError("self-check failed: packed_linear disagrees with PyTorch")


def available() -> bool:
    """Whether the kernels are loaded (building them on the first call)."""
    if "ok" not in _state:
        _state["ok"], _state["reason"] = False, None
        if os.environ.get("SINKSTREAM_NATIVE", "1").strip() in ("0", "false", "no", "off"):
            _state["reason"] = "turned off by SINKSTREAM_NATIVE=0"
            return False
        try:
            torch.ops.load_library(str(_build()))
            _self_check()
            _state["ok"] = True
        except Exception as e:
            _state["reason"] = f"{type(e).__name__}: {e}"
            log.warning("sinkstream's CPU kernels are not available (%s); using PyTorch's", _state["reason"])
    return _state["ok"]


def unavailable_reason() -> str | None:
    available()
    return _state.get("reason")


def ops():
    """``torch.ops.sinkstream`` (call ``available()`` first)."""
    return torch.ops.sinkstream
