#!/usr/bin/env bash
# The GPU check, one short prepared run (under 8 minutes on one H200): the fused step's correctness on
# CUDA for every family it covers (float32, bfloat16) and its speed (bf16/fp16, cache 4096) against the
# transformers path and recomputation. Runs with the machine's own python3/torch; sinkstream from src/.
#   bash bench/gpu_check.sh [OUT]        (OUT defaults to $OUT, else out/gpu-check)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-out/gpu-check}}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt" || true
PYTHONPATH=src timeout 450 python3 bench/gpu_check.py --device cuda --out "$OUT" 2> "$OUT/gpu_check.log" | tail -n 1
