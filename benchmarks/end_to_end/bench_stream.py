"""A long stream: constant KV memory and flat time per chunk, hundreds of chunks into one rollout.

    python -m benchmarks stream                          # 500 chunks of the tiny preset per policy (CPU: minutes)
    python -m benchmarks stream --preset wan-1.3b --chunks 200   # on a GPU

One ``relaxkv_gen.rollout`` per policy (relaxkv_gen's model, random weights, the preset's dtype and device), every
chunk timed (host wall time after a device sync) and its cache bytes recorded. Per policy: the first steady chunk
(the first from which the plan's keys and selections keep their shape: ``report.steady_chunks``), whether
``memory_bytes()`` stays equal (allocated once), the chunk from which the live bytes do (the memory full: Relax's
reservoir after 40 chunks, Pack's archive after ~70), and the ratio of the median time of the last
``--window`` chunks to that of the first ``--window`` steady ones (target: within 10%, as a ratio in one run). Far
into a stream the positions exceed any trained length: the RoPE angles stay exact there (``tests/ops``: positions
up to 2^24 against the float64 reference). Results: benchmarks/results/stream_<preset>_<device>.json (+ .csv); CPU
runs are labelled "CPU time, not a GPU measurement".
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from benchmarks import common

common.configure_triton()

import torch  # noqa: E402

from relaxkv_gen import build_model  # noqa: E402
from relaxkv_gen import get_preset  # noqa: E402
from relaxkv_gen import random_text  # noqa: E402
from relaxkv_gen.report import steady_chunks  # noqa: E402
from relaxkv_gen.rollout import POLICY_NAMES  # noqa: E402
from relaxkv_gen.rollout import rollout  # noqa: E402

TARGET = 1.10  # last window / first steady window, median time per chunk


def stream_row(model, policy: str, chunks: int, window: int, backend: str, progress: bool) -> dict:
    """One policy's stream: memory and time per chunk from the first steady chunk on."""
    res = rollout(model, policy, random_text(model.cfg, 1, 0), num_chunks=chunks, backend=backend, timing=False,
                  progress=progress)
    records = res.chunks
    first = (steady_chunks(records) or [len(records)])[0]
    steady = records[first:]
    times = [r["time_ms"] for r in steady]
    early, late = times[:window], times[-window:]
    ratio = statistics.median(late) / statistics.median(early) if len(times) >= 2 * window else None
    live = [r["kv_live_bytes"] for r in records]
    live_from = next(i for i in range(len(live)) if len(set(live[i:])) == 1)  # the memory's frames all held
    return {"policy": policy, "chunks": chunks, "first_steady": first, "steady_chunks": len(steady),
            "kv_bytes": records[-1]["kv_bytes"], "memory_constant": len({r["kv_bytes"] for r in records}) == 1,
            "live_bytes": live[-1], "live_constant_from": live_from,
            "last_frame_position": (chunks * res.chunk_frames) - 1,
            "early_ms": statistics.median(early) if early else None, "late_ms": statistics.median(late) if late
            else None, "late_over_early": ratio, "target": TARGET,
            "flat": ratio is not None and ratio <= TARGET}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--policies", default=",".join(POLICY_NAMES))
    p.add_argument("--chunks", type=int, default=500)
    p.add_argument("--window", type=int, default=50, help="chunks per timing window (first steady, last)")
    p.add_argument("--backend", choices=["reference", "fused"], help="default: fused on CUDA, else reference")
    p.add_argument("--out", help="JSON path (CSV beside it); default benchmarks/results/stream_<preset>_<device>.json")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = common.default_device()
    cfg = get_preset(args.preset)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(cfg, seed=0, device=device, dtype=dtype)
    backend = args.backend or ("fused" if device.type == "cuda" else "reference")
    rows = [stream_row(model, name, args.chunks, args.window, backend, not args.no_progress)
            for name in args.policies.split(",") if name]
    env = common.env_info(device)
    payload = {"kind": "stream", "env": env, "preset": cfg.name, "backend": backend, "rows": rows,
               "targets": [{"policy": r["policy"], "late_over_early": r["late_over_early"], "target": TARGET,
                            "memory_constant": r["memory_constant"]} for r in rows]}
    out = Path(args.out) if args.out else common.default_out("stream", cfg.name, device)
    json_path, csv_path = common.write_results(out, payload, rows)
    note = f" -- {common.CPU_LABEL}" if env["cpu_timing"] else ""
    print(f"\nstream of {args.chunks} chunks, {cfg.name}, {backend}, on {env['device']}{note}")
    print(f"{'policy':7} {'steady from':>11} {'memory':>9} {'live const from':>15} {'first ms':>9} {'last ms':>9} "
          f"{'ratio':>6}")
    for r in rows:
        print(f"{r['policy']:7} {r['first_steady']:>11} {'constant' if r['memory_constant'] else 'GROWS':>9} "
              f"{r['live_constant_from']:>15} {common.fmt(r['early_ms']):>9} "
              f"{common.fmt(r['late_ms']):>9} {common.fmt(r['late_over_early']):>6}")
    print(f"wrote {json_path} and {csv_path}")
    return dict(payload, json=str(json_path))


if __name__ == "__main__":
    main()
