"""Relax Forcing reference: candidate rule, prototypes, r(h) = S(h) - lambda * R(h), selection, hybrid RoPE.

Semantics follow the official implementation (DESIGN.md 4.2). Frames are addressed by their index in
memory order (oldest first) for the planning rules, and by their cache slot in the ops.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

PROTO_EPS = 1e-12


def relax_candidates(num_middle: int, num_candidates: int) -> list[int] | None:
    """Candidate indices inside the middle block of ``num_middle`` frames, or None (use them all).

    a = Mn // 2, C' = min(C, Mn - a); Mn <= 1: None; C' = 1: [a]; otherwise C' + 1 evenly spaced
    float32 points from a to Mn - 1, truncated toward zero, de-duplicated, the largest dropped.
    Examples: 3 -> [1]; 6 -> [3, 4]; 9 -> [4, 5, 6, 7]; 15 -> [7, 8, 10, 12]; 18 -> [9, 11, 13, 15].
    """
    if num_middle <= 1:
        return None
    a = num_middle // 2
    c = min(num_candidates, num_middle - a)
    if c == 1:
        return [a]
    points = torch.linspace(a, num_middle - 1, c + 1, dtype=torch.float32).to(torch.int64)
    return torch.unique(points)[:-1].tolist()


@dataclass(frozen=True)
class RelaxRoles:
    """Roles of the P cached frames (memory-order indices) for one chunk; ``warmup`` means attend to all."""

    warmup: bool
    sink: list[int]
    middle: list[int]
    tail: list[int]
    candidates: list[int] | None  # memory-order indices; None: no selection, all middle frames used


def relax_roles(num_cached: int, sink: int, tail: int, num_candidates: int) -> RelaxRoles:
    """Split ``num_cached`` frames (before the current chunk) into sink / middle / tail / candidates."""
    if num_cached <= sink + 1 + tail:  # the official code uses the constant 1 whatever H_sel
        return RelaxRoles(True, [], [], [], None)
    middle = list(range(sink, num_cached - tail))
    cand = relax_candidates(len(middle), num_candidates)
    return RelaxRoles(
        False,
        list(range(sink)),
        middle,
        list(range(num_cached - tail, num_cached)),
        None if cand is None else [middle[i] for i in cand],
    )


def set_prototype(frame_means: torch.Tensor) -> torch.Tensor:
    """L2-normalised prototype of a set of frames from their per-frame means [..., n, D] -> [..., D]."""
    return torch.nn.functional.normalize(frame_means.float().mean(-2), dim=-1, eps=PROTO_EPS)


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
        float32 [B, C'].
    """
    p_h = torch.nn.functional.normalize(proto[:, cand_slots].double(), dim=-1, eps=PROTO_EPS)
    score = torch.zeros(p_h.shape[:2], dtype=torch.float64, device=proto.device)
    if sink_slots.numel():
        score += (p_h * set_prototype(proto[:, sink_slots]).double()[:, None]).sum(-1)
    if tail_slots.numel():
        score -= lam * (p_h * set_prototype(proto[:, tail_slots]).double()[:, None]).sum(-1)
    return score.float()


def top_in_order(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores per row [B, n] -> [B, k], ties to the lower index, sorted ascending."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return order[:, :k].sort(dim=-1).values


def relax_select_ref(
    proto: torch.Tensor,
    slot_pos: torch.Tensor,
    sink_slots: torch.Tensor,
    tail_slots: torch.Tensor,
    cand_slots: torch.Tensor,
    seg: torch.Tensor,
    seg_index: int,
    target_pos: torch.Tensor,
    frame_tokens: int,
    lam: float,
    batch0_decides: bool,
    contiguous: bool,
) -> torch.Tensor:
    """Score the candidates and write the selected history frames into the segment table.

    The H_sel = target_pos.numel() best candidates (per batch element, or batch element 0's choice for
    all when ``batch0_decides``), in memory order, go to ``seg[:, seg_index + j]`` as
    ``(slot * F, F, delta)`` with delta = target_pos[j] - slot_pos[slot] (hybrid RoPE) or 0 when
    ``contiguous`` (keys keep their true position).

    Args:
        proto: float32 [B, n_slots, D]; slot_pos: int64 [n_slots] write-time frame position per slot.
        sink_slots, tail_slots, cand_slots: int64 [S], [T], [C'].
        seg: int32 [B, n_seg, 3], written in place.
        target_pos: int64 [H_sel]. frame_tokens: F.

    Returns:
        scores float32 [B, C'].
    """
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


def relax_target_positions(
    chunk_start: int, sink: int, tail: int, history: int, contiguous: bool
) -> tuple[list[int], list[int], list[int]]:
    """Temporal positions given to sink, history and tail frames for the chunk starting at ``chunk_start``.

    Hybrid RoPE: sink then history as one block packed right before the tail:
    sink c-T-(S+H) .. c-T-H-1, history c-T-H .. c-T-1, tail c-T .. c-1 (S=2, T=1, H=1: c-4, c-3 | c-2 | c-1).
    ``contiguous`` (paper ablation): sink frame j at j, history at its true index (returned empty:
    the caller keeps true positions), tail at its true positions.
    """
    c = chunk_start
    tail_pos = list(range(c - tail, c))
    if contiguous:
        return list(range(sink)), [], tail_pos
    first = c - tail - sink - history
    return list(range(first, first + sink)), list(range(first + sink, c - tail)), tail_pos
