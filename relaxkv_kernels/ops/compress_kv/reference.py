"""compress_kv reference: PackForcing 2x4x4 average pooling of a block's K and V, RoPE at window centres."""
from __future__ import annotations

import torch

from ...geometry import POOL_T
from ...geometry import POOL_X
from ...geometry import POOL_Y
from ...geometry import apply_rope
from ...geometry import compressed_grid
from ...geometry import compressed_positions


def pool_block(x: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
    """Average-pool a block's tokens [B, frames * F, H, D] over 2x4x4 windows -> float32 [B, Nc, H, D]."""
    nt, ny, nx = compressed_grid(frames, height, width)
    b, _, h, d = x.shape
    g = x.float().reshape(b, frames, height, width, h, d)[:, : nt * POOL_T, : ny * POOL_Y, : nx * POOL_X]
    g = g.reshape(b, nt, POOL_T, ny, POOL_Y, nx, POOL_X, h, d).mean(dim=(2, 4, 6))
    return g.reshape(b, nt * ny * nx, h, d)


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
    pk = pool_block(k, frames, height, width)
    pv = pool_block(v, frames, height, width)
    ck = apply_rope(pk, compressed_positions(t0, frames, height, width).to(k.device))
    return ck.to(k.dtype), pv.to(v.dtype), pk.mean(dim=1)


def compress_kv_into_ref(k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                         mean_key: torch.Tensor, block_slot: torch.Tensor, t0: torch.Tensor, row0: int, frames: int,
                         height: int, width: int) -> None:
    """Op form of :func:`compress_kv_ref`: write the compressed block into the pools in place.

    Rows ``row0 + slot * Nc .. row0 + slot * Nc + Nc - 1`` of k_pool / v_pool receive the rotated pooled
    keys / pooled values, and ``mean_key[:, slot]`` the block's mean key.

    Args:
        k, v: [B, frames * F, H, D] pre-RoPE block keys / values.
        k_pool, v_pool: [B, n_rows, H, D]; mean_key: float32 [B, n_blocks, H, D].
        block_slot, t0: int64 [1] archive slot and temporal position of the block's first frame.
    """
    slot, start = int(block_slot[0]), int(t0[0])
    ck, cv, mk = compress_kv_ref(k, v, start, frames, height, width)
    nc = ck.shape[1]
    k_pool[:, row0 + slot * nc : row0 + (slot + 1) * nc] = ck.to(k_pool.dtype)
    v_pool[:, row0 + slot * nc : row0 + (slot + 1) * nc] = cv.to(v_pool.dtype)
    mean_key[:, slot] = mk
