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
    """Rotate and append one chunk of U frames.

    Args:
        q, k, v: [B, U * F, H, D] (F = height * width), after q/k RMSNorm, before RoPE.
        k_cache, v_cache: [B, n_rows, H, D], dtype of k or float8_e4m3fn (both the same); frame slot ``s`` owns
            rows ``s*F .. s*F + F - 1``.
        proto: float32 [B, n_slots, D] or None; receives each frame's prototype: the mean of its pre-RoPE
            keys over tokens then heads, NOT normalised (set prototypes are means of these).
        frame_slot: int32/int64 [U] cache slot of each chunk frame.
        frame_pos: int32/int64 [U] temporal position of each chunk frame.
        height, width: token grid of a frame.
        k_cache_scale, v_cache_scale: float32 [B, n_rows, H], the scales of FP8 caches (None otherwise): a written
            row and head is quantized from its fp32 value (``ops/fp8.py``), K from the rotation rounded once to fp32.

    Returns:
        q rotated at (frame_pos[u], y, x): [B, U * F, H, D], dtype of q. k_cache gets K rotated at the
        same positions, v_cache gets V, proto gets the prototypes (all in place).
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
