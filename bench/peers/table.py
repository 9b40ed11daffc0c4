"""Collect the peers' rows (OUT/*.json written by the runners) into OUT/peers.md and one JSON line."""

import argparse
import json
from pathlib import Path

ORDER = ["sinkstream", "attention_sinks", "hf_sinkcache", "llama_cpp", "sinkstream_again"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="out/peers")
    args = ap.parse_args()
    out = Path(args.out)
    rows = [json.loads((out / f"{n}.json").read_text()) for n in ORDER if (out / f"{n}.json").is_file()]
    for n, r in zip([n for n in ORDER if (out / f"{n}.json").is_file()], rows):
        if n == "sinkstream_again":
            r["peer"] += " (again, after the peers)"
    tokens = max((r.get("tokens", 0) for r in rows), default=0)
    lines = [
        f"| peer | version | tokens/s at 1k | tokens/s steady (2k-3k) | tokens/s at 20k | peak RSS MB | "
        f"PPL ({tokens:,} tokens) | note |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['peer']} | | | | | | | {r['status']} |")
            continue
        note = ", ".join(
            f"{k} {v}" for k, v in r.items() if k in ("transformers", "attn", "weights", "decode", "context_shifts")
        )
        lines.append(
            f"| {r['peer']} | {r['version']} | {r.get('tokens_per_s_at_1k', '')} | "
            f"{r.get('tokens_per_s_steady', '')} | {r.get('tokens_per_s_at_20k', '')} | "
            f"{r['peak_rss_mb']:,.0f} | {r['ppl']:.3f} | {note} |"
        )
    (out / "peers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps({"peers": rows}))


if __name__ == "__main__":
    main()
