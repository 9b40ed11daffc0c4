"""The server's threads other than the model's run PyTorch on one OpenMP thread each.

The worker's decode step is hundreds of small parallel regions. libgomp keeps a pool of threads per
thread that starts parallel regions, and once its pools hold more threads than there are CPUs it stops
letting them spin between regions: each region then wakes its threads from sleep, and a decode step takes
about twice as long. Any tensor work in a request's thread (a cache copied, a snapshot written, a
sampler set up) would start such a second pool; on one thread it starts none.
"""

from __future__ import annotations

import threading

import torch
from starlette.concurrency import run_in_threadpool

_local = threading.local()


def one_omp_thread() -> None:
    """PyTorch in this thread on one OpenMP thread (once per thread; other threads keep theirs)."""
    if not getattr(_local, "set", False):
        torch.set_num_threads(1)
        _local.set = True


def _call(fn, args, kwargs):
    one_omp_thread()
    return fn(*args, **kwargs)


async def off_loop(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in the thread pool (``run_in_threadpool``), on one OpenMP thread."""
    return await run_in_threadpool(_call, fn, args, kwargs)
