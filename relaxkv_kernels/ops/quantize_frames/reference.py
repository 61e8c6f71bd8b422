"""quantize_frames reference: a chunk's rows quantized into the frame slots of an FP8 pool (ops/fp8.py)."""
from __future__ import annotations

import torch

from ..fp8 import write_rows


def quantize_frames_ref(x: torch.Tensor, pool: torch.Tensor, pool_scale: torch.Tensor, frame_slot: torch.Tensor,
                        frame_tokens: int) -> None:
    """``pool[:, frame_slot[u] * F + i]`` and its ``pool_scale`` = ``quantize_fp8(x[:, u * F + i])`` for every frame u
    and token i.

    Args:
        x: [N, U * F, H, D] float rows (F = frame_tokens). pool: float8_e4m3fn [N, n_rows, H, D], written in
            place.
        pool_scale: float32 [N, n_rows, H], written in place. frame_slot: int32/int64 [U] slot of each frame.
    """
    u = frame_slot.numel()
    rows = (frame_slot.long().view(-1, 1) * frame_tokens + torch.arange(frame_tokens, device=x.device)).reshape(-1)
    write_rows(pool, pool_scale, 1, rows, x[:, : u * frame_tokens])
