"""K/V memory with FP8 pools against bf16 pools, per policy, Wan2.1-1.3B and Wan-14B: the README's FP8 table.

    python benchmarks/kv_memory.py    # the table (markdown), computed here

Counted on meta-device caches (nothing is allocated) in the attention mode "auto" picks on CUDA (window; per_call for
FP8 pools of a dense window, see ``relaxkv_kernels.cache.modes.resolve_attention``), compute dtype bf16, batch 1,
480 x 832 video (30 x 52 tokens per latent frame), the models of ``benchmarks/head_parallel.py``. "pools": the
K and V pools (FP8: e4m3 codes plus one fp32 scale per row and head, ``pool_bytes()``); "all":
``memory_bytes()``, which adds the prototypes, policy state, segment tables and the windows (bf16 either way);
"per_call": the same with one window shared by every layer (``attention="per_call"``, the memory-tight mode).
"""
from __future__ import annotations

import sys

import torch

import relaxkv_kernels as rk
from relaxkv_gen.rollout import make_policy
from relaxkv_kernels.cache.modes import resolve_attention

from head_parallel import BATCH
from head_parallel import MODELS
from head_parallel import POLICIES
from head_parallel import gib

FP8 = torch.float8_e4m3fn
TARGET = 0.53  # issue 17: pools + scales <= 0.53x the bf16 pools


def cuda_cache(model, policy: str, kv_dtype: torch.dtype | None, attention: str = "auto") -> rk.KVCache:
    """The cache of ``policy`` in ``attention`` ("auto": the mode "auto" picks on CUDA), on meta tensors."""
    pol = make_policy(policy)
    attention = resolve_attention(attention, "auto", "cuda", staged=kv_dtype is not None,
                                  gathers=pol.planner(model.height, model.width).gathers)
    return rk.KVCache(pol, model.layers, BATCH, model.heads, model.head_dim, model.height, model.width,
                      dtype=torch.bfloat16, device="meta", attention=attention, kv_dtype=kv_dtype)


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


if __name__ == "__main__":
    sys.stdout.write(markdown())
