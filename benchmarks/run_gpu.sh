#!/usr/bin/env bash
# The GPU tier in one call, sized for one device command (limits add up to 590 s; expected ~6-7 min on an
# H100): build the extension, the chunk and generator benchmarks at Wan2.1-1.3B shapes, the GPU tests,
# rope_append against the copy bandwidth, the README main job, tables and plots, and last the diffusers adapter
# against relaxkv_gen's model (skipped, status 77, where diffusers is not installed). Everything goes to $WORK
# (default benchmarks/results/gpu-run); where $OUT is set (the lent machine returns at most 8 files from it),
# $OUT gets after every step the archive of $WORK plus the 7 files that matter, so a run cut short keeps what
# finished. The summary, printed last, lists each step's exit status and time, then every JSON's targets.
#
#   bash benchmarks/run_gpu.sh                        # the default steps, most valuable first
#   STEPS="build chunk" bash benchmarks/run_gpu.sh    # some steps; "sanitizer" is opt-in (minutes under the tools)
#   CONFIGS=relax FULL=1 bash benchmarks/run_gpu.sh   # one chunk config; the full generator benchmark
#   STEPS="build fp8" bash benchmarks/run_gpu.sh      # opt-in: FP8-pool chunk steps vs bf16 pools, in
#                                                     # the archive as chunk_wan_fp8.json; its targets in summary.txt
#   STEPS="build host" bash benchmarks/run_gpu.sh     # opt-in: window chunk steps with host pools vs device pools
#                                                     # (each staging: first call, next layer, all layers ahead)
#                                                     # and the staging vs the pinned copy bandwidth, relax and
#                                                     # pack, as chunk_wan_host.json; its targets in summary.txt
#
# After the run: copy the JSON/CSV/PNG that matter into benchmarks/results/, commit relaxkv_kernels/ops/dense_attention/tuning.json
# (bench_chunk --write-tuning records the fastest attention engine per shape on this device), and fill the
# README's results section (plot_results.py --readme README.md).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WORK=${WORK:-benchmarks/results/gpu-run}
STEPS=${STEPS:-build chunk generator tests rope readme plot diffusers}
CONFIGS=${CONFIGS:-relax,dense,pack}
KEEP=(summary.txt chunk_wan.json generator_wan.json diffusers_wan.json rope_append_wan.json tuning.json TABLE.md)
mkdir -p "$WORK"
export PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
export RELAXKV_COMMIT=${RELAXKV_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'run_gpu.sh: no CUDA device')" || exit 2
quick=$([ -n "${FULL:-}" ] || echo --quick)  # FULL=1: every rep of the generator benchmark
xdist=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 3")

summary() {  # the steps so far and every JSON's targets, into $WORK/summary.txt
    {
        echo "== $("$PY" -c 'import torch; print(torch.cuda.get_device_name())'), commit $RELAXKV_COMMIT"
        printf '%s\n' "${steps[@]}"
        "$PY" - "$WORK" <<'EOF'
import json, sys
from pathlib import Path
for path in sorted(Path(sys.argv[1]).glob("*.json")):
    data = json.loads(path.read_text())
    for goal in data.get("targets", []) if isinstance(data, dict) else []:
        print(path.name, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in goal.items()})
EOF
    } > "$WORK/summary.txt" 2>&1
}

keep() {  # what comes back from a lent machine: the archive of $WORK and the files that matter
    [ -n "${OUT:-}" ] || return 0
    cp relaxkv_kernels/ops/dense_attention/tuning.json "$WORK/tuning.json"
    summary
    tar czf "$OUT/gpu-run.tgz" -C "$WORK" . 2>/dev/null
    for f in "${KEEP[@]}"; do [ -f "$WORK/$f" ] && cp "$WORK/$f" "$OUT/"; done
}

steps=()
step() {  # step NAME LIMIT_S COMMAND...: run if selected, log to $WORK/NAME.log, record rc and seconds
    local name=$1 limit=$2
    shift 2
    [[ " $STEPS " == *" $name "* ]] || return 0
    local t0=$SECONDS
    echo "== $name (limit ${limit}s): $*"
    timeout --signal=INT --kill-after=5 "$limit" "$@" > "$WORK/$name.log" 2>&1
    local rc=$?
    steps+=("$(printf '%-10s rc=%-3s %4ss  %s' "$name" "$rc" "$((SECONDS - t0))" "$WORK/$name.log")")
    tail -n 3 "$WORK/$name.log"
    keep
}

step build 90 "$PY" setup.py build_ext --inplace
step chunk 150 "$PY" -m benchmarks chunk --shapes wan --configs "$CONFIGS" --write-tuning --no-progress \
    --reps 3 --budget-s 10 --out "$WORK/chunk_wan.json"
step generator 100 "$PY" -m benchmarks generator --preset wan-1.3b $quick --no-progress \
    --out "$WORK/generator_wan.json"
step tests 100 "$PY" -m pytest -q -m gpu -p no:cacheprovider $xdist tests --junitxml "$WORK/tests.xml"
step rope 25 "$PY" -m benchmarks rope_append --shapes wan --out "$WORK/rope_append_wan.json"
step readme 25 "$PY" -m relaxkv_gen --preset tiny --policy all --chunks 20 --out "$WORK/readme_main" --no-progress
step sanitizer 300 env PYTHON="$PY" bash tests/run_compute_sanitizer.sh
step plot 10 bash -c "shopt -s nullglob; $PY -m benchmarks plot_results $WORK/chunk_*.json --table $WORK/TABLE.md; \
    $PY -m benchmarks plot_generator $WORK/generator_*.json --table $WORK/GENERATOR.md"
step fp8 200 "$PY" -m benchmarks chunk --shapes wan --configs "$CONFIGS" --kv-dtype fp8 --engines sdpa_cudnn \
    --skip-official --no-progress --reps 3 --budget-s 10 --out "$WORK/chunk_wan_fp8.json"
step host 300 "$PY" -m benchmarks chunk --shapes wan --configs relax,pack --pools host --engines sdpa_cudnn \
    --staging first_call,next_layer,all_layers --skip-official --no-progress --reps 3 --budget-s 10 \
    --out "$WORK/chunk_wan_host.json"
step diffusers 90 "$PY" -m benchmarks diffusers --preset wan-1.3b --reps 2 --no-progress \
    --out "$WORK/diffusers_wan.json"
cp relaxkv_kernels/ops/dense_attention/tuning.json "$WORK/tuning.json"
summary
keep
echo
cat "$WORK/summary.txt"
