#!/usr/bin/env bash
# Every GPU benchmark at Wan2.1-1.3B shapes, results into benchmarks/results/ (or $RESULTS).
#
#   bash benchmarks/run_gpu.sh            # all: chunk, scaling, micro, then tables and plots
#   bash benchmarks/run_gpu.sh chunk      # one part (chunk | scaling | micro | plot); CONFIGS=relax for one config
#
# Each part writes JSON (+ CSV, PNG) with the device name, torch/triton/CUDA versions and the commit.
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=${RESULTS:-benchmarks/results}
CONFIGS=${CONFIGS:-dense,relax,pack}
SECONDS_LIST=${SECONDS_LIST:-10,30,60,120}
part=${1:-all}
mkdir -p "$RESULTS"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'run_gpu.sh: no CUDA device')"
dev=$(python -c "import torch; print(torch.cuda.get_device_name().lower().replace(' ', '_'))")
tag=${CONFIGS//,/-}

if [[ $part == all || $part == chunk ]]; then
    python benchmarks/bench_chunk.py --shapes wan --configs "$CONFIGS" --write-tuning --out "$RESULTS/chunk_wan_${tag}_${dev}.json"
fi
if [[ $part == all || $part == scaling ]]; then
    python benchmarks/bench_scaling.py --shapes wan --seconds "$SECONDS_LIST" --layers 2 \
        --out "$RESULTS/scaling_wan_${dev}.json"
fi
if [[ $part == all || $part == micro ]]; then
    python -m pytest benchmarks/test_micro.py -m gpu -q -p no:cacheprovider \
        --benchmark-json "$RESULTS/micro_wan_${dev}.json" --benchmark-columns=min,median,max,rounds
fi
if [[ $part == all || $part == plot ]]; then
    shopt -s nullglob
    python benchmarks/plot_results.py "$RESULTS"/chunk_*.json "$RESULTS"/scaling_*.json --table "$RESULTS/TABLE.md"
fi
