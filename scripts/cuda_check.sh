#!/usr/bin/env bash
# The checks to run when a CUDA machine is at hand (CI has none): the test suite with every
# engine the tests build placed on the GPU, then single-stream decode in bf16, int8 and
# int4 on the qwen2.5-0.5b shape (benchmarks/quantization.py --speed-only). Logs go to
# $OUT (default /tmp/kvflow-cuda-check). Run it from any directory, with the Python that
# has torch with CUDA and kvflow's dependencies:
#
#   scripts/cuda_check.sh [pytest arguments]
#
# The default arguments run the whole suite on 6 workers, each test at most 120 s (they need
# pytest-xdist and pytest-timeout); every test's result is in tests.log as it finishes, so a
# run cut short by CUDA_CHECK_TEST_SECONDS still says which tests failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/kvflow-cuda-check}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())' \
    || exit 1
# Built once before the workers start, which would otherwise all build them at once.
python3 -m kvflow.kernels >"$out/kernels.log" 2>&1 || echo "native kernel build failed"

# The CUDA path's own tests first, so that a suite cut short still ran them: the Triton
# kernels compiled for the GPU, graphs captured and replayed for real, graphs on and off
# token for token with transformers.
timeout "${CUDA_CHECK_CUDA_TESTS_SECONDS:-150}" python3 -m pytest -q -rfE -p no:cacheprovider \
    tests/test_triton_attention.py tests/test_triton_glue.py tests/test_cuda_graphs.py \
    >"$out/cuda-tests.log" 2>&1
echo "cuda tests: exit $?"
grep -E "FAILED|ERROR|passed|failed" "$out/cuda-tests.log" | tail -20

# The tests pin device="cpu", CI's only device; in a copy of them beside the originals
# (so that paths relative to the repository still hold) "auto" puts every engine whose
# device a test does not choose for a reason of its own on the GPU.
tests=.cuda-tests
rm -rf "$tests" && cp -r tests "$tests"
sed -i 's/device="cpu"/device="auto"/g' "$tests"/*.py
if [ $# -eq 0 ]; then set -- -n 6 -v -rfE --timeout 120 "$tests"; fi
timeout "${CUDA_CHECK_TEST_SECONDS:-330}" python3 -m pytest -m "not slow" \
    -p no:cacheprovider "$@" >"$out/tests.log" 2>&1
echo "tests: exit $?"
grep -E "FAILED|ERROR|passed|failed" "$out/tests.log" | grep -v "PASSED" | tail -40
rm -rf "$tests"

[ "${CUDA_CHECK_SPEED_SECONDS:-200}" -gt 0 ] || exit 0
timeout "${CUDA_CHECK_SPEED_SECONDS:-200}" python3 benchmarks/quantization.py --speed-only \
    --rounds 3 --output-len 64 >"$out/speed.json" 2>"$out/speed.log"
echo "speed: exit $?"
cat "$out/speed.json"
grep -iE "quantized kernel|error|Traceback" "$out/speed.log" | head -20

# Graphs against eager launches on one stream of the demo model (launches, not bytes, set
# its speed on a GPU).
for flags in "" "--enforce-eager"; do
    echo "latency ${flags:-(graphs)}:"
    timeout 90 python3 -m kvflow.cli bench latency --device cuda --output-len 128 \
        --num-iters 3 $flags 2>>"$out/latency.log" | tail -4
done
