"""gather_kv_rope through the CUDA extension (kernel: csrc/gather_kv_rope.cuh, launcher: csrc/gather_kv_rope.cu)."""
from __future__ import annotations

import torch

from ..checks import require
from ..cuda_common import Launch
from ..cuda_common import rows
from ..cuda_common import scales
from ..cuda_common import unit_last_stride

_OP = "gather_kv_rope_cuda"


def gather_kv_rope_cuda(k_pool: torch.Tensor, v_pool: torch.Tensor, seg: torch.Tensor, k_out: torch.Tensor,
                        v_out: torch.Tensor, k_pool_scale: torch.Tensor | None = None,
                        v_pool_scale: torch.Tensor | None = None) -> None:
    """Contract: :func:`relaxkv_kernels.ops.gather_kv_rope_into` (one launch, no host synchronisation).

    R_t's angle ``delta * inv_freq`` in fp64, reduced to [-pi, pi] there, then sincosf, once per output row, reused by
    every head; FP8 values rotated in fp32 and rounded once to the outputs' dtype. 16-byte loads and stores when the
    pools and outputs allow them (FP8: 16 codes per load, head_dim a multiple of 16). Each block scans the table's
    lengths in shared memory; rows the table does not cover come out NaN, and nothing is read or written out of bounds.
    Pools: any strides (rows of unit stride are read in place; others are copied first). Outputs: rows contiguous
    within a batch element (a slice of a longer buffer along dim 1 is fine), the same strides for both.

    Example:
        >>> kp = torch.randn(1, 8 * 1560, 12, 128, device="cuda", dtype=torch.bfloat16)  # doctest: +SKIP
        >>> seg = torch.tensor([[[0, 1560, 4], [3120, 3120, 0]]], dtype=torch.int32, device="cuda")
        >>> k, v = torch.empty(1, 4680, 12, 128, device="cuda", dtype=torch.bfloat16), torch.empty_like(k)
        >>> gather_kv_rope_cuda(kp, kp, seg, k, v)
    """
    b, n_rows, h, d = k_pool.shape
    total = k_out.shape[1]
    for name, t in (("k_out", k_out), ("v_out", v_out)):
        require(f"relaxkv {_OP}", t.stride()[1:] == (h * d, d, 1) and t.stride(0) == k_out.stride(0),
                f"{name}: expected rows contiguous within a batch element, strides (*, {h * d}, {d}, 1) equal for "
                f"k_out and v_out, got {t.stride()}")
    k_pool, v_pool = unit_last_stride(k_pool), unit_last_stride(v_pool)
    launch = Launch(_OP, k_pool.device)
    with launch as (ext, stream):
        ext.gather_kv_rope_cuda(
            *rows(k_pool), *rows(v_pool), *scales(k_pool_scale), *scales(v_pool_scale), seg.data_ptr(), seg.stride(),
            k_out.data_ptr(), v_out.data_ptr(), k_out.stride(0), b, n_rows, h, d, seg.shape[1], total,
            launch.code(k_out.dtype), stream,
        )
