"""``relaxkv::gather_kv_rope`` (new tensors) and ``relaxkv::gather_kv_rope_into`` (given buffers).

``torch.ops.relaxkv.*`` takes the public arguments in order, then ``checked`` (see ``ops/checks.py``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..checks import check_devices
from ..checks import check_pool
from ..checks import check_qkv
from ..checks import check_seg
from ..checks import check_tensor
from ..checks import check_total
from ..checks import checks_in_fake
from ..dispatch import OpBackends
from ..dispatch import inference_only
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
           k_out: Tensor | None = None, v_out: Tensor | None = None) -> None:
    """The checks of :func:`gather_kv_rope` (``op`` _GATHER, with ``total``) and :func:`gather_kv_rope_into`
    (``op`` _INTO, with ``k_out`` and ``v_out``): public functions and registered ops."""
    out = {} if k_out is None else {"k_out": k_out, "v_out": v_out}
    check_devices(op, k_pool=k_pool, v_pool=v_pool, seg=seg, **out)
    check_qkv(op, "k_pool", k_pool)
    check_tensor(op, "v_pool", v_pool, shape=tuple(k_pool.shape), dtypes=(k_pool.dtype,))
    check_seg(op, seg, k_pool.shape[0], k_pool.shape[1])
    if out:
        check_pool(op, "k_out", k_out, k_pool)
        check_tensor(op, "v_out", v_out, shape=tuple(k_out.shape), dtypes=(k_pool.dtype,))
        total = k_out.shape[1]
    check_total(op, seg, total)


@torch.library.custom_op("relaxkv::gather_kv_rope_into", mutates_args=("k_out", "v_out"))
def gather_kv_rope_into_op(k_pool: Tensor, v_pool: Tensor, seg: Tensor, k_out: Tensor, v_out: Tensor,
                           backend: str, checked: bool = False) -> None:
    if not checked:
        _check(_INTO, k_pool, v_pool, seg, k_out=k_out, v_out=v_out)
    BACKENDS.implementation(k_pool.device, backend)(k_pool, v_pool, seg, k_out, v_out)


@gather_kv_rope_into_op.register_fake
def gather_kv_rope_into_fake(k_pool, v_pool, seg, k_out, v_out, backend, checked=False):
    if checks_in_fake(checked, k_pool):
        _check(_INTO, k_pool, v_pool, seg, k_out=k_out, v_out=v_out)


@torch.library.custom_op("relaxkv::gather_kv_rope", mutates_args=())
def gather_kv_rope_op(k_pool: Tensor, v_pool: Tensor, seg: Tensor, total: int, backend: str,
                      checked: bool = False) -> tuple[Tensor, Tensor]:
    if not checked:
        _check(_GATHER, k_pool, v_pool, seg, total)
    shape = (k_pool.shape[0], total, k_pool.shape[2], k_pool.shape[3])
    k = torch.empty(shape, dtype=k_pool.dtype, device=k_pool.device)
    v = torch.empty(shape, dtype=k_pool.dtype, device=k_pool.device)
    BACKENDS.implementation(k_pool.device, backend)(k_pool, v_pool, seg, k, v)
    return k, v


@gather_kv_rope_op.register_fake
def gather_kv_rope_fake(k_pool, v_pool, seg, total, backend, checked=False):
    if checks_in_fake(checked, k_pool):
        _check(_GATHER, k_pool, v_pool, seg, total)
    shape = (k_pool.shape[0], total, k_pool.shape[2], k_pool.shape[3])
    return k_pool.new_empty(shape), v_pool.new_empty(shape)


inference_only("relaxkv::gather_kv_rope")


def gather_kv_rope(k_pool: Tensor, v_pool: Tensor, seg: Tensor, total: int,
                   backend: str = "auto") -> tuple[Tensor, Tensor]:
    """K (temporal delta-rotated) and V of a segment table, gathered into contiguous tensors.

    k[b] = concat over segments s of R_t(delta_s) k_pool[b, start_s : start_s + len_s], v[b] likewise
    without rotation; zero-length segments skipped.

    Args:
        k_pool, v_pool: [B, n_rows, H, D], same dtype. seg: int32 [B, n_seg, 3] (start_row, length, delta).
        total: rows per batch element = sum of the lengths of every batch element (host-known from
            the plan; checked here for CPU tables, not for device tables: that would synchronise).

    Returns:
        (k, v): [B, total, H, D] each, contiguous, dtype of the pools.

    Example:
        >>> k, v = gather_kv_rope(k_pool, v_pool, seg, total=10920)
    """
    _check(_GATHER, k_pool, v_pool, seg, total)
    return torch.ops.relaxkv.gather_kv_rope(k_pool, v_pool, seg, total, backend, checked=True)


def gather_kv_rope_into(k_pool: Tensor, v_pool: Tensor, seg: Tensor, k_out: Tensor, v_out: Tensor,
                        backend: str = "auto") -> None:
    """:func:`gather_kv_rope` written into given buffers (e.g. the memory part of an attention window).

    Args:
        k_pool, v_pool, seg: as for :func:`gather_kv_rope`.
        k_out, v_out: [B, total, H, D] of the pools' dtype, total = sum of the lengths; rows contiguous
            within a batch element (a slice ``window[:, a:b]`` of a contiguous buffer), written in place.
    """
    _check(_INTO, k_pool, v_pool, seg, k_out=k_out, v_out=v_out)
    torch.ops.relaxkv.gather_kv_rope_into(k_pool, v_pool, seg, k_out, v_out, backend, checked=True)
