#!/usr/bin/env bash
# Side-by-side: the same weights, text and cache sizes through sinkstream and the alternatives.
#   bash bench/peers/run_all.sh [OUT=out/peers] [TOKENS=20000] [BRACKET=1]
# sinkstream runs first and, with BRACKET=1 (the default), again after the peers: the machine's
# speed drifts, and the two sinkstream rows show by how much over the run.
# Peers are installed at run time into venvs under OUT (never committed). A peer that cannot be
# installed or run gets a row saying why (the last line of its error).
set -u
OUT=${OUT:-out/peers}
TOKENS=${TOKENS:-20000}
BRACKET=${BRACKET:-1}
PY=${PY:-.venv/bin/python}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"
"$PY" "$HERE/prepare.py" --out "$OUT" --tokens "$TOKENS" || exit 1
COMMON=(--ids "$OUT/ids.json" --tokens "$TOKENS" --sink 4 --window 1020 --threads 2)

failed() {  # peer name, log file, json file
    python3 - "$1" "$2" "$3" <<'PY'
import json, sys
name, log, out = sys.argv[1:4]
lines = [l for l in open(log, errors="replace").read().splitlines() if l.strip()]
json.dump({"peer": name, "status": "failed: " + (lines[-1][:300] if lines else "no output")}, open(out, "w"))
PY
}

venv() {  # dir, pip args...
    local dir=$1; shift
    if [ ! -x "$dir/bin/python" ]; then
        python3 -m venv "$dir" && "$dir/bin/pip" install -q torch==2.13.0 && "$dir/bin/pip" install -q "$@" \
            || { rm -rf "$dir"; return 1; }
    fi
}

run_peer() {  # name, venv dir, pip args (as one string), script, args...
    local name=$1 dir=$2 pips=$3 script=$4; shift 4
    local log="$OUT/$name.log"
    if venv "$dir" $pips >"$log" 2>&1 && "$dir/bin/python" "$HERE/$script" "$@" --out "$OUT/$name.json" >>"$log" 2>&1; then
        tail -n 1 "$log"
    else
        failed "$name" "$log" "$OUT/$name.json"; cat "$OUT/$name.json"; echo
    fi
}

"$PY" "$HERE/run_sinkstream.py" --model "$OUT/model" "${COMMON[@]}" --out "$OUT/sinkstream.json" 2>"$OUT/sinkstream.log" | tail -n 1
run_peer attention_sinks "$OUT/venv-attention-sinks" "attention_sinks==0.4.0 einops" run_attention_sinks.py \
    --model "$OUT/model" "${COMMON[@]}"
run_peer hf_sinkcache "$OUT/venv-hf-sinkcache" "transformers==4.46.3" run_hf_sinkcache.py --model "$OUT/model" "${COMMON[@]}"
run_peer llama_cpp "$OUT/venv-llama-cpp" "llama-cpp-python==0.3.36 numpy" run_llama_cpp.py \
    --gguf "$(cat "$OUT/gguf_path.txt")" "${COMMON[@]}"
rm -f "$OUT/sinkstream_again.json"
if [ "$BRACKET" = 1 ]; then
    "$PY" "$HERE/run_sinkstream.py" --model "$OUT/model" "${COMMON[@]}" --out "$OUT/sinkstream_again.json" \
        2>"$OUT/sinkstream_again.log" | tail -n 1
fi
"$PY" "$HERE/table.py" --out "$OUT"
