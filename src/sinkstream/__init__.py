"""sinkstream: streaming language models with attention sinks (StreamingLLM) on transformers 5.x.

Streaming keeps memory and per-token cost flat for ever; it does not extend the context: what
left the window is gone.
"""

__version__ = "0.1.0"

from . import native  # noqa: F401 (sinkstream.native: the kernels' build and probe)
from .cache import SinkCache, SinkLayer
from .chat import ChatSession
from .engine import Engine, SamplingParams, Token
from .models import KNOWN_MODELS, export_model, load_model
from .positions import SUPPORTED_FAMILIES, UnsupportedModelError

__all__ = [
    "KNOWN_MODELS",
    "SUPPORTED_FAMILIES",
    "ChatSession",
    "Engine",
    "SamplingParams",
    "SinkCache",
    "SinkLayer",
    "Token",
    "UnsupportedModelError",
    "export_model",
    "load_model",
]
