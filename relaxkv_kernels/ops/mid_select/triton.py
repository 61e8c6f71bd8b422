"""PackForcing mid-block selection: mean subsampled query, bilinear affinity, top-k, segment rows.

The affinity of sample b, ``s_{b,m} = sum_j sum_{i in Sq} mean_{h<H/2} q_{b,i} . k_{b,m,j} / sqrt(D)``, is
bilinear, so it equals ``|Sq| * Nc * mean_{h<H/2} qbar_b . kbar_{b,m} / sqrt(D)`` (``mid_select_ref``): one
pass over the subsampled queries (kernel 1, one program per (b, h)), then a few dot products per block
and the top-k (kernel 2, one program per sample; one program for all with the batch mean).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ...availability import interpreter_enabled
from ..triton_common import _top_k_mask


@triton.jit
def _mid_qbar_kernel(
    # pointers
    q, qbar,
    # sizes
    N_SUB, Q_STRIDE, HALF_H, HEAD_DIM,
    # strides
    s_qb, s_qn, s_qh, s_qd,
    # meta-parameters
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    o_t = tl.arange(0, BLOCK_T)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    p_q = q + i_b * s_qb + i_h * s_qh + o_d[None, :] * s_qd  # [1, BD]
    acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for i_0 in range(0, N_SUB, BLOCK_T):
        o_i = i_0 + o_t  # [BT] subsample index; token = o_i * Q_STRIDE (every stride-th from the first)
        m_i = o_i < N_SUB
        b_q = tl.load(p_q + (o_i.to(tl.int64) * Q_STRIDE)[:, None] * s_qn, mask=m_i[:, None] & m_d[None, :], other=0.0)
        acc += b_q.to(tl.float32)  # [BT, BD]
    b_qbar = tl.sum(acc, 0) / N_SUB  # [BD]
    tl.store(qbar + (i_b * HALF_H + i_h) * HEAD_DIM + o_d, b_qbar, mask=m_d)


@triton.jit
def _mid_select_kernel(
    # pointers
    qbar, mean_key, mid_slots, block_pos, target_pos, seg, scores,
    # sizes and scalars
    factor, row0, seg_index, block_tokens, BATCH, HALF_H, N_MID, N_SEL, HEAD_DIM,
    # strides
    s_kb, s_kn, s_kh, s_kd, s_mid, s_pos, s_tgt, s_sb, s_ss, s_sf, s_ob, s_om,
    # meta-parameters
    BATCH_MEAN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    if BATCH_MEAN:  # one program: the mean over (b, h), one choice written for every sample
        i_b0 = 0
        n_b = BATCH
    else:  # program b: sample b on its own queries and keys
        i_b0 = tl.program_id(0)
        n_b = 1
    o_m = tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_m = o_m < N_MID
    m_d = o_d < HEAD_DIM
    i_slot = tl.load(mid_slots + o_m * s_mid, mask=m_m, other=0)  # [BM] int64
    p_k = mean_key + i_slot[:, None] * s_kn + o_d[None, :] * s_kd  # [BM, BD]
    acc = tl.zeros([BLOCK_M], tl.float32)
    for i_bh in range(i_b0 * HALF_H, (i_b0 + n_b) * HALF_H):
        i_b = tl.cast(i_bh // HALF_H, tl.int64)
        i_h = tl.cast(i_bh % HALF_H, tl.int64)
        b_q = tl.load(qbar + tl.cast(i_bh, tl.int64) * HEAD_DIM + o_d, mask=m_d, other=0.0)  # [BD]
        b_k = tl.load(p_k + i_b * s_kb + i_h * s_kh, mask=m_m[:, None] & m_d[None, :], other=0.0)  # [BM, BD]
        acc += tl.sum(b_k * b_q[None, :], 1)
    # factor = |Sq| * Nc / (sqrt(D) * n_b * H/2): the mean over (b, h) and the bilinear scale in one multiply
    b_s = acc * tl.cast(factor, tl.float32)  # [BM]

    m_sel = _top_k_mask(b_s, m_m, N_SEL, BLOCK_M)  # [BM]
    i_rank = tl.cumsum(m_sel.to(tl.int32), 0) - 1  # time order = mid_slots order
    b_tgt = tl.load(target_pos + i_rank * s_tgt, mask=m_sel, other=0)
    b_delta = b_tgt - tl.load(block_pos + i_slot * s_pos, mask=m_sel, other=0)  # [BM] int64
    b_start = row0 + i_slot * block_tokens
    for i_b in range(i_b0, i_b0 + n_b):  # this program's samples: one, or every one with the batch mean
        tl.store(scores + tl.cast(i_b, tl.int64) * s_ob + o_m * s_om, b_s, mask=m_m)
        p_seg = seg + tl.cast(i_b, tl.int64) * s_sb + (seg_index + i_rank).to(tl.int64) * s_ss  # [BM]
        tl.store(p_seg, b_start.to(tl.int32), mask=m_sel)
        tl.store(p_seg + s_sf, tl.zeros([BLOCK_M], tl.int32) + block_tokens, mask=m_sel)
        tl.store(p_seg + 2 * s_sf, b_delta.to(tl.int32), mask=m_sel)


def mid_select_triton(q: torch.Tensor, mean_key: torch.Tensor, mid_slots: torch.Tensor, block_pos: torch.Tensor,
                      seg: torch.Tensor, seg_index: int, target_pos: torch.Tensor, row0: int, block_tokens: int,
                      q_stride: int, batch_mean: bool = False) -> torch.Tensor:
    """Contract: :func:`relaxkv_kernels.ops.mid_select` (two small launches, no host synchronisation).

    The affinity through the bilinear identity: kernel 1 means the subsampled queries (one program per (b, h)), kernel 2
    takes the dot products and the top-k (one program per sample; one for all with ``batch_mean``). q: any float dtype,
    any strides, H >= 2.
    """
    b, n_q, h, d = q.shape
    dev = q.device
    mid_slots, block_pos, target_pos = mid_slots.long(), block_pos.long(), target_pos.long()
    n_mid, n_sel = mid_slots.numel(), target_pos.numel()
    scores = torch.empty((b, n_mid), dtype=torch.float32, device=dev)
    if n_mid == 0:
        return scores
    half_h = h // 2
    n_sub = (n_q + q_stride - 1) // q_stride
    block_d = triton.next_power_of_2(d)
    qbar = torch.empty((b, half_h, d), dtype=torch.float32, device=dev)
    _mid_qbar_kernel[(b, half_h)](
        q, qbar, n_sub, q_stride, half_h, d, *q.stride(),
        BLOCK_T=16 if interpreter_enabled() else 64, BLOCK_D=block_d,
    )
    n_avg = b if batch_mean else 1  # samples each program averages over
    _mid_select_kernel[(1 if batch_mean else b,)](
        qbar, mean_key, mid_slots, block_pos, target_pos, seg, scores,
        n_sub * block_tokens / (math.sqrt(d) * n_avg * half_h), row0, seg_index, block_tokens, b, half_h, n_mid,
        n_sel, d,
        mean_key.stride(0), mean_key.stride(1), mean_key.stride(2), mean_key.stride(3),
        mid_slots.stride(0), block_pos.stride(0), target_pos.stride(0), *seg.stride(), *scores.stride(),
        BATCH_MEAN=bool(batch_mean), BLOCK_M=triton.next_power_of_2(n_mid), BLOCK_D=block_d,
    )
    return scores
