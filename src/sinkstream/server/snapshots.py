"""Where sessions' cache snapshots live: files in a directory (the state directory's ``caches/``, or a
``--snapshot-dir`` every replica of a scaled-out server sees).

A snapshot is written whole or not at all: to a temporary name, fsynced, renamed into place, and
the directory fsynced so that the rename itself is durable. It is never overwritten: each turn's
snapshot has a new name (``<session>.<turn>.safetensors``), so a reader sees either the old commit or
the new one. Another store (an S3-compatible object store, say) fits behind the same four methods:
an object PUT is atomic, ``names`` is a LIST, and the record's pointer to the name is what commits.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from ..cache import SinkCache

SUFFIX = ".safetensors"


class LocalSnapshots:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def write(self, name: str, cache: SinkCache, conversation: dict | None = None) -> int:
        """Write the snapshot (with the ``conversation`` state that goes with the cache, if given);
        returns its size in bytes."""
        tensors, meta = cache.state()
        path = self.root / name
        tmp = path.with_name(path.name + ".tmp")
        metadata = {"sinkstream": json.dumps(meta)}
        if conversation is not None:
            metadata["conversation"] = json.dumps(conversation, ensure_ascii=False)
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself is durable
        finally:
            os.close(fd)
        return path.stat().st_size

    def read(self, name: str, *, config, device=None) -> SinkCache:
        return self.read_state(name, config=config, device=device)[0]

    def read_state(self, name: str, *, config, device=None) -> tuple[SinkCache, dict | None]:
        """The cache and the conversation state written with it (None for a snapshot written without)."""
        with safe_open(str(self.root / name), framework="pt") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safetensors handles are not iterable)
        conversation = json.loads(metadata["conversation"]) if "conversation" in metadata else None
        cache = SinkCache.from_state(tensors, json.loads(metadata["sinkstream"]), config=config, device=device)
        return cache, conversation

    def delete(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)

    def names(self) -> set[str]:
        """Every file here: snapshots, and the temporary files a crash may have left."""
        return {p.name for p in self.root.iterdir() if p.is_file()}
