"""The optional parts of sinkstream and the packages they need.

``pip install sinkstream`` is the library and the command line's core (the cache, the engine, chat and
generation); the rest comes with an extra, as kvpress and vLLM split theirs:

========  ==========================================================================
server    ``sinkstream serve``: FastAPI, uvicorn, prometheus-client (and ``grammar``)
grammar   structured output and forced tool calls: xgrammar
eval      evaluations' plots and memory figures: matplotlib, psutil
postgres  sessions' records in PostgreSQL: psycopg
cluster   ``serve --replicas N`` on Ray Serve (and ``server``, ``postgres``)
========  ==========================================================================

``need`` imports a module of an extra, or raises ``MissingExtra`` with the one line to run.
"""

from __future__ import annotations

import importlib

WHAT = {
    "server": "the server",
    "grammar": "structured output (--json-schema, response_format, forced tool calls)",
    "eval": "plots and memory figures",
    "postgres": "a PostgreSQL store",
    "cluster": "replicas on Ray Serve",
}


class MissingExtra(ImportError):
    """An optional part of sinkstream whose packages are not installed."""

    def __init__(self, extra: str, module: str):
        super().__init__(f"{WHAT[extra]} needs {module.split('.')[0]}: pip install 'sinkstream[{extra}]'")
        self.extra = extra


def need(module: str, extra: str):
    """``module``, imported; ``MissingExtra`` (saying which extra to install) if it is not there."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if e.name and module.split(".")[0] != e.name.split(".")[0]:
            raise  # the module is there but something inside it failed to import: not a missing extra
        raise MissingExtra(extra, module) from None
