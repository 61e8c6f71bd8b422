"""``relaxkv::gather_kv_rope`` (new tensors) and ``relaxkv::gather_kv_rope_into`` (given buffers).

``torch.ops.relaxkv.*`` takes the public arguments in order, then ``checked`` (see ``ops/checks.py``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..checks import FLOAT_DTYPES
from ..checks import check_devices
from ..checks import check_head_dim
from ..checks import check_seg
from ..checks import check_tensor
from ..checks import check_total
from ..checks import checks_in_fake
from ..dispatch import OpBackends
from ..dispatch import inference_only
from ..fp8 import FP8_DTYPES
from ..fp8 import check_kv_pools
from ..fp8 import is_fp8
from .cuda import gather_kv_rope_cuda
from .reference import gather_kv_rope_into_ref


def _triton():
    from .triton import gather_kv_rope_triton

    return gather_kv_rope_triton


# auto: the CUDA kernel (16-byte accesses, ~2.1 TB/s on an H100, 2026-11-27) where the extension is built
BACKENDS = OpBackends("gather_kv_rope", reference=gather_kv_rope_into_ref, triton=_triton, cuda=gather_kv_rope_cuda,
                      auto=("cuda", "triton"))


_GATHER, _INTO = "relaxkv.gather_kv_rope", "relaxkv.gather_kv_rope_into"


def _check(op: str, k_pool: Tensor, v_pool: Tensor, seg: Tensor, total: int | None = None,
           k_out: Tensor | None = None, v_out: Tensor | None = None, k_pool_scale: Tensor | None = None,
           v_pool_scale: Tensor | None = None) -> None:
    """The checks of :func:`gather_kv_rope` (``op`` _GATHER, with ``total``) and :func:`gather_kv_rope_into`
    (``op`` _INTO, with ``k_out`` and ``v_out``): public functions and registered ops."""
    out = {} if k_out is None else {"k_out": k_out, "v_out": v_out}
    check_devices(op, k_pool=k_pool, v_pool=v_pool, seg=seg, **out)
    check_tensor(op, "k_pool", k_pool, shape=(None, None, None, None), dtypes=(*FLOAT_DTYPES, *FP8_DTYPES))
    check_head_dim(op, "k_pool", k_pool.shape[-1])
    check_kv_pools(op, "pool", k_pool, v_pool, k_pool_scale, v_pool_scale, k_pool)
    check_seg(op, seg, k_pool.shape[0], k_pool.shape[1])
    if out:
        b, _, h, d = k_pool.shape
        check_tensor(op, "k_out", k_out, shape=(b, None, h, d),
                     dtypes=FLOAT_DTYPES if is_fp8(k_pool) else (k_pool.dtype,))
        check_tensor(op, "v_out", v_out, shape=tuple(k_out.shape), dtypes=(k_out.dtype,))
        total = k_out.shape[1]
    check_total(op, seg, total)


def _gather_dtype(k_pool: Tensor) -> torch.dtype:
    """dtype of :func:`gather_kv_rope`'s new tensors: the pools', float32 for FP8 pools (the dequantized rows)."""
    return torch.float32 if is_fp8(k_pool) else k_pool.dtype


@torch.library.custom_op("relaxkv::gather_kv_rope_into", mutates_args=("k_out", "v_out"))
def gather_kv_rope_into_op(k_pool: Tensor, v_pool: Tensor, seg: Tensor, k_out: Tensor, v_out: Tensor,
                           backend: str, k_pool_scale: Optional[Tensor] = None, v_pool_scale: Optional[Tensor] = None,
                           checked: bool = False) -> None:
    if not checked:
        _check(_INTO, k_pool, v_pool, seg, k_out=k_out, v_out=v_out, k_pool_scale=k_pool_scale,
               v_pool_scale=v_pool_scale)
    BACKENDS.implementation(k_pool.device, backend)(k_pool, v_pool, seg, k_out, v_out, k_pool_scale, v_pool_scale)


@gather_kv_rope_into_op.register_fake
def gather_kv_rope_into_fake(k_pool, v_pool, seg, k_out, v_out, backend, k_pool_scale=None, v_pool_scale=None,
                             checked=False):
    if checks_in_fake(checked, k_pool):
        _check(_INTO, k_pool, v_pool, seg, k_out=k_out, v_out=v_out, k_pool_scale=k_pool_scale,
               v_pool_scale=v_pool_scale)


@torch.library.custom_op("relaxkv::gather_kv_rope", mutates_args=())
def gather_kv_rope_op(k_pool: Tensor, v_pool: Tensor, seg: Tensor, total: int, backend: str,
                      k_pool_scale: Optional[Tensor] = None, v_pool_scale: Optional[Tensor] = None,
                      checked: bool = False) -> tuple[Tensor, Tensor]:
    if not checked:
        _check(_GATHER, k_pool, v_pool, seg, total, k_pool_scale=k_pool_scale, v_pool_scale=v_pool_scale)
    shape = (k_pool.shape[0], total, k_pool.shape[2], k_pool.shape[3])
    k = torch.empty(shape, dtype=_gather_dtype(k_pool), device=k_pool.device)
    v = torch.empty(shape, dtype=_gather_dtype(k_pool), device=k_pool.device)
    BACKENDS.implementation(k_pool.device, backend)(k_pool, v_pool, seg, k, v, k_pool_scale, v_pool_scale)
    return k, v


@gather_kv_rope_op.register_fake
def gather_kv_rope_fake(k_pool, v_pool, seg, total, backend, k_pool_scale=None, v_pool_scale=None, checked=False):
    if checks_in_fake(checked, k_pool):
        _check(_GATHER, k_pool, v_pool, seg, total, k_pool_scale=k_pool_scale, v_pool_scale=v_pool_scale)
    shape = (k_pool.shape[0], total, k_pool.shape[2], k_pool.shape[3])
    return k_pool.new_empty(shape, dtype=_gather_dtype(k_pool)), v_pool.new_empty(shape, dtype=_gather_dtype(k_pool))


inference_only("relaxkv::gather_kv_rope")


def gather_kv_rope(k_pool: Tensor, v_pool: Tensor, seg: Tensor, total: int, backend: str = "auto",
                   k_pool_scale: Tensor | None = None, v_pool_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """K (temporal delta-rotated) and V of a segment table, gathered into contiguous tensors.

    k[b] = concat over the segments s = (start_s, len_s, delta_s) of ``seg[b]``, in table order, of
    R_t(delta_s) k_pool[b, start_s : start_s + len_s], v[b] likewise without rotation. Keys are stored rotated at
    their write-time positions; R_t turns their temporal RoPE pairs by delta_s frames. A segment of length 0 is an
    unused entry (fixed table shapes for CUDA graphs), skipped. FP8 pools are read as their values
    ``code * scale`` (fp32, the scale of the row and head; ``ops/fp8.py``), then the same math.

    Args:
        k_pool, v_pool: [B, n_rows, H, D], same dtype: fp32 / fp16 / bf16, or float8_e4m3fn with scales.
        seg: int32 [B, n_seg, 3] (start_row, length, delta).
        total: rows per batch element = sum of the lengths of every batch element (host-known from
            the plan; checked here for CPU tables, not for device tables: that would synchronise).
        backend: reference / triton / cuda / auto.
        k_pool_scale, v_pool_scale: float32 [B, n_rows, H], the per-row-and-head scales of FP8 pools; None
            for pools in a compute dtype.

    Returns:
        (k, v): [B, total, H, D] each, contiguous, dtype of the pools; float32 for FP8 pools (the
        dequantized rows: callers wanting bf16 use :func:`gather_kv_rope_into` with bf16 buffers).

    Example:
        >>> k, v = gather_kv_rope(k_pool, v_pool, seg, total=10920)
    """
    _check(_GATHER, k_pool, v_pool, seg, total, k_pool_scale=k_pool_scale, v_pool_scale=v_pool_scale)
    return torch.ops.relaxkv.gather_kv_rope(k_pool, v_pool, seg, total, backend, k_pool_scale, v_pool_scale,
                                            checked=True)


def gather_kv_rope_into(k_pool: Tensor, v_pool: Tensor, seg: Tensor, k_out: Tensor, v_out: Tensor,
                        backend: str = "auto", k_pool_scale: Tensor | None = None,
                        v_pool_scale: Tensor | None = None) -> None:
    """:func:`gather_kv_rope` written into given buffers (e.g. the memory part of an attention window).

    Args:
        k_pool, v_pool, seg, backend, k_pool_scale, v_pool_scale: as for :func:`gather_kv_rope`.
        k_out, v_out: [B, total, H, D], total = sum of the lengths; rows contiguous within a batch element (a
            slice ``window[:, a:b]`` of a contiguous buffer), written in place. Same dtype for both: the
            pools' for pools in a compute dtype; any of fp32 / fp16 / bf16 for FP8 pools (the dequantized,
            rotated rows rounded once to it: how the cache stages FP8 memory into a bf16 window).
    """
    _check(_INTO, k_pool, v_pool, seg, k_out=k_out, v_out=v_out, k_pool_scale=k_pool_scale,
           v_pool_scale=v_pool_scale)
    torch.ops.relaxkv.gather_kv_rope_into(k_pool, v_pool, seg, k_out, v_out, backend, k_pool_scale, v_pool_scale,
                                          checked=True)
