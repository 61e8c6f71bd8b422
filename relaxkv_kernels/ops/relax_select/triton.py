"""Relax Forcing history selection in one launch: prototypes, r(h) = S(h) - lambda R(h), top-k, segment rows."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...geometry import PROTO_EPS
from ..triton_common import _top_k_mask

EPS = tl.constexpr(PROTO_EPS)  # F.normalize eps of the prototypes


@triton.jit
def _normalize(x, AXIS: tl.constexpr):
    """x / max(||x||, EPS) along ``AXIS`` in fp32 without overflow: x is scaled by its largest |entry| first
    (x / max(||x||, eps) == y / max(||y||, eps / s) with y = x / s), so prototypes of any finite magnitude
    normalise exactly; a non-finite entry makes the whole row NaN."""
    s = tl.max(tl.abs(x), AXIS)
    safe = tl.where(s > 0, s, 1.0)
    y = x / tl.expand_dims(safe, AXIS)
    eps = tl.where(s > 0, EPS / safe, 1.0)
    return y / tl.expand_dims(tl.maximum(tl.sqrt(tl.sum(y * y, AXIS)), eps), AXIS)


@triton.jit
def _set_prototype(p_row, slots, s_slot, N, s_ps, m_d, BLOCK_S: tl.constexpr):
    """L2-normalised mean of the rows ``p_row + slots[i] * s_ps`` (i < N): [BD] fp32."""
    o_s = tl.arange(0, BLOCK_S)
    m_s = o_s < N
    i_slot = tl.load(slots + o_s * s_slot, mask=m_s, other=0)  # [BS] int64
    b_x = tl.load(p_row[None, :] + i_slot[:, None] * s_ps, mask=m_s[:, None] & m_d[None, :], other=0.0)  # [BS, BD]
    return _normalize(tl.sum(b_x / N, 0), 0)  # [BD]; mean of scaled rows: no overflow near the fp32 maximum


@triton.jit
def _relax_scores(proto, i_b, sink_slots, tail_slots, cand_slots, lam,
                  N_SINK, N_TAIL, N_CAND, HEAD_DIM,
                  s_pb, s_ps, s_pd, s_sink, s_tail, s_cand,
                  HAS_SINK: tl.constexpr, HAS_TAIL: tl.constexpr,
                  BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """r(h) of every candidate of batch element ``i_b``: [BC] fp32 (padding lanes 0)."""
    o_c = tl.arange(0, BLOCK_C)
    o_d = tl.arange(0, BLOCK_D)
    m_c = o_c < N_CAND
    m_d = o_d < HEAD_DIM
    p_row = proto + i_b.to(tl.int64) * s_pb + o_d * s_pd  # [BD]
    i_cand = tl.load(cand_slots + o_c * s_cand, mask=m_c, other=0)  # [BC] int64
    b_h = tl.load(p_row[None, :] + i_cand[:, None] * s_ps, mask=m_c[:, None] & m_d[None, :], other=0.0)  # [BC, BD]
    b_h = _normalize(b_h, 1)
    b_r = tl.zeros([BLOCK_C], tl.float32)
    if HAS_SINK:  # S = 0 drops the term
        b_sink = _set_prototype(p_row, sink_slots, s_sink, N_SINK, s_ps, m_d, BLOCK_S)
        b_r += tl.sum(b_h * b_sink[None, :], 1)
    if HAS_TAIL:  # T = 0 drops the term
        b_tail = _set_prototype(p_row, tail_slots, s_tail, N_TAIL, s_ps, m_d, BLOCK_T)
        b_r -= lam * tl.sum(b_h * b_tail[None, :], 1)
    return b_r


@triton.jit
def _relax_select_kernel(
    # pointers
    proto, slot_pos, sink_slots, tail_slots, cand_slots, target_pos, seg, scores,
    # sizes and scalars
    lam, seg_index, frame_tokens, N_SINK, N_TAIL, N_CAND, N_SEL, HEAD_DIM,
    # strides
    s_pb, s_ps, s_pd, s_pos, s_sink, s_tail, s_cand, s_tgt,
    s_sb, s_ss, s_sf, s_ob, s_oc,
    # meta-parameters
    HAS_SINK: tl.constexpr, HAS_TAIL: tl.constexpr, BATCH0: tl.constexpr, CONTIGUOUS: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_b = tl.program_id(0)
    lam = tl.cast(lam, tl.float32)
    o_c = tl.arange(0, BLOCK_C)
    m_c = o_c < N_CAND

    b_r = _relax_scores(proto, i_b, sink_slots, tail_slots, cand_slots, lam, N_SINK, N_TAIL, N_CAND, HEAD_DIM,
                        s_pb, s_ps, s_pd, s_sink, s_tail, s_cand, HAS_SINK, HAS_TAIL,
                        BLOCK_S, BLOCK_T, BLOCK_C, BLOCK_D)  # [BC]
    tl.store(scores + i_b.to(tl.int64) * s_ob + o_c * s_oc, b_r, mask=m_c)
    if BATCH0:  # every program recomputes batch element 0's scores: no cross-program dependency
        b_pick = _relax_scores(proto, i_b * 0, sink_slots, tail_slots, cand_slots, lam, N_SINK, N_TAIL, N_CAND,
                               HEAD_DIM, s_pb, s_ps, s_pd, s_sink, s_tail, s_cand, HAS_SINK, HAS_TAIL,
                               BLOCK_S, BLOCK_T, BLOCK_C, BLOCK_D)
    else:
        b_pick = b_r

    m_sel = _top_k_mask(b_pick, m_c, N_SEL, BLOCK_C)  # [BC]
    i_rank = tl.cumsum(m_sel.to(tl.int32), 0) - 1  # memory order of the selected candidates
    i_cand = tl.load(cand_slots + o_c * s_cand, mask=m_c, other=0)  # [BC] int64
    if CONTIGUOUS:  # paper ablation: keys keep their true positions
        b_delta = tl.zeros([BLOCK_C], tl.int64)
    else:  # hybrid RoPE: move the frame to target_pos[rank]
        b_tgt = tl.load(target_pos + i_rank * s_tgt, mask=m_sel, other=0)
        b_delta = b_tgt - tl.load(slot_pos + i_cand * s_pos, mask=m_sel, other=0)
    p_seg = seg + i_b.to(tl.int64) * s_sb + (seg_index + i_rank).to(tl.int64) * s_ss  # [BC]
    tl.store(p_seg, (i_cand * frame_tokens).to(tl.int32), mask=m_sel)
    tl.store(p_seg + s_sf, tl.zeros([BLOCK_C], tl.int32) + frame_tokens, mask=m_sel)
    tl.store(p_seg + 2 * s_sf, b_delta.to(tl.int32), mask=m_sel)


def relax_select_triton(proto: torch.Tensor, slot_pos: torch.Tensor, sink_slots: torch.Tensor,
                        tail_slots: torch.Tensor, cand_slots: torch.Tensor, seg: torch.Tensor, seg_index: int,
                        target_pos: torch.Tensor, frame_tokens: int, lam: float, batch0_decides: bool,
                        contiguous: bool) -> torch.Tensor:
    """Contract: :func:`relaxkv_kernels.ops.relax_select`, in one launch, no host synchronisation.

    One program per batch element (one for all with ``batch0_decides``); norms in fp32 after scaling each prototype by
    its largest entry (:func:`_normalize`), so prototypes of any finite magnitude normalise exactly.
    """
    b, _, d = proto.shape
    slot_pos, sink_slots, tail_slots, cand_slots, target_pos = (
        t.long() for t in (slot_pos, sink_slots, tail_slots, cand_slots, target_pos))
    n_cand, n_sel = cand_slots.numel(), target_pos.numel()
    scores = torch.empty((b, n_cand), dtype=torch.float32, device=proto.device)
    if b == 0 or n_cand == 0:
        return scores
    _relax_select_kernel[(b,)](
        proto, slot_pos, sink_slots, tail_slots, cand_slots, target_pos, seg, scores,
        float(lam), seg_index, frame_tokens, sink_slots.numel(), tail_slots.numel(), n_cand, n_sel, d,
        *proto.stride(), slot_pos.stride(0), sink_slots.stride(0), tail_slots.stride(0), cand_slots.stride(0),
        target_pos.stride(0), *seg.stride(), *scores.stride(),
        HAS_SINK=sink_slots.numel() > 0, HAS_TAIL=tail_slots.numel() > 0,
        BATCH0=bool(batch0_decides), CONTIGUOUS=bool(contiguous),
        BLOCK_S=triton.next_power_of_2(max(sink_slots.numel(), 1)),
        BLOCK_T=triton.next_power_of_2(max(tail_slots.numel(), 1)),
        BLOCK_C=triton.next_power_of_2(n_cand),
        BLOCK_D=triton.next_power_of_2(d),
        num_warps=1,
    )
    return scores
