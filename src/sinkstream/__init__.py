"""sinkstream: streaming language models with attention sinks (StreamingLLM) on transformers 5.x.

Streaming keeps memory and per-token cost flat for ever; it does not extend the context: what
left the window is gone.
"""

__version__ = "0.1.0"

from .cache import SinkCache, SinkLayer  # noqa: E402
from .chat import ChatSession  # noqa: E402
from .engine import Engine, SamplingParams, Token  # noqa: E402
from .models import KNOWN_MODELS, export_model, load_model  # noqa: E402
from . import native  # noqa: E402
from .positions import SUPPORTED_FAMILIES, UnsupportedModelError  # noqa: E402

__all__ = [
    "SinkCache", "SinkLayer", "ChatSession", "Engine", "SamplingParams", "Token", "KNOWN_MODELS",
    "export_model", "load_model", "SUPPORTED_FAMILIES", "UnsupportedModelError",
]
