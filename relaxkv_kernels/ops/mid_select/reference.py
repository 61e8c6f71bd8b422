"""mid_select reference: PackForcing query-key affinity of the mid blocks, top-k, segment rows."""
from __future__ import annotations

import torch

from ..relax_select.reference import top_in_order


def subsample_queries(q: torch.Tensor, stride: int) -> torch.Tensor:
    """Deterministic uniform subsample of the query tokens: every ``stride``-th token, from the first."""
    return q[:, ::stride]


def mid_affinity_literal(q_sub: torch.Tensor, blocks: list[torch.Tensor], batch_mean: bool = False) -> torch.Tensor:
    """s_{b,m} = sum_j sum_i mean_{h < H/2} q_{b,h,i} . k_{m,b,h,j} / sqrt(D), as a literal double sum.

    Each sample is scored on its own queries and keys; ``batch_mean``: the paper's rule, the mean over
    (b, h < H/2) instead, the same value in every row.

    Args:
        q_sub: [B, Nsq, H, D] subsampled pre-RoPE queries.
        blocks: M tensors [B, Nc, H, D] of compressed pre-RoPE keys.
        batch_mean: average over the batch too.

    Returns:
        float64 [B, M].
    """
    hh = q_sub.shape[2] // 2
    d = q_sub.shape[-1]
    qd = q_sub[:, :, :hh].double()
    out = []
    for k in blocks:
        dots = torch.einsum("bihd,bjhd->bijh", qd, k[:, :, :hh].double())  # [B, Nsq, Nc, hh]
        s = dots.mean(dim=3).sum(dim=(1, 2)) / d**0.5  # [B]
        out.append(s.mean().expand_as(s) if batch_mean else s)
    return torch.stack(out, dim=1)


def mid_affinity_ref(q_sub: torch.Tensor, mean_key: torch.Tensor, block_tokens: int,
                     batch_mean: bool = False) -> torch.Tensor:
    """The same affinity through the bilinear identity: |Sq| * Nc * mean_{h<H/2} (mean q_b) . (mean k_{b,m}) / sqrt(D).

    Args:
        q_sub: [B, Nsq, H, D]; mean_key: float32 [B, M, H, D]; block_tokens: Nc.
        batch_mean: the mean over (b, h < H/2) instead, the same value in every row.

    Returns:
        float32 [B, M].
    """
    hh = q_sub.shape[2] // 2
    d = q_sub.shape[-1]
    qbar = q_sub[:, :, :hh].double().mean(dim=1)  # [B, hh, D]
    dots = (qbar[:, None] * mean_key[:, :, :hh].double()).sum(-1)  # [B, M, hh]
    if batch_mean:
        s = (dots.mean(dim=(0, 2)) * q_sub.shape[1] * block_tokens / d**0.5).float()  # [M]
        return s.expand(q_sub.shape[0], -1).clone()
    return (dots.mean(dim=2) * q_sub.shape[1] * block_tokens / d**0.5).float()


def mid_select_ref(q: torch.Tensor, mean_key: torch.Tensor, mid_slots: torch.Tensor, block_pos: torch.Tensor,
                   seg: torch.Tensor, seg_index: int, target_pos: torch.Tensor, row0: int, block_tokens: int,
                   q_stride: int, batch_mean: bool = False) -> torch.Tensor:
    """Contract: :func:`relaxkv_kernels.ops.mid_select`; the affinity through :func:`mid_affinity_ref` (the bilinear
    identity, checked against :func:`mid_affinity_literal`).
    """
    scores = mid_affinity_ref(subsample_queries(q, q_stride), mean_key[:, mid_slots], block_tokens, batch_mean)
    pick = top_in_order(scores, target_pos.numel())  # [B, k]
    slots = mid_slots[pick]  # [B, k]
    n = target_pos.numel()
    seg[:, seg_index : seg_index + n, 0] = (row0 + slots * block_tokens).to(seg.dtype)
    seg[:, seg_index : seg_index + n, 1] = block_tokens
    seg[:, seg_index : seg_index + n, 2] = (target_pos - block_pos[slots]).to(seg.dtype)
    return scores
