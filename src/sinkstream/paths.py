"""Where sinkstream keeps what it builds or fetches once: converted models, compiled kernels, data.

Everything lives under ``$SINKSTREAM_CACHE`` (default ``~/.cache/sinkstream``).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("SINKSTREAM_CACHE", Path.home() / ".cache" / "sinkstream"))
