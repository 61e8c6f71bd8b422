"""compress_kv reference: PackForcing 2x4x4 average pooling of a block's K and V, RoPE at window centres."""
from __future__ import annotations

import torch

from ...geometry import POOL_T
from ...geometry import POOL_X
from ...geometry import POOL_Y
from ...geometry import apply_rope
from ...geometry import compressed_grid
from ...geometry import compressed_positions
from ..fp8 import write_rows


def pool_block(x: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
    """Average-pool a block's tokens [B, frames * F, H, D] over 2x4x4 windows -> float32 [B, Nc, H, D]."""
    nt, ny, nx = compressed_grid(frames, height, width)
    b, _, h, d = x.shape
    g = x.float().reshape(b, frames, height, width, h, d)[:, : nt * POOL_T, : ny * POOL_Y, : nx * POOL_X]
    g = g.reshape(b, nt, POOL_T, ny, POOL_Y, nx, POOL_X, h, d).mean(dim=(2, 4, 6))
    return g.reshape(b, nt * ny * nx, h, d)


def _compress_fp32(k: torch.Tensor, v: torch.Tensor, t0: float, frames: int, height: int,
                   width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 (rotated pooled K [B, Nc, H, D], pooled V [B, Nc, H, D], mean key [B, H, D]) of one block."""
    pk = pool_block(k, frames, height, width)
    pv = pool_block(v, frames, height, width)
    ck = apply_rope(pk, compressed_positions(t0, frames, height, width).to(k.device))
    return ck, pv, pk.mean(dim=1)


def compress_kv_ref(
    k: torch.Tensor, v: torch.Tensor, t0: float, frames: int, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compress one block: pooled K rotated at its window centres, pooled V, and the block's mean key.

    Args:
        k, v: [B, frames * F, H, D] the block's pre-RoPE keys and values.
        t0: temporal position of the block's first frame.

    Returns:
        ck [B, Nc, H, D] (dtype of k), cv [B, Nc, H, D] (dtype of v), mean_key float32 [B, H, D]
        (mean of the pooled pre-RoPE keys, for the affinity).
    """
    ck, cv, mk = _compress_fp32(k, v, t0, frames, height, width)
    return ck.to(k.dtype), cv.to(v.dtype), mk


def compress_kv_into_ref(k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                         mean_key: torch.Tensor, block_slot: torch.Tensor, t0: torch.Tensor, row0: int, frames: int,
                         height: int, width: int, k_pool_scale: torch.Tensor | None = None,
                         v_pool_scale: torch.Tensor | None = None) -> None:
    """Contract: :func:`relaxkv_kernels.ops.compress_kv`: :func:`compress_kv_ref` written into the pools (FP8 pools:
    quantized from the float32 values).
    """
    slot, start = int(block_slot[0]), int(t0[0])
    ck, cv, mk = _compress_fp32(k, v, start, frames, height, width)
    nc = ck.shape[1]
    rows = torch.arange(row0 + slot * nc, row0 + (slot + 1) * nc, device=k_pool.device)
    write_rows(k_pool, k_pool_scale, 1, rows, ck, k.dtype)
    write_rows(v_pool, v_pool_scale, 1, rows, cv, v.dtype)
    mean_key[:, slot] = mk
