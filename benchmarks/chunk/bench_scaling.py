"""Time per chunk and KV memory vs video length, for every memory policy, through KVCache rollouts.

    python -m benchmarks scaling --shapes wan --seconds 10,30,60,120 --layers 2    # on a GPU
    python -m benchmarks scaling --shapes tiny --seconds 2,4,8                     # CPU smoke

Seconds of 16 fps video -> latent frames = 4 * seconds -> chunks (3 frames; Pack: 4-frame blocks).
For each length and policy a fresh ``KVCache`` rolls the whole video out with random q/k/v
(``begin_chunk`` / ``attend`` for every pass and layer / ``end_chunk``); each chunk's attend calls are
timed. Policies:

    dense     dense, growing: every earlier frame is attended (window = the whole video)
    dense21   dense, capped window of 21 frames (Self-Forcing)
    relax     Relax Forcing (7 frames attended)
    pack      PackForcing (27,872 tokens attended at Wan shapes, bounded archive)

Reported per (policy, length): ms per chunk (median of the last ``--tail-chunks`` chunks: the cost at
that video length), mean ms per chunk over the rollout, the cache's allocated KV bytes in this run
(``KVCache.memory_bytes``) and, computed from tensor shapes on the meta device (no allocation), the KV
bytes of the full 30-layer Wan2.1 bf16 model. ``--layers`` is small by default so long dense videos fit.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time
from pathlib import Path

from benchmarks import common

common.configure_triton()

import torch  # noqa: E402

from relaxkv_kernels import DenseWindow  # noqa: E402
from relaxkv_kernels import KVCache  # noqa: E402
from relaxkv_kernels import PackMemory  # noqa: E402
from relaxkv_kernels import RelaxMemory  # noqa: E402

POLICIES = ("dense", "dense21", "relax", "pack")
LATENT_FRAMES_PER_SECOND = 4  # 16 fps video, 4 video frames per latent frame


def make_policy(name: str, frames: int):
    if name == "dense":
        return DenseWindow(window=max(21, 3 * math.ceil(frames / 3)))
    if name == "dense21":
        return DenseWindow(window=21)
    if name == "relax":
        return RelaxMemory()
    if name == "pack":
        return PackMemory()
    raise ValueError(f"policy: expected one of {POLICIES}, got {name!r}")


def wan_kv_bytes(policy) -> int:
    """KV bytes of a 30-layer Wan2.1 bf16 cache under ``policy``: tensor shapes on the meta device, nothing
    allocated."""
    s = common.SHAPES["wan"]
    cache = KVCache(policy, s.layers, s.batch, s.heads, s.head_dim, s.height, s.width, torch.bfloat16, "meta",
                    backend="reference")
    return cache.memory_bytes()


def rollout(policy_name: str, seconds: float, shape: common.Shape, device: torch.device, backend: str,
            tail_chunks: int, seed: int) -> dict:
    """Roll one video out through a fresh KVCache; per-chunk times of the attend calls."""
    frames = int(round(seconds * LATENT_FRAMES_PER_SECOND))
    policy = make_policy(policy_name, frames)
    u = policy.chunk_frames
    n_chunks = max(1, math.ceil(frames / u))
    s = shape
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cache = KVCache(policy, s.layers, s.batch, s.heads, s.head_dim, s.height, s.width, s.torch_dtype, device,
                    backend=backend)
    gen = torch.Generator(device=device).manual_seed(seed)
    n_tok = u * s.frame_tokens
    chunk_ms, plan_ms = [], []
    for _ in range(n_chunks):
        q, k, v = (torch.randn(s.batch, n_tok, s.heads, s.head_dim, generator=gen, device=device).to(s.torch_dtype)
                   for _ in range(3))
        t0 = time.perf_counter()
        cache.begin_chunk()
        common.synchronize(device)
        t1 = time.perf_counter()
        for _ in range(s.passes):
            for layer in range(s.layers):
                cache.attend(layer, q, k, v)
        common.synchronize(device)
        t2 = time.perf_counter()
        cache.end_chunk()
        plan_ms.append((t1 - t0) * 1e3)
        chunk_ms.append((t2 - t1) * 1e3)
    tail = chunk_ms[-tail_chunks:]
    out = {
        "policy": policy_name, "seconds": seconds, "latent_frames": frames, "chunks": n_chunks,
        "chunk_frames": u, "ms_per_chunk": statistics.median(tail), "last_chunk_ms": chunk_ms[-1],
        "mean_ms_per_chunk": statistics.fmean(chunk_ms), "plan_ms_mean": statistics.fmean(plan_ms),
        "kv_bytes": cache.memory_bytes(), "kv_gib": cache.memory_bytes() / 2**30,
        "wan30_kv_gib_computed": wan_kv_bytes(policy) / 2**30,
        "attended_tokens_last_chunk": int(cache.plan_buffers.seg[0, 0, :, 1].sum()),
        "cpu_timing": device.type != "cuda", "status": "ok", "chunk_ms": chunk_ms,
    }
    if device.type == "cuda":
        out["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", choices=sorted(common.SHAPES), default="tiny")
    p.add_argument("--seconds", default=None, help="video lengths in seconds (default: 10,30,60,120 wan; 2,4,8 tiny)")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--layers", type=int, default=2, help="layers in the rollout (memory scales with it)")
    p.add_argument("--passes", type=int, help="passes per chunk (default: the shape's)")
    p.add_argument("--dtype", help="override the shape's dtype")
    p.add_argument("--backend", default="auto", help="KVCache backend: reference, fused, auto, triton, cuda")
    p.add_argument("--tail-chunks", type=int, default=3, help="ms per chunk = median of this many last chunks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="JSON path (PNG and CSV beside it); "
                                 "default benchmarks/results/scaling_<shapes>_<device>.json")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    from tqdm import tqdm  # noqa: PLC0415

    from benchmarks.plots import plot_results  # noqa: PLC0415

    args = parse_args(argv)
    device = common.default_device()
    shape = common.shape_from_args(args.shapes, args.layers, args.passes, args.dtype)
    seconds = [float(x) for x in (args.seconds or ("10,30,60,120" if args.shapes == "wan" else "2,4,8")).split(",")]
    env = common.env_info(device)
    rows = []
    jobs = [(p, sec) for p in args.policies.split(",") if p for sec in seconds]
    for policy, sec in tqdm(jobs, desc="scaling", disable=args.no_progress, leave=False):
        try:
            rows.append(rollout(policy, sec, shape, device, args.backend, args.tail_chunks, args.seed))
        except torch.OutOfMemoryError as exc:
            rows.append({"policy": policy, "seconds": sec, "status": f"oom: {str(exc).splitlines()[0][:160]}",
                         "cpu_timing": device.type != "cuda"})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    payload = {"kind": "scaling", "env": env, "shape": dataclasses.asdict(shape), "backend": args.backend,
               "latent_frames_per_second": LATENT_FRAMES_PER_SECOND, "args": vars(args)}
    out = Path(args.out) if args.out else common.default_out("scaling", shape.name, device)
    json_path, csv_path = common.write_results(out, payload, rows)
    result = dict(payload, rows=rows, json=str(json_path), csv=str(csv_path))
    if not args.no_plot:
        result["png"] = str(plot_results.plot_scaling(result, json_path.with_suffix(".png")))
    note = f" -- {common.CPU_LABEL}" if env["cpu_timing"] else ""
    print(f"\nscaling on {env['device']}, {shape.name} shapes, {shape.layers} layers x {shape.passes} passes{note}")
    print(f"{'policy':8} {'seconds':>7} {'chunks':>6} {'ms/chunk':>9} {'KV GiB (run)':>12} "
          f"{'KV GiB (Wan 30L, computed)':>27}  status")
    for r in rows:
        print(f"{r['policy']:8} {common.fmt(r['seconds']):>7} {common.fmt(r.get('chunks')):>6} "
              f"{common.fmt(r.get('ms_per_chunk')):>9} {common.fmt(r.get('kv_gib')):>12} "
              f"{common.fmt(r.get('wan30_kv_gib_computed')):>27}  {r['status']}")
    print(f"wrote {json_path}, {csv_path}" + (f", {result['png']}" if "png" in result else ""))
    return result


if __name__ == "__main__":
    main()
