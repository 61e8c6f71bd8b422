"""PackForcing block compression: 2x4x4 average pooling of K and V, RoPE at window centres, mean key.

One program per (tile of compressed tokens, b * H + h): it pools its tokens' windows straight from the
block's K/V (32 strided loads per tile, fp32 sums), rotates the pooled keys at their fractional
window-centre positions, writes both pools' rows in place, and leaves the partial sum of its pooled
pre-RoPE keys in a workspace; a second tiny launch reduces those into ``mean_key`` (deterministic,
no atomics). FP8 pools (constexpr ``FP8``): a tile holds whole rows of D, so each row's amax, scale and codes
come from the fp32 tile before any store (ops/fp8.py); mean_key is computed as without them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...geometry import POOL_T
from ...geometry import POOL_X
from ...geometry import POOL_Y
from ...geometry import compressed_grid
from ..fp8 import fp8_room
from ..fp8 import is_fp8
from ..fp8 import scale_strides
from ..triton_common import _fp8_amax
from ..triton_common import _fp8_encode
from ..triton_common import _fp8_limit
from ..triton_common import _fp8_scale
from ..triton_common import _rope_rotate
from ..triton_common import inv_freq_table
from ..triton_common import pair_split
from ..triton_common import row_mean_scatter


@triton.jit
def _compress_kv_kernel(
    # pointers
    k, v, k_pool, v_pool, k_scale, v_scale, block_slot, t0, inv_freq, partial,
    # sizes
    row0, N_C, N_Y, N_X, FRAME_TOKENS, WIDTH, N_HEADS, HEAD_DIM,
    # strides
    s_kb, s_kn, s_kh, s_kd,
    s_vb, s_vn, s_vh, s_vd,
    s_kpb, s_kpn, s_kph, s_kpd,
    s_vpb, s_vpn, s_vph, s_vpd,
    s_ksb, s_ksn, s_ksh,
    s_vsb, s_vsn, s_vsh,
    # meta-parameters
    FP8: tl.constexpr, ROOM: tl.constexpr, N_T: tl.constexpr, N_H: tl.constexpr,
    PT: tl.constexpr, PY: tl.constexpr, PX: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_c = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // N_HEADS).to(tl.int64)
    i_h = (i_bh % N_HEADS).to(tl.int64)
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BC] compressed token, row-major (t, y, x)
    o_d = tl.arange(0, BLOCK_D)
    m_c = o_c < N_C
    m_d = o_d < HEAD_DIM
    m_cd = m_c[:, None] & m_d[None, :]
    i_tc = o_c // (N_Y * N_X)
    i_yc = (o_c // N_X) % N_Y
    i_xc = o_c % N_X
    # first source token of each window
    tok0 = ((PT * i_tc) * FRAME_TOKENS + (PY * i_yc) * WIDTH + PX * i_xc).to(tl.int64)  # [BC]

    p_k = k + i_b * s_kb + i_h * s_kh + o_d[None, :] * s_kd
    p_v = v + i_b * s_vb + i_h * s_vh + o_d[None, :] * s_vd
    acc_k = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)
    acc_v = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)
    for w in range(PT * PY * PX):  # the 2x4x4 window (a runtime loop: unrolled, its 32 x 2 loads spill)
        tok = tok0 + ((w // (PY * PX)) * FRAME_TOKENS + ((w // PX) % PY) * WIDTH + w % PX)
        acc_k += tl.load(p_k + tok[:, None] * s_kn, mask=m_cd, other=0.0).to(tl.float32)
        acc_v += tl.load(p_v + tok[:, None] * s_vn, mask=m_cd, other=0.0).to(tl.float32)
    b_pk = acc_k / (PT * PY * PX)  # [BC, BD] pooled pre-RoPE keys (masked lanes 0)
    b_pv = acc_v / (PT * PY * PX)
    tl.store(partial + (i_bh.to(tl.int64) * tl.num_programs(0) + i_c) * HEAD_DIM + o_d, tl.sum(b_pk, 0), mask=m_d)

    # window centres: (t0 + 2 tc + 0.5 in fp64: absolute, 4 yc + 1.5, 4 xc + 1.5)
    pos_t = tl.load(t0).to(tl.float64) + i_tc.to(tl.float64) * PT + (PT - 1) * 0.5
    pos_y = i_yc.to(tl.float32) * PY + (PY - 1) * 0.5
    pos_x = i_xc.to(tl.float32) * PX + (PX - 1) * 0.5
    b_ck = _rope_rotate(b_pk, pos_t, pos_y, pos_x, inv_freq, N_T, N_H, HEAD_DIM // 2, BLOCK_C, BLOCK_D)

    rows = row0 + tl.load(block_slot) * N_C + o_c.to(tl.int64)  # [BC] pool rows of this block
    p_kp = k_pool + i_b * s_kpb + i_h * s_kph + rows[:, None] * s_kpn + o_d[None, :] * s_kpd
    p_vp = v_pool + i_b * s_vpb + i_h * s_vph + rows[:, None] * s_vpn + o_d[None, :] * s_vpd
    if FP8:  # the tile holds whole rows: each row's amax over D is complete (masked lanes are 0)
        b_ks, b_kinv = _fp8_scale(_fp8_amax(b_ck, 1))  # [BC]
        b_vs, b_vinv = _fp8_scale(_fp8_amax(b_pv, 1))
        tl.store(p_kp, _fp8_encode(b_ck * b_kinv[:, None], _fp8_limit(b_kinv, ROOM)[:, None]), mask=m_cd)  # uint8
        tl.store(p_vp, _fp8_encode(b_pv * b_vinv[:, None], _fp8_limit(b_vinv, ROOM)[:, None]), mask=m_cd)
        tl.store(k_scale + i_b * s_ksb + i_h * s_ksh + rows * s_ksn, b_ks, mask=m_c)
        tl.store(v_scale + i_b * s_vsb + i_h * s_vsh + rows * s_vsn, b_vs, mask=m_c)
    else:
        tl.store(p_kp, b_ck.to(k_pool.dtype.element_ty), mask=m_cd)
        tl.store(p_vp, b_pv.to(v_pool.dtype.element_ty), mask=m_cd)



def compress_kv_triton(k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                       mean_key: torch.Tensor, block_slot: torch.Tensor, t0: torch.Tensor, row0: int, frames: int,
                       height: int, width: int, k_pool_scale: torch.Tensor | None = None,
                       v_pool_scale: torch.Tensor | None = None) -> None:
    """Contract: :func:`relaxkv_kernels.ops.compress_kv` (k, v: any strides; block_slot and t0 read on the device, no
    host synchronisation; block_slot must be in range).

    Two launches: the pooling, rotation and writes, then a tiny reduction of the per-tile partial sums into
    ``mean_key`` (deterministic, no atomics).
    """
    b, n, h, d = k.shape
    f = height * width
    block_slot, t0 = block_slot.long(), t0.long()
    nt, ny, nx = compressed_grid(frames, height, width)
    n_c = nt * ny * nx
    if n_c == 0 or b * h == 0:
        return None
    block_c = 16  # 182 tokens -> 12 tiles x B*H programs: enough to fill the SMs
    n_tiles = triton.cdiv(n_c, block_c)
    block_d = triton.next_power_of_2(d)
    n_t, n_h = pair_split(d)
    partial = torch.empty((b * h, n_tiles, d), dtype=torch.float32, device=k.device)
    fp8 = is_fp8(k_pool)
    if fp8:  # codes are stored through uint8 views (the interpreter's fp8 cast rounds wrongly)
        k_pool, v_pool = k_pool.view(torch.uint8), v_pool.view(torch.uint8)
    _compress_kv_kernel[(n_tiles, b * h)](
        k, v, k_pool, v_pool, k_pool_scale, v_pool_scale, block_slot, t0, inv_freq_table(d, k.device, torch.float64),
        partial,
        row0, n_c, ny, nx, f, width, h, d,
        *k.stride(), *v.stride(), *k_pool.stride(), *v_pool.stride(),
        *scale_strides(k_pool_scale), *scale_strides(v_pool_scale),
        FP8=fp8, ROOM=fp8_room(k.dtype),
        N_T=n_t, N_H=n_h, PT=POOL_T, PY=POOL_Y, PX=POOL_X, BLOCK_C=block_c, BLOCK_D=block_d,
        num_warps=4,
    )
    # mean_key[b, slot, h] = sum over tiles / Nc: group g = b * H + h, slot read from block_slot[0]
    row_mean_scatter(partial, mean_key, block_slot, n_c, h,
                     s_o0=mean_key.stride(0), s_o1=mean_key.stride(2), s_idx=0, s_oi=mean_key.stride(1),
                     s_od=mean_key.stride(3))
    return None
