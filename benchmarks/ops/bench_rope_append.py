"""rope_append against the memory bandwidth of the same device: GB/s per backend vs a device-to-device copy.

    python -m benchmarks rope_append --shapes wan          # on a GPU: Wan2.1-1.3B chunk, bf16
    python -m benchmarks rope_append --shapes tiny         # CPU smoke test (CPU time, not a GPU figure)

One call rotates a chunk of U frames: it reads q, k, v [B, U*F, H, D] and writes q_rot, the rotated
keys and the values into the cache: 6 tensors of B*U*F*H*D elements. At Wan shapes (B = 1, U = 3,
F = 1560, H = 12, D = 128, bf16) that is 6 x 14.4 MB = 86 MB per call, a floor of 29 us at 3 TB/s
(4.3 ms for the 150 calls of a chunk); the prototypes (proto given) add B*U*D fp32 values.

Rows, all measured in this run on this device:
    copy       ``dst.copy_(src)`` of 3 tensors' bytes (reads and writes the same 86 MB): the ceiling
    <backend>  the public op ``relaxkv_kernels.rope_append(..., backend=...)`` for reference, triton,
               cuda and auto (the row names what auto resolved to), each without and with ``proto``

Per row: ms per call (``common.measure``: do_bench median with the L2 flushed between calls on a GPU),
GB/s = bytes / time, the fraction of the copy's GB/s, ms for ``layers * passes`` calls back to back
(the per-chunk cost with the host overhead of every call), and the largest difference of q_rot and of
the cache rows from the reference backend's. ``targets``: whether the auto and cuda rows (no proto)
reach 60% of the copy's GB/s (the GPU target in benchmarks/README.md). Results go to
benchmarks/results/rope_append_<shape>_<device>.json (and .csv); CPU runs are labelled "CPU time, not a GPU
measurement".
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmarks import common

common.configure_triton()

import torch  # noqa: E402

import relaxkv_kernels as rk  # noqa: E402
from relaxkv_kernels.ops.rope_append.op import BACKENDS  # noqa: E402

BACKEND_NAMES = ("reference", "triton", "cuda", "auto")
ASSUMED_TBPS = 3.0  # for the floor printed before the run: a prediction, replaced by the measured copy
TARGET_FRACTION = 0.6  # target: the auto backend and the CUDA kernel at >= 60% of the copy bandwidth


def make_inputs(shape: common.Shape, frames: int, cache_frames: int, device: torch.device, seed: int) -> dict:
    """Fresh random q, k, v of one chunk, caches of ``cache_frames`` slots; the chunk goes into the last slots."""
    s = shape
    gen = torch.Generator(device=device).manual_seed(seed)
    n, rows = frames * s.frame_tokens, cache_frames * s.frame_tokens

    def randn(*size):
        return torch.randn(*size, generator=gen, device=device).to(s.torch_dtype)

    return {
        "q": randn(s.batch, n, s.heads, s.head_dim), "k": randn(s.batch, n, s.heads, s.head_dim),
        "v": randn(s.batch, n, s.heads, s.head_dim),
        "k_cache": randn(s.batch, rows, s.heads, s.head_dim), "v_cache": randn(s.batch, rows, s.heads, s.head_dim),
        "proto": torch.zeros(s.batch, cache_frames, s.head_dim, device=device),
        "frame_slot": torch.arange(cache_frames - frames, cache_frames, device=device),
        "frame_pos": torch.arange(frames, device=device) + 100,  # temporal positions well away from 0
    }


def call(x: dict, shape: common.Shape, backend: str, with_proto: bool) -> torch.Tensor:
    return rk.rope_append(x["q"], x["k"], x["v"], x["k_cache"], x["v_cache"], x["proto"] if with_proto else None,
                          x["frame_slot"], x["frame_pos"], shape.height, shape.width, backend=backend)


def bytes_per_call(shape: common.Shape, frames: int, with_proto: bool) -> int:
    """q, k, v read + q_rot, k_cache rows, v_cache rows written; proto rows (fp32) when given."""
    s = shape
    elements = s.batch * frames * s.frame_tokens * s.heads * s.head_dim
    return 6 * elements * s.torch_dtype.itemsize + (s.batch * frames * s.head_dim * 4 if with_proto else 0)


def max_diff(x: dict, ref: dict, q_rot: torch.Tensor, q_ref: torch.Tensor) -> float:
    """Largest |difference| of q_rot, the written cache rows and the prototypes from the reference's (fp32)."""
    diffs = [(q_rot.float() - q_ref.float()).abs().max()]
    for name in ("k_cache", "v_cache", "proto"):
        diffs.append((x[name].float() - ref[name].float()).abs().max())
    return float(torch.stack(diffs).max())


def chunk_ms(fn, device: torch.device, calls: int, budget_s: float) -> float:
    """Wall time of ``calls`` back-to-back calls (host overhead included), after one warm-up call.

    When ``calls`` would exceed ``budget_s`` (the reference backend at Wan shapes), fewer calls are timed
    and the time is scaled to ``calls``.
    """
    common.synchronize(device)
    t0 = time.perf_counter()
    fn()
    common.synchronize(device)
    first_s = time.perf_counter() - t0
    timed = max(1, min(calls, int(budget_s / max(first_s, 1e-6))))
    t0 = time.perf_counter()
    for _ in range(timed):
        fn()
    common.synchronize(device)
    return (time.perf_counter() - t0) * 1e3 * calls / timed


