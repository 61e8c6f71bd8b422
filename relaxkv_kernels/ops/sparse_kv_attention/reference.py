"""sparse_kv_attention reference: gather K/V through the segment table, delta-rotate, attend in float32.

The keys of all segments, in table order, form one softmax: no mask (see ``gather_kv_rope.reference``
for the table's meaning). FP8 pools are dequantized first (``ops/fp8.py``), then the same math.
"""
from __future__ import annotations

import torch

from ..fp8 import pool_values
from ..gather_kv_rope.reference import gather_segments_ref


def sparse_kv_attention_ref(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, seg: torch.Tensor,
                            scale: float, k_pool_scale: torch.Tensor | None = None,
                            v_pool_scale: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q K^T * scale) V over the segments of ``seg``, in float32.

    Args:
        q: [B, Nq, H, D] queries, already rotated.
        k_pool, v_pool: [B, n_rows, H, D] cache pools (keys rotated at write time), in q's dtype or float8_e4m3fn.
        seg: int32 [B, n_seg, 3] segment table (start_row, length, delta).
        scale: softmax scale (usually D ** -0.5).
        k_pool_scale, v_pool_scale: float32 [B, n_rows, H] scales of FP8 pools (None otherwise): the pools are
            read as ``codes * scale`` in fp32.

    Returns:
        [B, Nq, H, D] in q.dtype.
    """
    k_pool, v_pool = pool_values(k_pool, k_pool_scale), pool_values(v_pool, v_pool_scale)
    out = []
    for b in range(q.shape[0]):
        k, v = gather_segments_ref(k_pool[b], v_pool[b], seg[b].cpu())
        qb = q[b].float().transpose(0, 1)  # [H, Nq, D]
        logits = qb @ k.float().permute(1, 2, 0) * scale  # [H, Nq, Nk]
        out.append((logits.softmax(-1) @ v.float().transpose(0, 1)).transpose(0, 1))
    return torch.stack(out).to(q.dtype)
