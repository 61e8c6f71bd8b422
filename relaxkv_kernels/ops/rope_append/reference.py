"""rope_append reference: rotate the chunk's Q and K, write K/V into cache rows, per-frame prototypes (float64 RoPE)."""
from __future__ import annotations

import torch

from ...geometry import apply_rope
from ...geometry import token_positions
from ..fp8 import write_rows


def rope_append_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    proto: torch.Tensor | None, frame_slot: torch.Tensor, frame_pos: torch.Tensor, height: int,
                    width: int, k_cache_scale: torch.Tensor | None = None,
                    v_cache_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Contract: :func:`relaxkv_kernels.ops.rope_append`; float64 RoPE math, one rounding to each output's dtype (FP8
    caches: K quantized from the rotation rounded once to fp32).
    """
    f = height * width
    u = frame_slot.numel()
    frame_slot = frame_slot.long()  # index_copy_ takes int64 only
    pos = token_positions(frame_pos.cpu(), height, width).to(q.device)
    rows = (frame_slot.view(-1, 1) * f + torch.arange(f, device=k.device)).reshape(-1)
    k_rot = apply_rope(k if k_cache_scale is None else k.float(), pos)  # FP8: never rounded to k's dtype first
    write_rows(k_cache, k_cache_scale, 1, rows, k_rot, k.dtype)
    write_rows(v_cache, v_cache_scale, 1, rows, v, v.dtype)
    if proto is not None:
        proto.index_copy_(1, frame_slot, k.float().unflatten(1, (u, f)).mean(dim=(2, 3)))
    return apply_rope(q, pos)
