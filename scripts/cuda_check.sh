#!/usr/bin/env bash
# The checks to run when a CUDA machine is at hand (CI has none), in one call that fits
# ten minutes on an H100: the CUDA path's own tests (Triton kernels compiled for the GPU,
# CUDA graphs captured and replayed, graphs on and off token for token with
# transformers), then issue 28's figures (scripts/cuda_bench.sh). With CUDA_CHECK_SUITE=1
# the whole test suite follows, every engine the tests build placed on the GPU. Logs go to
# $OUT (default /tmp/kvflow-cuda-check). Run it from any directory, with the Python that
# has torch with CUDA and kvflow's dependencies:
#
#   scripts/cuda_check.sh [pytest arguments for the whole suite]
#
# The suite's default arguments run it on 6 workers, each test at most 120 s (they need
# pytest-xdist and pytest-timeout); every test's result is in tests.log as it finishes, so a
# run cut short by CUDA_CHECK_TEST_SECONDS still says which tests failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/kvflow-cuda-check}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())' \
    || exit 1
# Built once before anything else, which would otherwise build them at once.
python3 -m kvflow.kernels >"$out/kernels.log" 2>&1 || echo "native kernel build failed"

timeout "${CUDA_CHECK_CUDA_TESTS_SECONDS:-150}" python3 -m pytest -q -rfE -p no:cacheprovider \
    tests/test_triton_attention.py tests/test_triton_glue.py tests/test_triton_quantized.py \
    tests/test_triton_moe.py tests/test_cuda_graphs.py tests/test_persistent_batch.py \
    >"$out/cuda-tests.log" 2>&1
echo "cuda tests: exit $?"
grep -E "FAILED|ERROR|passed|failed" "$out/cuda-tests.log" | tail -20

[ "${CUDA_CHECK_BENCH:-1}" = 1 ] && OUT="$out/bench" scripts/cuda_bench.sh

[ "${CUDA_CHECK_SUITE:-0}" = 1 ] || exit 0
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
