"""Attention engines for contiguous K/V: torch SDPA backends, flash-attn (optional), our Triton kernel.

Each engine takes q [B, Nq, H, D], k, v [B, Nk, H, D] (unit last stride) and a scale, and returns a
contiguous [B, Nq, H, D] in q's dtype (the fake says so; SDPA keeps q's [B, N, H, D] layout, so this is
no copy there, and the output projection needs it contiguous anyway). Which one is fastest depends on the device
and the shape: ``tuning.json`` records it per device from ``python -m benchmarks chunk``; nothing here prefers one
by default.

    sdpa             torch's own dispatch order
    sdpa_cudnn       SDPA, cuDNN backend first (flash, efficient, math after it if cuDNN refuses the inputs)
    sdpa_flash       SDPA, flash backend (FA2) first, then cuDNN, efficient, math
    sdpa_efficient   SDPA, memory-efficient backend first, then flash, cuDNN, math
    flash_attn       ``flash_attn.flash_attn_func`` (flash-attn 2.x), where installed
    flash_attn_cute  ``flash_attn.cute.flash_attn_func`` (flash-attn 4, CuTe DSL, SM90+), where installed
    triton           ``sparse_kv_attention``'s Triton kernel over one segment covering every key
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
from collections.abc import Callable

import torch
from torch.nn.attention import SDPBackend
from torch.nn.attention import sdpa_kernel

_SDPA_ORDERS = {
    "sdpa_cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                   SDPBackend.MATH],
    "sdpa_flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                   SDPBackend.MATH],
    "sdpa_efficient": [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                       SDPBackend.MATH],
}
ENGINES = ("reference", "sdpa", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "flash_attn", "flash_attn_cute", "triton")
# engine -> module with flash_attn_func
_FLASH_ATTN = {"flash_attn": "flash_attn", "flash_attn_cute": "flash_attn.cute"}


_SETTLED: set[str] = set()  # device types whose SDPA backend order torch has settled in this process


def _settle_torch_priority(qt: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor, scale: float) -> None:
    """Let torch settle its own SDPA backend order on this device type before a priority context first saves it.

    torch reorders its CUDA backends (cuDNN first on recent GPUs) lazily, inside the first SDPA dispatch of the
    process; ``sdpa_kernel(..., set_priority=True)`` saves and restores the order without that step, so a
    priority context entered first would restore the unsettled order for every later default-dispatch SDPA
    of the process (the model's cross-attention, the user's code). One dispatch decision on these inputs
    settles it: host work only, no kernel (safe inside a CUDA-graph capture).
    """
    if qt.device.type not in _SETTLED:
        torch._fused_sdp_choice(qt, kt, vt, scale=scale)
        _SETTLED.add(qt.device.type)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, order=None) -> torch.Tensor:
    """SDPA on [B, N, H, D] views (transposed, no copy); ``order``: backend priority, None = torch's dispatch."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if order is not None:
        _settle_torch_priority(qt, kt, vt, scale)
    with sdpa_kernel(order, set_priority=True) if order is not None else contextlib.nullcontext():
        out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, scale=scale)
    return out.transpose(1, 2).contiguous()


@functools.cache
def flash_attn_func(engine: str) -> Callable | None:
    """The ``flash_attn_func`` of a flash-attn engine, or None when that package is not installed."""
    module = _FLASH_ATTN[engine]
    if importlib.util.find_spec(module.split(".")[0]) is None:
        return None
    try:
        return getattr(importlib.import_module(module), "flash_attn_func", None)
    except ImportError:  # flash-attn-4 installs flash_attn.cute without the 2.x kernels, and vice versa
        return None


def flash_attn(engine: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    out = flash_attn_func(engine)(q, k, v, softmax_scale=scale)
    return (out[0] if isinstance(out, tuple) else out).contiguous()  # flash-attn 4 returns (out, lse)


def triton_engine(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    from ..triton_attention import require_head_dim
    from ..triton_attention import sparse_kv_attention_triton

    require_head_dim("relaxkv.dense_attention", q)
    seg = torch.zeros(q.shape[0], 1, 3, dtype=torch.int32, device=q.device)
    seg[..., 1] = k.shape[1]  # one segment: every key, delta 0 (device-side fill: no host copy, capturable)
    return sparse_kv_attention_triton(q, k, v, seg, scale)


def available(engine: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``engine`` can run on ``device`` for ``dtype`` here (packages installed, device kind, dtype)."""
    if engine in ("reference", "sdpa"):
        return True
    if engine in _SDPA_ORDERS:
        return device.type == "cuda"
    if engine in _FLASH_ATTN:
        return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
                and flash_attn_func(engine) is not None)
    if engine == "triton":
        from ...availability import interpreter_enabled
        from ...availability import triton_available

        return triton_available() and (device.type == "cuda" or interpreter_enabled())
    return False


def run(engine: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention with ``engine`` (one of ``ENGINES`` but ``reference``)."""
    if engine == "sdpa":
        return sdpa(q, k, v, scale)
    if engine in _SDPA_ORDERS:
        return sdpa(q, k, v, scale, _SDPA_ORDERS[engine])
    if engine in _FLASH_ATTN:
        return flash_attn(engine, q, k, v, scale)
    return triton_engine(q, k, v, scale)
