"""dense_attention reference: softmax(q k^T * scale) v over contiguous keys, in float32."""
from __future__ import annotations

import torch


def dense_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Contract: :func:`relaxkv_kernels.ops.dense_attention` (``scale`` given); float32 math."""
    qt, kt, vt = (x.float().transpose(1, 2) for x in (q, k, v))  # [B, H, N, D]
    logits = qt @ kt.transpose(-1, -2) * scale  # [B, H, Nq, Nk]
    return (logits.softmax(-1) @ vt).transpose(1, 2).contiguous().to(q.dtype)
