"""Memory of loading a model: RSS after ``load_model`` and the load's peak, for each weight format
(and float32 with and without the decode layout), each in a fresh child process.

    python bench/load_memory.py --out out/bench [--model PATH]

The layout and the quantized formats copy every linear weight; the loaded safetensors file is
memory-mapped, and each tensor's file pages are handed back as soon as its copy is made.
The last line is one JSON object.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, sys
from sinkstream import load_model
from sinkstream.memory import peak_rss_mb, rss_mb
model, tok = load_model(sys.argv[1] or None, decode_layout=sys.argv[2] == "1", weights=sys.argv[3])
tensors = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()]}
print(json.dumps({"rss_after_load_mb": round(rss_mb(), 1),
                  "peak_rss_mb": round(peak_rss_mb(), 1),
                  "weights_mb": round(sum(tensors.values()) / 2**20, 1)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="default: the embedded SmolLM2-135M")
    ap.add_argument("--out", default="out/bench")
    args = ap.parse_args()
    result = {"command": "bench/load_memory.py", "model": args.model or "smollm2-135m"}
    for name, flag, weights in (
        ("float32, standard layout", "0", "float32"),
        ("float32, decode layout", "1", "float32"),
        ("bfloat16", "1", "bfloat16"),
        ("int8 (default)", "1", "int8"),
    ):
        run = subprocess.run(
            [sys.executable, "-c", CHILD, args.model, flag, weights], capture_output=True, text=True, check=True
        )
        result[name] = json.loads(run.stdout.strip().splitlines()[-1])
        print(
            f"{name:24s} RSS after load {result[name]['rss_after_load_mb']:7.1f} MB, "
            f"peak {result[name]['peak_rss_mb']:7.1f} MB",
            file=sys.stderr,
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "load_memory.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
