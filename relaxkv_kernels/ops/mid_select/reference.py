"""mid_select reference: PackForcing query-key affinity of the mid blocks, top-k, segment rows."""
from __future__ import annotations

import torch

from ..relax_select.reference import top_in_order


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


def mid_select_ref(q: torch.Tensor, mean_key: torch.Tensor, mid_slots: torch.Tensor, block_pos: torch.Tensor,
                   seg: torch.Tensor, seg_index: int, target_pos: torch.Tensor, row0: int, block_tokens: int,
                   q_stride: int) -> torch.Tensor:
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
