"""gather_kv_rope in Triton: K (temporal delta-rotated) and V of a segment table into contiguous rows.

One program per (tile of output rows, batch element) finds each row's segment from the table on the
device (prefix sums of the lengths, no host sync), then copies V and rotates the temporal pairs of K
by the segment's delta for every head (cos/sin once per row, reused by all heads). FP8 pools (constexpr
``FP8``) are read as codes times the scale of the row and head (one scale load per row and head), the codes
converted by the GPU or, on GPUs without FP8 units, decoded from their bits (``triton_common.fp8_codes``). The
CUDA kernel (csrc/gather_kv_rope.cuh) is the fast path where the extension is built; this one serves GPUs without
it and the CPU interpreter.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...availability import interpreter_enabled
from ..fp8 import scale_strides
from ..triton_common import _fp8_values
from ..triton_common import _rope_rotate
from ..triton_common import fp8_codes
from ..triton_common import inv_freq_table
from ..triton_common import pair_split


@triton.jit
def _gather_kv_rope_kernel(
    # pointers
    k_pool, v_pool, k_scale, v_scale, seg, inv_freq, k_out, v_out,
    # sizes
    TOTAL, N_SEG, N_HEADS, HEAD_DIM,
    # strides
    s_kb, s_kn, s_kh, s_kd,
    s_vb, s_vn, s_vh, s_vd,
    s_ksb, s_ksn, s_ksh,
    s_vsb, s_vsn, s_vsh,
    s_sb, s_ss, s_sf,
    s_kob, s_kon, s_koh, s_kod,
    s_vob, s_von, s_voh, s_vod,
    # meta-parameters
    N_T: tl.constexpr, FP8: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_r = tl.program_id(0)
    i_b = tl.program_id(1).to(tl.int64)
    o_s = tl.arange(0, BLOCK_S)
    m_s = o_s < N_SEG
    p_seg = seg + i_b * s_sb + o_s * s_ss
    b_len = tl.maximum(tl.load(p_seg + s_sf, mask=m_s, other=0), 0)  # [BS] zero-length segments skipped
    b_end = tl.cumsum(b_len, 0)  # [BS] inclusive
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR] output rows
    m_r = o_r < TOTAL
    i_seg = tl.sum((b_end[None, :] <= o_r[:, None]).to(tl.int32), 1)  # [BR] first segment ending after the row
    m_cov = m_r & (i_seg < N_SEG)  # rows the table covers; the others come out NaN
    i_seg = tl.minimum(i_seg, N_SEG - 1)
    b_begin = tl.sum(tl.where(o_s[None, :] < i_seg[:, None], b_len[None, :], 0), 1)  # [BR]
    p_row = seg + i_b * s_sb + i_seg * s_ss
    b_start = tl.load(p_row, mask=m_cov, other=0).to(tl.int64)
    b_delta = tl.load(p_row + 2 * s_sf, mask=m_cov, other=0).to(tl.float32)
    rows = b_start + (o_r - b_begin).to(tl.int64)  # [BR] pool rows
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    m_load = m_cov[:, None] & m_d[None, :]
    m_store = m_r[:, None] & m_d[None, :]
    zero = tl.zeros([BLOCK_R], tl.float32)
    for i_h in range(N_HEADS):
        p_k = k_pool + i_b * s_kb + i_h * s_kh + rows[:, None] * s_kn + o_d[None, :] * s_kd
        p_v = v_pool + i_b * s_vb + i_h * s_vh + rows[:, None] * s_vn + o_d[None, :] * s_vd
        if FP8:  # codes * the scale of the row and head; rows the table does not cover get a NaN scale
            b_ks = tl.load(k_scale + i_b * s_ksb + i_h * s_ksh + rows * s_ksn, mask=m_cov, other=float("nan"))  # [BR]
            b_vs = tl.load(v_scale + i_b * s_vsb + i_h * s_vsh + rows * s_vsn, mask=m_cov, other=float("nan"))
            b_k = _fp8_values(tl.load(p_k, mask=m_load, other=0.0)) * b_ks[:, None]  # [BR, BD]
            b_v = _fp8_values(tl.load(p_v, mask=m_load, other=0.0)) * b_vs[:, None]
        else:
            b_k = tl.load(p_k, mask=m_load, other=float("nan")).to(tl.float32)  # [BR, BD]
            b_v = tl.load(p_v, mask=m_load, other=float("nan"))
        # temporal pairs turn by delta; height and width pairs by angle 0 (cos 1, sin 0: copied exactly)
        b_k = _rope_rotate(b_k, b_delta, zero, zero, inv_freq, N_T, 0, HEAD_DIM // 2, BLOCK_R, BLOCK_D)
        o_row = o_r.to(tl.int64)[:, None]
        p_ko = k_out + i_b * s_kob + i_h * s_koh + o_row * s_kon + o_d[None, :] * s_kod
        p_vo = v_out + i_b * s_vob + i_h * s_voh + o_row * s_von + o_d[None, :] * s_vod
        tl.store(p_ko, b_k.to(k_out.dtype.element_ty), mask=m_store)
        tl.store(p_vo, b_v.to(v_out.dtype.element_ty), mask=m_store)


def gather_kv_rope_triton(k_pool: torch.Tensor, v_pool: torch.Tensor, seg: torch.Tensor, k_out: torch.Tensor,
                          v_out: torch.Tensor, k_pool_scale: torch.Tensor | None = None,
                          v_pool_scale: torch.Tensor | None = None) -> None:
    """Contract: :func:`relaxkv_kernels.ops.gather_kv_rope_into` (one launch, no host synchronisation).

    Temporal angles ``delta * inv_freq`` in fp64 reduced to [-pi, pi] (``triton_common._rope_rotate``); rows beyond the
    table's total come out NaN (the public op checks total for CPU tables). Pools, scales and outputs may have any
    strides; the pools may also be the uint8 view of FP8 pools (codes decoded in software, as on GPUs without FP8
    units).
    """
    b, total, h, d = k_out.shape
    if b == 0 or total == 0:
        return
    n_t, _ = pair_split(d)
    fp8 = k_pool_scale is not None
    if fp8:
        k_pool, v_pool = fp8_codes(k_pool), fp8_codes(v_pool)
    # 16 rows a program where FP8 codes are decoded in software, 8 warps: with 32 rows and 4 warps their integer
    # temporaries spill on sm_80 / sm_86 (benchmarks/reports/target_report.py compiles the configs used, per target)
    soft = k_pool.dtype == torch.uint8
    block_r = 16 if interpreter_enabled() or soft else 32
    _gather_kv_rope_kernel[(triton.cdiv(total, block_r), b)](
        k_pool, v_pool, k_pool_scale, v_pool_scale, seg, inv_freq_table(d, k_pool.device, torch.float64), k_out, v_out,
        total, seg.shape[1], h, d,
        *k_pool.stride(), *v_pool.stride(), *scale_strides(k_pool_scale), *scale_strides(v_pool_scale),
        *seg.stride(), *k_out.stride(), *v_out.stride(),
        N_T=n_t, FP8=fp8, BLOCK_R=block_r, BLOCK_S=triton.next_power_of_2(seg.shape[1]),
        BLOCK_D=triton.next_power_of_2(d),
        num_warps=8 if soft else 4,
    )