def run(shape: common.Shape, device: torch.device, frames: int, cache_frames: int, backends: list[str],
        budget_s: float, seed: int = 0) -> tuple[dict, list[dict]]:
    """All rows of one run: the copy ceiling first, then every backend without and with proto."""
    calls = shape.layers * shape.passes
    x = make_inputs(shape, frames, cache_frames, device, seed)
    nbytes = bytes_per_call(shape, frames, False)
    src = torch.randn(nbytes // 2 // shape.torch_dtype.itemsize, device=device).to(shape.torch_dtype)
    dst = torch.empty_like(src)
    t = common.measure(lambda: dst.copy_(src), device, budget_s=budget_s)
    copy_gbps = nbytes / (t.ms * 1e-3) / 1e9
    rows = [{"row": "copy", "backend": "torch copy_", "proto": False, "bytes": nbytes, **t.as_dict(),
             "gbps": copy_gbps, "fraction_of_copy": 1.0, "chunk_calls": calls,
             "chunk_ms": chunk_ms(lambda: dst.copy_(src), device, calls, budget_s), "max_diff": None}]

    pristine = {name: t.clone() for name, t in x.items()}  # the timed calls below write into x
    refs = {}
    for with_proto in (False, True):
        ref = {name: t.clone() for name, t in pristine.items()}
        refs[with_proto] = (call(ref, shape, "reference", with_proto), ref)
    for name in backends:
        for with_proto in (False, True):
            row = {"row": f"{name}{' +proto' if with_proto else ''}", "proto": with_proto,
                   "bytes": bytes_per_call(shape, frames, with_proto), "chunk_calls": calls}
            try:
                row["backend"] = BACKENDS.resolve(device, name)
                mine = {key: t.clone() for key, t in pristine.items()}
                q_ref, ref = refs[with_proto]
                row["max_diff"] = max_diff(mine, ref, call(mine, shape, name, with_proto), q_ref)
                fn = lambda: call(x, shape, name, with_proto)  # noqa: E731
                t = common.measure(fn, device, budget_s=budget_s)
                row.update(t.as_dict(), gbps=row["bytes"] / (t.ms * 1e-3) / 1e9,
                           chunk_ms=chunk_ms(fn, device, calls, budget_s))
                row["fraction_of_copy"] = row["gbps"] / copy_gbps
            except (RuntimeError, ValueError) as exc:  # a backend this machine cannot run: say why
                row.update(backend=row.get("backend", name), skipped=f"{type(exc).__name__}: {exc}")
            rows.append(row)
    floor_us = nbytes / (ASSUMED_TBPS * 1e12) * 1e6
    targets = [{"goal": f"rope_append >= {TARGET_FRACTION:g} x the copy's GB/s", "row": r["row"],
                "backend": r["backend"], "fraction_of_copy": r["fraction_of_copy"],
                "met": r["fraction_of_copy"] >= TARGET_FRACTION}
               for r in rows if r["row"] in ("auto", "cuda") and "skipped" not in r]
    payload = {
        "benchmark": "rope_append", "shape": shape.name, "frames": frames, "cache_frames": cache_frames,
        "env": common.env_info(device),
        "floor": {"bytes_per_call": nbytes, "assumed_tbps": ASSUMED_TBPS, "floor_us": floor_us,
                  "label": "prediction computed before the run (bytes / assumed bandwidth), not a measurement"},
        "targets": targets,
    }
    if device.type != "cuda":
        payload["label"] = common.CPU_LABEL
    return payload, rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", choices=sorted(common.SHAPES), default="wan" if torch.cuda.is_available() else "tiny")
    ap.add_argument("--dtype", help="override the shape's dtype (e.g. float16)")
    ap.add_argument("--frames", type=int, default=3, help="frames per chunk (U)")
    ap.add_argument("--cache-frames", type=int, default=21, help="frame slots of the cache")
    ap.add_argument("--backends", default=",".join(BACKEND_NAMES))
    ap.add_argument("--budget-s", type=float, default=10.0, help="time budget per row")
    ap.add_argument("--out", type=Path, help="JSON path (CSV beside it); default benchmarks/results/")
    args = ap.parse_args(argv)
    device = common.default_device()
    shape = common.shape_from_args(args.shapes, dtype=args.dtype)
    nbytes = bytes_per_call(shape, args.frames, False)
    print(f"rope_append {shape.name} {shape.dtype}: {nbytes / 1e6:.1f} MB per call, floor "
          f"{nbytes / (ASSUMED_TBPS * 1e12) * 1e6:.1f} us at an assumed {ASSUMED_TBPS:g} TB/s (prediction)")
    payload, rows = run(shape, device, args.frames, args.cache_frames, args.backends.split(","), args.budget_s)
    out = args.out or common.default_out("rope_append", shape.name, device)
    json_path, csv_path = common.write_results(out, payload, rows)

    env = payload["env"]
    print(f"{env['device']} | torch {env['torch']} | triton {env['triton']}"
          + (f" | {common.CPU_LABEL}" if env["cpu_timing"] else ""))
    print(f"{'row':16} {'backend':12} {'ms':>9} {'GB/s':>8} {'of copy':>8} {'chunk ms':>9} {'max diff':>9}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['row']:16} {r['backend']:12} skipped: {r['skipped'][:80]}")
            continue
        print(f"{r['row']:16} {r['backend']:12} {common.fmt(r['ms'], 4):>9} {common.fmt(r['gbps'], 4):>8} "
              f"{common.fmt(r['fraction_of_copy']):>8} {common.fmt(r['chunk_ms'], 4):>9} "
              f"{common.fmt(r['max_diff']):>9}")
    for goal in payload["targets"]:
        print(f"target {goal['goal']}: {goal['row']} ({goal['backend']}) {goal['fraction_of_copy']:.2f} "
              f"{'met' if goal['met'] else 'NOT met'}" + (f" ({common.CPU_LABEL})" if env["cpu_timing"] else ""))
    print(f"wrote {json_path} and {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
