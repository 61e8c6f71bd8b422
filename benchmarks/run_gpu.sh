#!/usr/bin/env bash
# The whole GPU tier in one call, sized for <= 8 minutes on an H100: build the extension, the GPU tests,
# the README main job, the chunk / rope_append / generator benchmarks at Wan2.1-1.3B shapes, compute-sanitizer,
# tables and plots. Logs, JSON, CSV and PNG go to $OUT (default benchmarks/results/gpu-run); a short summary
# is printed last. Each step has a time limit (seconds) so one slow step cannot eat the others' time.
#
#   bash benchmarks/run_gpu.sh                  # every step
#   STEPS="build chunk" bash benchmarks/run_gpu.sh   # some steps (names below)
#   CONFIGS=relax QUICK=1 bash benchmarks/run_gpu.sh
#
# After the run: copy the JSON/CSV/PNG that matter into benchmarks/results/, and relaxkv_kernels/tuning.json
# (bench_chunk --write-tuning records the fastest attention engine per shape on this device).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-run}
STEPS=${STEPS:-build tests chunk rope generator readme sanitizer plot}
CONFIGS=${CONFIGS:-relax,dense,pack}
mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'run_gpu.sh: no CUDA device')" || exit 2
quick=${QUICK:+--quick}

summary=()
step() {  # step NAME LIMIT_S COMMAND...: run if selected, log to $OUT/NAME.log, record rc and seconds
    local name=$1 limit=$2
    shift 2
    [[ " $STEPS " == *" $name "* ]] || return 0
    local t0=$SECONDS
    echo "== $name (limit ${limit}s): $*"
    timeout --signal=INT --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    summary+=("$(printf '%-10s rc=%-3s %4ss  %s' "$name" "$rc" "$((SECONDS - t0))" "$OUT/$name.log")")
    tail -n 3 "$OUT/$name.log"
}

step build 90 python setup.py build_ext --inplace
step tests 120 python -m pytest -q -m gpu -p no:cacheprovider tests --junitxml "$OUT/tests.xml"
step chunk 200 python benchmarks/bench_chunk.py --shapes wan --configs "$CONFIGS" --write-tuning --no-progress \
    --reps 3 --budget-s 10 --out "$OUT/chunk_wan.json"
step rope 40 python benchmarks/bench_rope_append.py --shapes wan --out "$OUT/rope_append_wan.json"
step generator 150 python benchmarks/bench_generator.py --preset wan-1.3b $quick --no-progress \
    --out "$OUT/generator_wan.json"
step readme 60 python -m relaxkv_gen --preset tiny --policy all --chunks 20 --out "$OUT/readme_main" --no-progress
step sanitizer 120 bash tests/run_compute_sanitizer.sh
shopt -s nullglob
step plot 30 bash -c "python benchmarks/plot_results.py $OUT/chunk_*.json --table $OUT/TABLE.md && \
    python benchmarks/plot_generator.py $OUT/generator_*.json --table $OUT/GENERATOR.md"
cp relaxkv_kernels/tuning.json "$OUT/tuning.json"

echo
echo "== summary ($(python -c 'import torch; print(torch.cuda.get_device_name())'), $(git rev-parse --short HEAD))"
printf '%s\n' "${summary[@]}"
python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name in ("chunk_wan.json", "rope_append_wan.json", "generator_wan.json"):
    path = out / name
    if not path.is_file():
        print(f"{name}: missing")
        continue
    data = json.loads(path.read_text())
    for goal in data.get("targets", []):
        print(name, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in goal.items()})
EOF
