#!/usr/bin/env bash
# The comparison in docs/benchmarks.md, with one command: kvflow, transformers (one request
# at a time and static batches) and llama.cpp's llama-server on the qwen2.5-0.5b shape in
# bf16 (random weights), on the mixed, long-prompt and single-stream workloads, in one run.
# llama.cpp is built from source into ~/.cache/kvflow/peers on first use (minutes).
#
#   benchmarks/run_peers.sh [extra `kvflow bench compare` flags]
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
