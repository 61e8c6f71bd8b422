"""Fused write path: rotate the chunk's Q and K with Wan 3D RoPE, append K/V to the cache, frame prototypes.

One program per (token tile of a frame, frame u, b * H + h) reads q, k, v once, writes q_rot, the
rotated key and the value into the cache rows of frame slot ``frame_slot[u]``, and the partial sum
of its pre-RoPE keys into a workspace; a second tiny launch reduces the partial sums over tiles and
heads into ``proto[b, frame_slot[u]]`` (deterministic, no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_common import _rope_rotate, inv_freq_table, pair_split, row_mean_scatter


@triton.jit
def _rope_append_kernel(
    # pointers
    q, k, v, q_rot, k_cache, v_cache, frame_slot, frame_pos, inv_freq, partial,
    # sizes
    FRAME_TOKENS, WIDTH, N_HEADS, HEAD_DIM,
    # strides
    s_qb, s_qn, s_qh, s_qd,
    s_kb, s_kn, s_kh, s_kd,
    s_vb, s_vn, s_vh, s_vd,
    s_ob, s_on, s_oh, s_od,
    s_kcb, s_kcn, s_kch, s_kcd,
    s_vcb, s_vcn, s_vch, s_vcd,
    s_fs, s_fp,
    # meta-parameters
    N_T: tl.constexpr, N_H: tl.constexpr, HAS_PROTO: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_t = tl.program_id(0)
    i_u = tl.program_id(1)
    i_bh = tl.program_id(2)
    i_b = (i_bh // N_HEADS).to(tl.int64)
    i_h = (i_bh % N_HEADS).to(tl.int64)
    o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT] token inside the frame, row-major (y, x)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    m_td = (o_t < FRAME_TOKENS)[:, None] & m_d[None, :]
    tok = i_u.to(tl.int64) * FRAME_TOKENS + o_t.to(tl.int64)  # [BT] row in q / k / v
    i_slot = tl.load(frame_slot + i_u * s_fs)  # int64
    rows = i_slot * FRAME_TOKENS + o_t.to(tl.int64)  # [BT] cache rows of the frame's slot

    b_q = tl.load(q + i_b * s_qb + i_h * s_qh + tok[:, None] * s_qn + o_d[None, :] * s_qd, mask=m_td, other=0.0)
    b_k = tl.load(k + i_b * s_kb + i_h * s_kh + tok[:, None] * s_kn + o_d[None, :] * s_kd, mask=m_td, other=0.0)
    b_v = tl.load(v + i_b * s_vb + i_h * s_vh + tok[:, None] * s_vn + o_d[None, :] * s_vd, mask=m_td, other=0.0)
    b_q = b_q.to(tl.float32)  # [BT, BD]
    b_k = b_k.to(tl.float32)
    if HAS_PROTO:  # prototype partial sum (pre-RoPE keys, masked lanes 0): workspace [B, U, H, n_tiles, D]
        i_ws = ((i_b * tl.num_programs(1) + i_u) * N_HEADS + i_h) * tl.num_programs(0) + i_t
        tl.store(partial + i_ws * HEAD_DIM + o_d, tl.sum(b_k, 0), mask=m_d)

    # token (t, y, x) = (frame_pos[u], o_t // W, o_t % W); angles in fp32
    pos_t = tl.zeros([BLOCK_T], tl.float32) + tl.load(frame_pos + i_u * s_fp).to(tl.float32)
    pos_y = (o_t // WIDTH).to(tl.float32)
    pos_x = (o_t % WIDTH).to(tl.float32)
    b_qr = _rope_rotate(b_q, pos_t, pos_y, pos_x, inv_freq, N_T, N_H, HEAD_DIM // 2, BLOCK_T, BLOCK_D)
    b_kr = _rope_rotate(b_k, pos_t, pos_y, pos_x, inv_freq, N_T, N_H, HEAD_DIM // 2, BLOCK_T, BLOCK_D)

    p_o = q_rot + i_b * s_ob + i_h * s_oh + tok[:, None] * s_on + o_d[None, :] * s_od
    p_kc = k_cache + i_b * s_kcb + i_h * s_kch + rows[:, None] * s_kcn + o_d[None, :] * s_kcd
    p_vc = v_cache + i_b * s_vcb + i_h * s_vch + rows[:, None] * s_vcn + o_d[None, :] * s_vcd
    tl.store(p_o, b_qr.to(q_rot.dtype.element_ty), mask=m_td)
    tl.store(p_kc, b_kr.to(k_cache.dtype.element_ty), mask=m_td)
    tl.store(p_vc, b_v.to(v_cache.dtype.element_ty), mask=m_td)


def rope_append_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, proto: torch.Tensor | None, frame_slot: torch.Tensor, frame_pos: torch.Tensor,
                       height: int, width: int) -> torch.Tensor:
    """Rotate and append one chunk of U frames (the op form of ``rope_append_ref``), in two launches, no sync.

    Token i of frame u (y = i // width, x = i % width) is rotated at (frame_pos[u], y, x) with Wan 3D
    RoPE, angles ``position * inv_freq`` in fp32. ``k_cache[:, frame_slot[u] * F + i]`` gets the rotated
    key, ``v_cache`` the value, ``proto[:, frame_slot[u]]`` the mean of the frame's pre-RoPE keys over
    tokens then heads (float32, not normalised). Arguments as validated by ``relaxkv_kernels.rope_append``
    (any strides; slots in range).

    Args:
        q, k, v: [B, U * F, H, D] (F = height * width), after q/k RMSNorm, before RoPE.
        k_cache, v_cache: [B, n_rows, H, D]; frame slot s owns rows s*F .. s*F + F - 1 (written in place).
        proto: float32 [B, n_slots, D] (written in place), or None: no prototypes (one launch).
        frame_slot, frame_pos: int32/int64 [U] cache slot and temporal position of each chunk frame (on the device).
        height, width: token grid of a frame.

    Returns:
        q_rot: [B, U * F, H, D], dtype of q.
    """
    b, n, h, d = q.shape
    f = height * width
    u = frame_slot.numel()
    dev = q.device
    frame_slot, frame_pos = frame_slot.long(), frame_pos.long()
    q_rot = torch.empty((b, n, h, d), dtype=q.dtype, device=dev)
    if q_rot.numel() == 0:
        return q_rot
    block_t = 16  # 16 x 128 tiles: 187 registers, no spills on sm_90 (64 x 128 at 4 warps spilled 2.7 KB)
    n_tiles = triton.cdiv(f, block_t)
    n_t, n_h = pair_split(d)
    partial = q_rot if proto is None else torch.empty((b, u, h, n_tiles, d), dtype=torch.float32, device=dev)
    _rope_append_kernel[(n_tiles, u, b * h)](
        q, k, v, q_rot, k_cache, v_cache, frame_slot, frame_pos, inv_freq_table(d, dev), partial,
        f, width, h, d,
        *q.stride(), *k.stride(), *v.stride(), *q_rot.stride(), *k_cache.stride(), *v_cache.stride(),
        frame_slot.stride(0), frame_pos.stride(0),
        N_T=n_t, N_H=n_h, HAS_PROTO=proto is not None, BLOCK_T=block_t, BLOCK_D=triton.next_power_of_2(d),
        num_warps=4,
    )
    if proto is None:
        return q_rot
    # proto[b, frame_slot[u]] = sum over (head, tile) partial rows / (F * H): group g = b * U + u
    row_mean_scatter(partial.view(b * u, h * n_tiles, d), proto, frame_slot, f * h, u,
                     s_o0=proto.stride(0), s_o1=0, s_idx=frame_slot.stride(0), s_oi=proto.stride(1),
                     s_od=proto.stride(2))
    return q_rot
