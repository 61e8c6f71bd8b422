"""``relaxkv::sparse_kv_attention``: registration, fake, backend table, the argument checks and the public function.

``torch.ops.relaxkv.sparse_kv_attention`` is the public function's ``impl="fused"`` path with ``scale`` given,
then ``checked`` (see ``ops/checks.py``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..checks import check_devices
from ..checks import check_finite
from ..checks import check_qkv
from ..checks import check_seg
from ..checks import check_total
from ..checks import checks_in_fake
from ..dense_attention.op import dense_attention_op
from ..dense_attention.op import resolve_engine
from ..dispatch import OpBackends
from ..dispatch import inference_only
from ..fp8 import check_kv_pools
from ..fp8 import is_fp8
from ..gather_kv_rope.op import gather_kv_rope_into_op
from ..gather_kv_rope.op import gather_kv_rope_op
from .reference import sparse_kv_attention_ref

IMPLS = ("auto", "fused", "gather")


def _triton():
    from ..triton_attention import sparse_kv_attention_triton

    return sparse_kv_attention_triton


BACKENDS = OpBackends("sparse_kv_attention", reference=sparse_kv_attention_ref, triton=_triton)


def choose_impl(impl: str, device_type: str, total_known: bool = True) -> str:
    """``impl`` (one of ``IMPLS``), or for ``"auto"`` how attention over a segment table runs on a ``device_type``
    device: ``"gather"`` on CUDA when the keys per batch element are known on the host (``total_known``), else
    ``"fused"``. H100, 2026-11-27, bf16 pools: gather + cuDNN 103 ms against 145 ms fused per relax chunk (FP8 pools
    halve the bytes the gather reads, not measured). The one rule for the public op and the cache's attention modes
    (``cache.modes.resolve_attention``: ``"fused"`` is the segments mode)."""
    if impl not in IMPLS:
        raise ValueError(f"relaxkv.sparse_kv_attention: impl: expected one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "gather" if device_type == "cuda" and total_known else "fused"
    return impl


def _check(q, k_pool, v_pool, seg, scale, k_pool_scale=None, v_pool_scale=None) -> float:
    """The checks of :func:`sparse_kv_attention`'s tensors, pool format (FP8 scales) and scale (public function and
    registered op); returns the scale (D ** -0.5 for None)."""
    op = "relaxkv.sparse_kv_attention"
    check_devices(op, q=q, k_pool=k_pool, v_pool=v_pool, seg=seg)
    check_qkv(op, "q", q)
    check_kv_pools(op, "pool", k_pool, v_pool, k_pool_scale, v_pool_scale, q)
    check_seg(op, seg, q.shape[0], k_pool.shape[1])
    return q.shape[-1] ** -0.5 if scale is None else check_finite(op, "scale", scale)


@torch.library.custom_op("relaxkv::sparse_kv_attention", mutates_args=())
def sparse_kv_attention_op(q: Tensor, k_pool: Tensor, v_pool: Tensor, seg: Tensor, scale: float,
                           backend: str, k_pool_scale: Optional[Tensor] = None, v_pool_scale: Optional[Tensor] = None,
                           checked: bool = False) -> Tensor:
    return BACKENDS.run(q.device, backend, checked, _check, q, k_pool, v_pool, seg, scale, k_pool_scale,
                        v_pool_scale)


@sparse_kv_attention_op.register_fake
def sparse_kv_attention_fake(q, k_pool, v_pool, seg, scale, backend, k_pool_scale=None, v_pool_scale=None,
                             checked=False):
    if checks_in_fake(checked, q):
        _check(q, k_pool, v_pool, seg, scale, k_pool_scale, v_pool_scale)
    return q.new_empty(q.shape)


inference_only("relaxkv::sparse_kv_attention")


def sparse_kv_attention(q: Tensor, k_pool: Tensor, v_pool: Tensor, seg: Tensor, scale: float | None = None,
                        backend: str = "auto", k_pool_scale: Tensor | None = None,
                        v_pool_scale: Tensor | None = None, impl: str = "auto", total: int | None = None,
                        engine: str = "auto") -> Tensor:
    """Attention of q over the K/V rows listed by a device-side segment table, RoPE re-indexed on load.

    out[b] = softmax(q[b] K_b^T * scale) V_b per head, no mask, fp32 accumulation, where K_b concatenates, over the
    segments s = (start_s, len_s, delta_s) of ``seg[b]`` in table order, R_t(delta_s) k_pool[b, start_s : start_s +
    len_s] (R_t: the temporal RoPE pairs turned by delta_s frames; keys are stored rotated at their write-time
    positions), and V_b the same rows of v_pool. Segments of length 0 are skipped; a batch element with no key at all
    gets zeros. FP8 pools are read as their values ``code * scale`` (fp32, the scale of the row and head), then the
    same math.

    Args:
        q: [B, Nq, H, D] rotated queries (fp32 / fp16 / bf16, any strides).
        k_pool, v_pool: [B, n_rows, H, D], both in q's dtype or both float8_e4m3fn.
        seg: int32 [B, n_seg, 3] rows (start_row, length, delta); length 0 = unused entry. Rows inside the pools.
        scale: softmax scale, default D ** -0.5.
        backend: backend of the relaxkv ops that run (reference / triton / cuda / auto).
        k_pool_scale, v_pool_scale: float32 [B, n_rows, H], the per-row-and-head scales of FP8 pools (None for
            pools in q's dtype); see ``ops/fp8.py``.
        impl: "fused" (one segment-table kernel, no copy), "gather" (:func:`gather_kv_rope` into
            contiguous K/V in q's dtype, FP8 rows dequantized, then :func:`dense_attention` with ``engine``),
            or "auto": "gather" on CUDA when ``total`` is given outside torch.compile, else "fused"
            (:func:`choose_impl`).
        total: keys per batch element, sum of the table's lengths (host-known from the plan);
            required by "gather".
        engine: attention engine of "gather" (see :func:`dense_attention`).

    Returns:
        [B, Nq, H, D] in q.dtype.

    Example:
        >>> q, k_pool, v_pool = torch.randn(1, 16, 2, 32), torch.randn(1, 40, 2, 32), torch.randn(1, 40, 2, 32)
        >>> seg = torch.tensor([[[0, 16, -3], [20, 20, 0]]], dtype=torch.int32)  # rows 0-15 turned by -3, rows 20-39
        >>> sparse_kv_attention(q, k_pool, v_pool, seg).shape
        torch.Size([1, 16, 2, 32])
    """
    op = "relaxkv.sparse_kv_attention"
    scale = _check(q, k_pool, v_pool, seg, scale, k_pool_scale, v_pool_scale)
    impl = choose_impl(impl, q.device.type, total is not None and not torch.compiler.is_compiling())
    if total is not None:
        check_total(op, seg, total)
    elif impl == "gather":
        raise ValueError(f"{op}: total: required for impl='gather' (keys per batch element, sum of segment lengths)")
    if impl == "fused":
        return sparse_kv_attention_op(q, k_pool, v_pool, seg, scale, backend, k_pool_scale, v_pool_scale,
                                      checked=True)
    if is_fp8(k_pool):  # dequantized straight into q's dtype (gather_kv_rope would return fp32 rows)
        k, v = (torch.empty((q.shape[0], total, *q.shape[2:]), dtype=q.dtype, device=q.device) for _ in range(2))
        gather_kv_rope_into_op(k_pool, v_pool, seg, k, v, backend, k_pool_scale, v_pool_scale, checked=True)
    else:
        k, v = gather_kv_rope_op(k_pool, v_pool, seg, total, backend, checked=True)
    engine = resolve_engine(engine, q.device, q.dtype, q.shape[-1], q.shape[1], total)
    return dense_attention_op(q, k, v, scale, engine, checked=True)
