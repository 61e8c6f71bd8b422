"""gather_kv_rope reference (contract: ``relaxkv_kernels.ops.gather_kv_rope``): float64 RoPE math, FP8 pools
dequantized first (``ops/fp8.py``)."""
from __future__ import annotations

import torch

from ...geometry import apply_delta_rope
from ..fp8 import pool_values


def gather_segments_ref(k_pool: torch.Tensor, v_pool: torch.Tensor, seg_b: torch.Tensor,
                        k_scale: torch.Tensor | None = None,
                        v_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """K (delta-rotated) and V of one batch element's segments, in table order.

    Args:
        k_pool, v_pool: [n_rows, H, D] of one batch element.
        seg_b: int [n_seg, 3] (start_row, length, delta).
        k_scale, v_scale: float32 [n_rows, H] scales of FP8 pools (only the gathered rows are dequantized);
            None for pools in a compute dtype.

    Returns:
        (k, v): [sum(length), H, D] each, dtype of the pool; float32 for FP8 pools.
    """
    rows, deltas = [], []
    for start, length, delta in seg_b.tolist():
        rows.append(torch.arange(start, start + length, device=k_pool.device))
        deltas.append(torch.full((length,), delta, dtype=torch.float64, device=k_pool.device))
    rows = torch.cat(rows)

    def gathered(pool, scale):
        return pool_values(pool.index_select(0, rows), None if scale is None else scale.index_select(0, rows))

    return apply_delta_rope(gathered(k_pool, k_scale), torch.cat(deltas)), gathered(v_pool, v_scale)


def gather_kv_rope_ref(k_pool: torch.Tensor, v_pool: torch.Tensor, seg: torch.Tensor, total: int,
                       k_pool_scale: torch.Tensor | None = None,
                       v_pool_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Contract: :func:`relaxkv_kernels.ops.gather_kv_rope`; float64 RoPE math, :func:`gather_segments_ref` per batch
    element.
    """
    ks, vs = [], []
    for b in range(k_pool.shape[0]):
        k, v = gather_segments_ref(k_pool[b], v_pool[b], seg[b].cpu(),
                                   *(None if s is None else s[b] for s in (k_pool_scale, v_pool_scale)))
        if k.shape[0] != total:
            raise ValueError(f"gather_kv_rope_ref: seg: expected {total} rows (total) for batch element {b}, "
                             f"got {k.shape[0]}")
        ks.append(k)
        vs.append(v)
    return torch.stack(ks).contiguous(), torch.stack(vs).contiguous()


def gather_kv_rope_into_ref(k_pool: torch.Tensor, v_pool: torch.Tensor, seg: torch.Tensor, k_out: torch.Tensor,
                            v_out: torch.Tensor, k_pool_scale: torch.Tensor | None = None,
                            v_pool_scale: torch.Tensor | None = None) -> None:
    """Contract: :func:`relaxkv_kernels.ops.gather_kv_rope_into`: :func:`gather_kv_rope_ref` rounded once to the
    outputs' dtype.
    """
    k, v = gather_kv_rope_ref(k_pool, v_pool, seg, k_out.shape[1], k_pool_scale, v_pool_scale)
    k_out.copy_(k)
    v_out.copy_(v)
