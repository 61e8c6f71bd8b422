"""PackForcing reference: 2x4x4 compression of Mid blocks, query-key affinity, top-k (DESIGN.md 4.3)."""
from __future__ import annotations

import torch

from .relax import top_in_order
from .rope import rope_ref

POOL_T, POOL_Y, POOL_X = 2, 4, 4


def compressed_grid(frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Compressed token grid (t, y, x) of a block: floors of frames/2, height/4, width/4."""
    return frames // POOL_T, height // POOL_Y, width // POOL_X


def compressed_positions(t0: float, frames: int, height: int, width: int) -> torch.Tensor:
    """Window-centre positions of a block's compressed tokens, row-major (t, y, x): float64 [Nc, 3]."""
    nt, ny, nx = compressed_grid(frames, height, width)
    t = t0 + POOL_T * torch.arange(nt, dtype=torch.float64) + (POOL_T - 1) / 2
    y = POOL_Y * torch.arange(ny, dtype=torch.float64) + (POOL_Y - 1) / 2
    x = POOL_X * torch.arange(nx, dtype=torch.float64) + (POOL_X - 1) / 2
    return torch.cartesian_prod(t, y, x)


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
    ck = rope_ref(pk, compressed_positions(t0, frames, height, width).to(k.device))
    return ck.to(k.dtype), pv.to(v.dtype), pk.mean(dim=1)


def subsample_queries(q: torch.Tensor, stride: int) -> torch.Tensor:
    """Deterministic uniform subsample of the query tokens: every ``stride``-th token, from the first."""
    return q[:, ::stride]


def mid_affinity_literal(q_sub: torch.Tensor, blocks: list[torch.Tensor]) -> torch.Tensor:
    """s_m = sum_j sum_i mean_{b, h < H/2} q_{b,h,i} . k_{m,b,h,j} / sqrt(D), as a literal double sum.

    Args:
        q_sub: [B, Nsq, H, D] subsampled pre-RoPE queries.
        blocks: M tensors [B, Nc, H, D] of compressed pre-RoPE keys.

    Returns:
        float64 [M].
    """
    hh = q_sub.shape[2] // 2
    d = q_sub.shape[-1]
    qd = q_sub[:, :, :hh].double()
    out = []
    for k in blocks:
        dots = torch.einsum("bihd,bjhd->ijbh", qd, k[:, :, :hh].double())  # [Nsq, Nc, B, hh]
        out.append(dots.mean(dim=(2, 3)).sum() / d**0.5)
    return torch.stack(out)


def mid_affinity_ref(q_sub: torch.Tensor, mean_key: torch.Tensor, block_tokens: int) -> torch.Tensor:
    """The same affinity through the bilinear identity: |Sq| * Nc * mean_{b,h<H/2} (mean q) . (mean k_m) / sqrt(D).

    Args:
        q_sub: [B, Nsq, H, D]; mean_key: float32 [B, M, H, D]; block_tokens: Nc.

    Returns:
        float32 [M].
    """
    hh = q_sub.shape[2] // 2
    d = q_sub.shape[-1]
    qbar = q_sub[:, :, :hh].double().mean(dim=1)  # [B, hh, D]
    dots = (qbar[:, None] * mean_key[:, :, :hh].double()).sum(-1)  # [B, M, hh]
    return (dots.mean(dim=(0, 2)) * q_sub.shape[1] * block_tokens / d**0.5).float()


def mid_select_ref(
    q: torch.Tensor,
    mean_key: torch.Tensor,
    mid_slots: torch.Tensor,
    block_pos: torch.Tensor,
    seg: torch.Tensor,
    seg_index: int,
    target_pos: torch.Tensor,
    row0: int,
    block_tokens: int,
    q_stride: int,
) -> torch.Tensor:
    """Score the mid blocks and write the top-k, in time order, into the segment table.

    k = target_pos.numel() blocks are selected among the M archived blocks ``mid_slots`` (time
    order). Selected block j (in time order) goes to ``seg[:, seg_index + j]`` as
    ``(row0 + slot * Nc, Nc, target_pos[j] - block_pos[slot])``: re-packed right before Recent.

    Args:
        q: [B, Nq, H, D] pre-RoPE queries of the current block.
        mean_key: float32 [B, n_blocks, H, D] mean compressed key per archive slot.
        mid_slots: int64 [M] archive slots of the mid blocks, oldest first.
        block_pos: int64 [n_blocks] temporal position of each archived block's first frame.
        seg: int32 [B, n_seg, 3], written in place (same rows for every batch element).
        target_pos: int64 [k] new first-frame position of the j-th selected block.
        row0: first pool row of the compressed region; block_tokens: Nc; q_stride: query subsample.

    Returns:
        float32 [M] affinities.
    """
    scores = mid_affinity_ref(subsample_queries(q, q_stride), mean_key[:, mid_slots], block_tokens)
    pick = top_in_order(scores[None], target_pos.numel())[0]
    slots = mid_slots[pick]
    n = target_pos.numel()
    seg[:, seg_index : seg_index + n, 0] = (row0 + slots * block_tokens).to(seg.dtype)
    seg[:, seg_index : seg_index + n, 1] = block_tokens
    seg[:, seg_index : seg_index + n, 2] = (target_pos - block_pos[slots]).to(seg.dtype)
    return scores


def compress_kv_into_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    mean_key: torch.Tensor,
    block_slot: torch.Tensor,
    t0: torch.Tensor,
    row0: int,
    frames: int,
    height: int,
    width: int,
) -> None:
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
