"""The peers' shared inputs: the embedded model exported to a plain HF folder, the token ids of the
text, and the path of the original GGUF file (for llama.cpp).

    python bench/peers/prepare.py --out out/peers [--tokens 20000]
"""

import argparse
import json
from pathlib import Path

from sinkstream.eval.data import gutenberg_text
from sinkstream.models import KNOWN_MODELS, export_model, load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="out/peers")
    ap.add_argument("--tokens", type=int, default=20000)
    ap.add_argument("--book", default="austen-emma")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(weights="float32")  # exported for peers that read plain HF folders
    export_model(model, tok, out / "model")
    ids = tok(gutenberg_text(book=args.book), add_special_tokens=False).input_ids[: args.tokens + 1]
    (out / "ids.json").write_text(json.dumps(ids))
    folder, name = KNOWN_MODELS["smollm2-135m"].locate()
    gguf = folder / name
    (out / "gguf_path.txt").write_text(str(gguf))
    print(json.dumps({"model": str(out / "model"), "ids": len(ids), "book": args.book, "gguf": str(gguf)}))


if __name__ == "__main__":
    main()
