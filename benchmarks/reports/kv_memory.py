"""K/V memory with FP8 pools against bf16 pools, per policy, Wan2.1-1.3B and Wan-14B (the memory
table of docs/pages/guides/fp8-pools.md).

    python -m benchmarks kv_memory    # the table (markdown), computed here

Counted on meta-device caches (nothing is allocated) in the attention mode "auto" picks on CUDA (window; per_call for
FP8 pools of a dense window, see ``relaxkv_kernels.cache.modes.resolve_attention``), compute dtype bf16, batch 1,
480 x 832 video (30 x 52 tokens per latent frame), the models of ``benchmarks/reports/head_parallel.py``. "pools": the
K and V pools (FP8: e4m3 codes plus one fp32 scale per row and head, ``pool_bytes()``); "all":
``memory_bytes()``, which adds the prototypes, policy state, segment tables and the windows (bf16 either way);
"per_call": the same with one window shared by every layer (``attention="per_call"``, the memory-tight mode).

    python -m benchmarks kv_memory --host    # the GPU share with host pools (docs/pages/guides/host-pools.md)

With ``pool_device="cpu"`` the pools and their scales are host bytes (``host_bytes()``) and the GPU keeps the rest
(``device_bytes()``: windows, prototypes, policy state, tables), in the mode "auto" picks on CUDA for host pools.
"""
from __future__ import annotations

import sys

import torch

import relaxkv_kernels as rk
from benchmarks.reports.head_parallel import BATCH
from benchmarks.reports.head_parallel import MODELS
from benchmarks.reports.head_parallel import POLICIES
from benchmarks.reports.head_parallel import gib
from relaxkv_gen.rollout import make_policy
from relaxkv_kernels.cache.modes import resolve_attention

FP8 = torch.float8_e4m3fn
TARGET = 0.53  # pools + scales <= 0.53x the bf16 pools
HOST_TARGETS = {"Wan2.1-1.3B": 2.0 * 2**30, "Wan-14B": 8.5 * 2**30}  # a Relax cache's GPU bytes, host pools


def cuda_cache(model, policy: str, kv_dtype: torch.dtype | None, attention: str = "auto",
               pool_device=None) -> rk.KVCache:
    """The cache of ``policy`` in ``attention`` ("auto": the mode "auto" picks on CUDA), on meta tensors, with the
    pools on the device or (``pool_device="cpu"``) counted as host memory."""
    pol = make_policy(policy)
    attention = resolve_attention(attention, "auto", "cuda", staged=kv_dtype is not None or pool_device is not None,
                                  gathers=pol.planner(model.height, model.width).gathers)
    return rk.KVCache(pol, model.layers, BATCH, model.heads, model.head_dim, model.height, model.width,
                      dtype=torch.bfloat16, device="meta", attention=attention, kv_dtype=kv_dtype,
                      pool_device=pool_device)


def rows() -> list[tuple[str, str, int, int, int, int, int]]:
    """(model, policy, bf16 pools, FP8 pools + scales, bf16 all, FP8 all, FP8 all with per_call) in bytes."""
    out = []
    for model in MODELS:
        for policy in POLICIES:
            bf16, fp8 = cuda_cache(model, policy, None), cuda_cache(model, policy, FP8)
            out.append((model.name, policy, bf16.pool_bytes(), fp8.pool_bytes(), bf16.memory_bytes(),
                        fp8.memory_bytes(), cuda_cache(model, policy, FP8, "per_call").memory_bytes()))
    return out


def markdown() -> str:
    lines = ["| model | policy | pools bf16 (GiB) | pools FP8 + scales (GiB) | ratio | all bf16 (GiB) | "
             "all FP8 (GiB) | ratio | all FP8, per_call (GiB) | ratio |", "|---|---|" + "---:|" * 8]
    for name, policy, pb, pf, ab, af, ap in rows():
        lines.append(f"| {name} | {policy} | {gib(pb)} | {gib(pf)} | {pf / pb:.3f} | {gib(ab)} | {gib(af)} | "
                     f"{af / ab:.3f} | {gib(ap)} | {ap / ab:.3f} |")
    return "\n".join(lines) + "\n"


def host_rows() -> list[tuple[str, str, str, int, int, int, int]]:
    """(model, policy, mode, all on the GPU bf16, GPU with host pools bf16, host bf16, GPU with host pools FP8,
    host FP8) in bytes, the mode being what "auto" picks for host pools."""
    out = []
    for model in MODELS:
        for policy in POLICIES:
            device = cuda_cache(model, policy, None)
            bf16, fp8 = cuda_cache(model, policy, None, pool_device="cpu"), cuda_cache(model, policy, FP8,
                                                                                        pool_device="cpu")
            out.append((model.name, policy, bf16.attention, device.device_bytes(), bf16.device_bytes(),
                        bf16.host_bytes(), fp8.device_bytes(), fp8.host_bytes()))
    return out


def host_markdown() -> str:
    lines = ["| model | policy | mode | GPU, pools on the GPU, bf16 (GiB) | GPU, host pools, bf16 (GiB) | host, bf16 "
             "(GiB) | GPU, host pools, FP8 (GiB) | host, FP8 (GiB) |", "|---|---|---|" + "---:|" * 5]
    for name, policy, mode, *sizes in host_rows():
        lines.append(f"| {name} | {policy} | {mode} | " + " | ".join(gib(n) for n in sizes) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(host_markdown() if "--host" in sys.argv[1:] else markdown())
