"""dense_attention reference: softmax(q k^T * scale) v over contiguous keys, in float32."""
from __future__ import annotations

import torch


def dense_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax attention of every query over every key, no mask, float32 math.

    Args:
        q: [B, Nq, H, D]; k, v: [B, Nk, H, D] (rotated already).
        scale: softmax scale.

    Returns:
        [B, Nq, H, D] in q.dtype.
    """
    qt, kt, vt = (x.float().transpose(1, 2) for x in (q, k, v))  # [B, H, N, D]
    logits = qt @ kt.transpose(-1, -2) * scale  # [B, H, Nq, Nk]
    return (logits.softmax(-1) @ vt).transpose(1, 2).contiguous().to(q.dtype)
