"""SinkCache: attention sinks + a rolling window, as a transformers ``Cache``.

One layout object per kind of attention layer (``layouts``), each owning its rows' counters, their
arithmetic and the buffers of all its layers (all preallocated once, per batch row):

``rope``     full-attention RoPE layers (``n_sink + window`` slots)
             slots [0, n_sink): the sink keys, re-positioned just before the oldest window key;
             slots [n_sink, cap): the window, a ring buffer of the most recent keys.
``sliding``  the sliding-window layers of hybrid models (Gemma3, gpt-oss): a ring of the model's own
             ``sliding_window`` keys, no sinks (the model never attends further back anyway).
``alibi``    ALiBi layers (MPT, BLOOM), whose bias is read off the key *index*: the cache is kept
             contiguous (``n_sink + 2 * window`` slots). Evicting the oldest window key moves the
             window's start by one and the ``n_sink`` sinks are copied right before it; every
             ``window`` tokens the block is compacted back to the front (amortized O(1)).

Positions (RoPE). Every token gets its rotary position when the model computes its key; window keys
are never re-rotated on a decode step. The query and the window keep the distances they have in the
text (the window is contiguous), and only the ``n_sink`` sink keys are rotated so that their distance
to the query is the in-cache distance: they sit right before the oldest window key. A decode step
writes one slot and rotates ``n_sink`` keys: O(1) per token.

Frames. ``get_seq_length()`` is the rotary position the next token takes: tokens seen minus
``shift``. ``shift`` stays 0 unless ``rebase()`` is called, which re-rotates the windows once so
positions restart small (the engine does that every ~window tokens, so RoPE angles stay bounded
however long the stream runs). ``model.generate`` passes its own absolute positions: do not call
``rebase()`` on a cache used by ``generate``.

Batches. Every row of a batch has its own counters: rows may hold streams of different lengths
(``SinkCache.stack`` joins single-stream caches, ``select_rows`` drops rows). A forward over rows of
different lengths must feed one token per row and pass ``cache.position_ids()`` and
``cache.attention_mask()``; the engine does.

A layout advances its rows once per forward, when its first layer writes; its other layers follow the
same plan, so per-layer Python work is a few tensor writes.
"""

from .exact import ExactLayer, ExactStream
from .layouts import AlibiLayout, DecodeStep, ForwardPlan, Layout, RingLayout, Row, SlidingLayout
from .sink_cache import SinkCache, SinkLayer

__all__ = [
    "AlibiLayout",
    "DecodeStep",
    "ExactLayer",
    "ExactStream",
    "ForwardPlan",
    "Layout",
    "RingLayout",
    "Row",
    "SinkCache",
    "SinkLayer",
    "SlidingLayout",
]
