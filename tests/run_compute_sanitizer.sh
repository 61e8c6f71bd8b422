#!/usr/bin/env bash
# GPU session: run the CUDA-kernel tests under compute-sanitizer memcheck (out-of-bounds and misaligned
# accesses, leaks of device allocations are reported; any error fails the run).
# Usage: tests/run_compute_sanitizer.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
SANITIZER="$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")"
if [ ! -x "$SANITIZER" ]; then
    echo "compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin)" >&2
    exit 2
fi
# PyTorch's caching allocator hides out-of-bounds accesses inside its blocks: allocate exactly.
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
exec "$SANITIZER" --tool memcheck --error-exitcode 1 --print-limit 20 \
    python -m pytest tests/test_cuda_ops.py tests/test_build.py tests/test_cache_fused.py -m gpu -q -p no:cacheprovider "$@"
