"""sparse_kv_attention reference (contract: ``relaxkv_kernels.ops.sparse_kv_attention``): gather K/V through the
segment table, delta-rotate, attend in float32; FP8 pools dequantized first (``ops/fp8.py``)."""
from __future__ import annotations

import torch

from ..fp8 import pool_values
from ..gather_kv_rope.reference import gather_segments_ref


def sparse_kv_attention_ref(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, seg: torch.Tensor,
                            scale: float, k_pool_scale: torch.Tensor | None = None,
                            v_pool_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Contract: :func:`relaxkv_kernels.ops.sparse_kv_attention` (``impl="fused"``, ``scale`` given).

    Each batch element's segments are gathered (:func:`gather_segments_ref`, float64 RoPE), then attended in float32.
    """
    k_pool, v_pool = pool_values(k_pool, k_pool_scale), pool_values(v_pool, v_pool_scale)
    out = []
    for b in range(q.shape[0]):
        k, v = gather_segments_ref(k_pool[b], v_pool[b], seg[b].cpu())
        qb = q[b].float().transpose(0, 1)  # [H, Nq, D]
        logits = qb @ k.float().permute(1, 2, 0) * scale  # [H, Nq, Nk]
        out.append((logits.softmax(-1) @ v.float().transpose(0, 1)).transpose(0, 1))
    return torch.stack(out).to(q.dtype)
