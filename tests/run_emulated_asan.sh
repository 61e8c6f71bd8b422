#!/usr/bin/env bash
# The emulated CUDA kernel tests (tests/cuda_emu/, the [emulated] cases of the kernel_device fixture) under
# AddressSanitizer: every out-of-bounds read or write of a kernel into a torch CPU tensor (or its shared
# memory) aborts with a report. The CPU analogue of tests/run_compute_sanitizer.sh; needs gcc's libasan.
# Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
LIBASAN="$(${CXX:-g++} -print-file-name=libasan.so)"
[ -f "$LIBASAN" ] || { echo "libasan.so not found (${CXX:-g++} -print-file-name=libasan.so)"; exit 2; }
export RELAXKV_EMU_SANITIZE=address
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:${ASAN_OPTIONS:-}"
LD_PRELOAD="$LIBASAN" python -m pytest -q -p no:cacheprovider --capture=sys -m csrc -k emulated \
    tests "$@"
