#!/usr/bin/env bash
# Issue 28's figures on a GPU, in one call (about 6 minutes on an H100): single-stream
# decode of the qwen2.5-0.5b and llama-3.2-1b shapes in bf16, int8 and int4 (graphs on),
# the 0.5b in bf16 with --enforce-eager (no graphs, no glue) and with --async-scheduling
# (graphs and overlap) beside it, kernels launched
# per decode step and the GPU's busy share, nano-vllm's workload and long-prompt. Each
# run has its own time limit, so one that hangs costs only its own figure. Logs go to
# $OUT (default /tmp/kvflow-cuda-bench).
#
# The model shapes and workloads come from the team's shared files: $KVFLOW_SHARED,
# ../shared or ./shared. A machine that has only the repository needs them carried along:
#   cp -r ../shared .shared-files   (git ignores it)   and run with
#   KVFLOW_SHARED=.shared-files scripts/cuda_bench.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/kvflow-cuda-bench}
mkdir -p "$out/models"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
for dir in "${KVFLOW_SHARED:-}" ../shared shared .shared-files; do
    if [ -n "$dir" ] && [ -d "$dir/model-shapes" ]; then
        export KVFLOW_SHARED="$(cd "$dir" && pwd)"
        break
    fi
done
[ -n "${KVFLOW_SHARED:-}" ] || { echo "no shared files (model shapes, workloads)"; exit 1; }
python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())' \
    || exit 1

run() {  # run SECONDS LOGNAME ARGS...: kvflow's CLI, its summary lines kept
    local seconds=$1 log=$2
    shift 2
    timeout "$seconds" python3 -m kvflow.cli "$@" >"$out/$log.log" 2>&1
    local status=$?
    grep -E "decode:|tokens/s:|roofline|achieved" "$out/$log.log" | sed 's/^/    /'
    [ $status -eq 0 ] || echo "    ($log: exit $status; see $out/$log.log)"
}

for shape in qwen2.5-0.5b llama-3.2-1b; do
    [ -f "$out/models/$shape/config.json" ] || timeout 180 python3 -m kvflow.cli bench \
        make-model "$shape" "$out/models/$shape" >"$out/make-$shape.log" 2>&1 \
        || echo "make-model $shape failed (see $out/make-$shape.log)"
done
qwen=$out/models/qwen2.5-0.5b
llama=$out/models/llama-3.2-1b

echo "== one stream, 128 tokens in, 256 out, 3 runs (graphs on)"
for model in "$qwen" "$llama"; do
    for format in bf16 int8 int4; do
        echo "  $(basename "$model") $format:"
        quantization=()
        [ "$format" = bf16 ] || quantization=(-q "$format")
        run 90 "latency-$(basename "$model")-$format" bench latency --model "$model" \
            --device cuda --dtype bfloat16 --output-len 256 --num-iters 3 "${quantization[@]}"
    done
done
echo "  $(basename "$qwen") bf16, --enforce-eager:"
run 90 latency-eager bench latency --model "$qwen" --device cuda --dtype bfloat16 \
    --output-len 256 --num-iters 3 --enforce-eager
echo "  $(basename "$qwen") bf16, --async-scheduling:"
run 90 latency-async bench latency --model "$qwen" --device cuda --dtype bfloat16 \
    --output-len 256 --num-iters 3 --async-scheduling

echo "== a decode step's kernels and the GPU's busy share (one stream, $(basename "$qwen"))"
timeout 90 python3 benchmarks/profile_cuda_step.py --model "$qwen" >"$out/profile.log" 2>&1
grep -iE "kernels|busy|step" "$out/profile.log" | head -8 | sed 's/^/    /'

echo "== nano-vllm-bench (256 sequences, 100-1,024 in and out), $(basename "$qwen") bf16"
run 200 nano-vllm bench throughput --model "$qwen" --device cuda --dtype bfloat16 \
    --workload nano-vllm-bench
echo "== long-prompt, $(basename "$qwen") bf16"
run 90 long-prompt bench throughput --model "$qwen" --device cuda --dtype bfloat16 \
    --workload long-prompt
