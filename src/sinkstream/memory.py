"""This process's memory, as the benchmarks and the stats lines report it."""

from __future__ import annotations

import resource

from .extras import need


def rss_mb() -> float:
    """Resident set size of this process now, in MiB."""
    return need("psutil", "eval").Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
