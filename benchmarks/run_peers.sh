#!/usr/bin/env bash
# The comparison in docs/benchmarks.md, with one command: kvflow, transformers (one request
# at a time and static batches) and llama.cpp's llama-server on the qwen2.5-0.5b shape in
# bf16 (random weights), on the mixed, long-prompt and single-stream workloads, in one run.
# llama.cpp is built from source into ~/.cache/kvflow/peers on first use (minutes).
#
#   benchmarks/run_peers.sh [extra `kvflow bench compare` flags]
#
# Issue 10's quantized comparison (kvflow at bf16, int8 and int4 against llama.cpp on the
# bf16 GGUF and llama-quantize's Q8_0, Q4_0 and Q4_K_M of it; later flags replace these):
#
#   OUT=docs/benchmarks/$(date +%F)-qwen2.5-0.5b-quantized benchmarks/run_peers.sh \
#       --threads 2 --workloads single-stream mixed --systems kvflow llama.cpp \
#       --kvflow-quantizations bf16 int8 int4 --llama-cpp-types BF16 Q8_0 Q4_0 Q4_K_M \
#       --llama-cpp-parallel 8
set -euo pipefail
cd "$(dirname "$0")/.."
make install
bin=.venv/bin
model=${MODEL:-${KVFLOW_CACHE:-$HOME/.cache/kvflow}/bench-models/qwen2.5-0.5b}
out=${OUT:-docs/benchmarks/$(date +%F)-qwen2.5-0.5b}
[ -f "$model/config.json" ] || "$bin/kvflow" bench make-model qwen2.5-0.5b "$model"
"$bin/kvflow" env
"$bin/kvflow" bench compare --model "$model" --workloads mixed long-prompt single-stream \
    --out "$out" "$@"
