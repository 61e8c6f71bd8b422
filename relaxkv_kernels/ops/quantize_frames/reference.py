"""quantize_frames reference: a chunk's rows quantized into the frame slots of an FP8 pool (ops/fp8.py)."""
from __future__ import annotations

import torch

from ..fp8 import write_rows


def quantize_frames_ref(x: torch.Tensor, pool: torch.Tensor, pool_scale: torch.Tensor, frame_slot: torch.Tensor,
                        frame_tokens: int) -> None:
    """Contract: :func:`relaxkv_kernels.ops.quantize_frames`; the rows go through ``ops/fp8.py``'s ``write_rows``."""
    u = frame_slot.numel()
    rows = (frame_slot.long().view(-1, 1) * frame_tokens + torch.arange(frame_tokens, device=x.device)).reshape(-1)
    write_rows(pool, pool_scale, 1, rows, x[:, : u * frame_tokens])
