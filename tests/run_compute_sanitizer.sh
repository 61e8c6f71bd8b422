#!/usr/bin/env bash
# GPU session: the csrc/ kernel tests (marker csrc: the [gpu] cases of the kernel_device fixture and the
# GPU chunk steps that run the csrc kernels; not the Wan-shape cases, which take minutes under the tools)
# under compute-sanitizer, three runs, each failing on any error. Only our kernels are instrumented
# (--kernel-name kns=relaxkv: the csrc namespace), not cuDNN, cuBLAS or Triton's:
#   memcheck   out-of-bounds and misaligned accesses; with
#              PYTORCH_NO_CUDA_MEMORY_CACHING=1 (the caching allocator hides overruns inside its blocks),
#              which makes CUDA-graph capture impossible (cudaMalloc while capturing): the tests marked
#              cuda_graph are deselected from this run only
#   racecheck  shared-memory data races (caching allocator on, graph tests included)
#   synccheck  invalid barrier / warp-synchronous usage (caching allocator on, graph tests included)
# Usage: tests/run_compute_sanitizer.sh [extra pytest args]. Exit status: 0 when all three runs are clean.
set -uo pipefail
cd "$(dirname "$0")/.."
SANITIZER="$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")"
if [ ! -x "$SANITIZER" ]; then
    echo "compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin)" >&2
    exit 2
fi
PYTHON=${PYTHON:-python3}
PYTEST=("$PYTHON" -m pytest tests -q -p no:cacheprovider -k "not wan")
failed=()

run() {  # run <tool> <marker expression> [env assignments...]
    local tool=$1 markers=$2
    shift 2
    echo "=== compute-sanitizer --tool $tool: -m '$markers'"
    if ! env "$@" "$SANITIZER" --tool "$tool" --kernel-name kns=relaxkv --error-exitcode 1 --print-limit 20 \
            "${PYTEST[@]}" -m "$markers" ${EXTRA[@]+"${EXTRA[@]}"}; then
        failed+=("$tool")
    fi
}

EXTRA=("$@")
run memcheck "gpu and csrc and not cuda_graph" PYTORCH_NO_CUDA_MEMORY_CACHING=1
run racecheck "gpu and csrc"
run synccheck "gpu and csrc"

if [ ${#failed[@]} -ne 0 ]; then
    echo "compute-sanitizer: errors (or failing tests) under: ${failed[*]}" >&2
    exit 1
fi
echo "compute-sanitizer: memcheck, racecheck and synccheck clean"
