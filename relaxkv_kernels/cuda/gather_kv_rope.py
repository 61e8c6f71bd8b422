"""gather_kv_rope through the CUDA extension (kernel: csrc/gather_kv_rope.cuh, launcher: csrc/gather_kv_rope.cu)."""
from __future__ import annotations

import torch

from ._launch import DTYPE_CODES, check, check_cuda_tensors, device_guard, require_device, stream, unit_last_stride

_OP = "gather_kv_rope_cuda"


def gather_kv_rope_cuda(
    k_pool: torch.Tensor, v_pool: torch.Tensor, seg: torch.Tensor, total: int
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""K (temporal delta-rotated) and V of every segment, concatenated into contiguous tensors: one launch.

    For batch element b, segments s = (start, length, delta) of ``seg[b]`` in table order
    (length 0 skipped):

        k[b] = cat_s R_t(delta_s) k_pool[b, start_s : start_s + length_s]
        v[b] = cat_s v_pool[b, start_s : start_s + length_s]

    R_t rotates the temporal RoPE pairs only (fp32 angle delta * inv_freq, sincosf once per output
    row, reused by every head). 16-byte loads and stores when the pools allow them. The table stays
    on the device: each block scans its lengths in shared memory (no host sync). ``total`` must equal
    sum(length) of every batch element (host-known from the plan; checked for CPU tables by the
    public op): rows the table does not cover come out as NaN, and nothing is read or written out of
    bounds.

    Args:
        k_pool, v_pool: [B, n_rows, H, D] (fp16 / bf16 / fp32, same dtype), any strides (rows of unit stride
            are read in place; others are copied first).
        seg: int32 [B, n_seg, 3] segment table (start_row, length, delta).
        total: number of gathered rows per batch element, >= 1.

    Returns:
        (k, v): [B, total, H, D] each, contiguous, dtype of the pools.

    Example:
        >>> kp = torch.randn(1, 8 * 1560, 12, 128, device="cuda", dtype=torch.bfloat16)  # doctest: +SKIP
        >>> seg = torch.tensor([[[0, 1560, 4], [3120, 3120, 0]]], dtype=torch.int32, device="cuda")
        >>> k, v = gather_kv_rope_cuda(kp, kp, seg, 4680)
    """
    ext = require_device(_OP)
    check(_OP, k_pool.dim() == 4 and k_pool.dtype in DTYPE_CODES,
          f"k_pool: expected float [B, n_rows, H, D], got {k_pool.dtype} {tuple(k_pool.shape)}")
    b, n_rows, h, d = k_pool.shape
    dev = k_pool.device
    check_cuda_tensors(_OP, dev, k_pool=k_pool, v_pool=v_pool, seg=seg)
    check(_OP, v_pool.shape == k_pool.shape and v_pool.dtype == k_pool.dtype,
          f"v_pool: expected {k_pool.dtype} {tuple(k_pool.shape)}, got {v_pool.dtype} {tuple(v_pool.shape)}")
    k_pool, v_pool = unit_last_stride(k_pool), unit_last_stride(v_pool)
    check(_OP, seg.dim() == 3 and seg.shape[0] == b and seg.shape[2] == 3 and seg.dtype == torch.int32,
          f"seg: expected int32 [{b}, n_seg, 3], got {seg.dtype} {tuple(seg.shape)}")
    check(_OP, isinstance(total, int) and total >= 1, f"total: expected an int >= 1, got {total!r}")
    k = torch.empty((b, total, h, d), dtype=k_pool.dtype, device=dev)
    v = torch.empty((b, total, h, d), dtype=k_pool.dtype, device=dev)
    with device_guard(dev):
        ext.gather_kv_rope_cuda(
            k_pool.data_ptr(), v_pool.data_ptr(), seg.data_ptr(), k.data_ptr(), v.data_ptr(), b, n_rows, h, d,
            seg.shape[1], total, *k_pool.stride()[:3], *v_pool.stride()[:3], *seg.stride(),
            DTYPE_CODES[k_pool.dtype], stream(dev),
        )
    return k, v
