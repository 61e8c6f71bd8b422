"""relax_select reference: prototypes, r(h) = S(h) - lambda * R(h), top-H, segment rows (official semantics).

Frames are addressed by their cache slot. The planning rules (candidates, roles, hybrid-RoPE target
positions) live with the policy, in ``relaxkv_kernels/memory/relax.py``.
"""
from __future__ import annotations

import torch

from ...geometry import PROTO_EPS


def normalize(x: torch.Tensor) -> torch.Tensor:
    """x / max(||x||, eps) along the last dim, in float64: exact for any finite fp32 magnitude (1e20 included)."""
    return torch.nn.functional.normalize(x.double(), dim=-1, eps=PROTO_EPS)


def set_prototype(frame_means: torch.Tensor) -> torch.Tensor:
    """L2-normalised prototype (float64) of a set of frames from their per-frame means [..., n, D] -> [..., D]."""
    return normalize(frame_means.double().mean(-2))


def frame_means_literal(keys: torch.Tensor) -> torch.Tensor:
    """Per-frame prototype input from raw layer-0 pre-RoPE keys [B, n_frames, F, H, D] -> [B, n_frames, D]."""
    return keys.float().mean(dim=2).mean(dim=2)


def relax_scores_ref(
    proto: torch.Tensor, sink_slots: torch.Tensor, tail_slots: torch.Tensor, cand_slots: torch.Tensor, lam: float
) -> torch.Tensor:
    """r(h) = <p_h, p_sink> - lambda * <p_h, p_tail> for every candidate.

    Args:
        proto: float32 [B, n_slots, D] per-frame means of pre-RoPE keys (not normalised).
        sink_slots, tail_slots: int64 [S], [T] (empty: the term is dropped).
        cand_slots: int64 [C'] in memory order.
        lam: lambda.

    Returns:
        float32 [B, C']; NaN for a candidate whose prototype is not finite (or with a non-finite sink / tail).
    """
    p_h = normalize(proto[:, cand_slots])
    score = torch.zeros(p_h.shape[:2], dtype=torch.float64, device=proto.device)
    if sink_slots.numel():
        score += (p_h * set_prototype(proto[:, sink_slots])[:, None]).sum(-1)
    if tail_slots.numel():
        score -= lam * (p_h * set_prototype(proto[:, tail_slots])[:, None]).sum(-1)
    return score.float()


def top_in_order(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k best scores per row [B, n] -> [B, k], sorted ascending (memory / time order).

    Order: finite scores, highest first, ties to the lower index; then the non-finite ones (NaN, +-inf),
    lowest index first: a non-finite score is never chosen over a finite one.
    """
    key = scores.masked_fill(~scores.isfinite(), float("-inf"))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    return order[:, :k].sort(dim=-1).values


def relax_select_ref(proto: torch.Tensor, slot_pos: torch.Tensor, sink_slots: torch.Tensor, tail_slots: torch.Tensor,
                     cand_slots: torch.Tensor, seg: torch.Tensor, seg_index: int, target_pos: torch.Tensor,
                     frame_tokens: int, lam: float, batch0_decides: bool, contiguous: bool) -> torch.Tensor:
    """Contract: :func:`relaxkv_kernels.ops.relax_select` (the official semantics, float64 prototypes)."""
    scores = relax_scores_ref(proto, sink_slots, tail_slots, cand_slots, lam)
    pick = top_in_order(scores[:1] if batch0_decides else scores, target_pos.numel())
    pick = pick.expand(scores.shape[0], -1)
    slots = cand_slots[pick]  # [B, H_sel]
    delta = torch.zeros_like(slots) if contiguous else target_pos[None] - slot_pos[slots]
    n = target_pos.numel()
    seg[:, seg_index : seg_index + n, 0] = (slots * frame_tokens).to(seg.dtype)
    seg[:, seg_index : seg_index + n, 1] = frame_tokens
    seg[:, seg_index : seg_index + n, 2] = delta.to(seg.dtype)
    return scores
