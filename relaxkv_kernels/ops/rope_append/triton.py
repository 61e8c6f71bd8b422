"""Fused write path: rotate the chunk's Q and K with Wan 3D RoPE, append K/V to the cache, frame prototypes.

One program per (tile of BLOCK_T tokens of a frame, frame u, b) covers every head: it computes the
cos/sin of its tokens' pairs once ([BT, D/2], fp32) and reuses them for all H heads of q and of k, then
walks the heads BLOCK_H at a time, loading the [BT, BH, D] tiles of q, k and v together (one contiguous
BH * D run per token) before it rotates and stores them. With ``proto`` it also leaves the partial sum
of its pre-RoPE keys in a workspace, and a second tiny launch reduces those over the frame's tiles into
``proto[b, frame_slot[u]]`` (deterministic, no atomics); without ``proto`` there are no sums and no
second launch. With FP8 caches (``FP8``) a program holds whole head rows (BLOCK_D >= D), so each
written row's amax over D is a reduction in registers before its codes are encoded; codes are stored as
bytes through uint8 views, one fp32 scale per (row, head): K and V writes shrink from 2 x 14.4 MB to
2 x 7.4 MB at Wan shapes (bf16 -> 1 byte + 4 bytes per 128 elements), 72 MB per call instead of 86. Compiled
here for sm_90a at Wan shapes: 80 registers (96 with proto) as without FP8, one 16-byte code store per thread
for each of K and V.

Predicted at Wan shapes (B = 1, U = 3, F = 1560, H = 12, D = 128, bf16), not measured: 86 MB per call
(q, k, v read, q_rot, rotated k, v written: 6 x 14.4 MB), floor 29 us at 3 TB/s. A [BLOCK_T, BLOCK_H, D]
tile is 4 KB per tensor (BLOCK_T = 8, BLOCK_H = 2), so each of the 128 threads of a program issues 6
16-byte loads per iteration (96 B in flight), 6 iterations for H = 12. 195 x 3 = 585 programs; compiled
here for sm_90a (triton 3.9): 80 registers (96 with proto), so 5-6 programs fit an SM and all 585 are
resident at once on 132 SMs (no latency-bound partial second wave); ~570 threads per SM x 96 B = ~55 KB
in flight per SM, about twice what 3 TB/s at ~1 us of loaded DRAM latency needs (3e12 B/s x 1e-6 s / 132).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..fp8 import fp8_room
from ..fp8 import is_fp8
from ..fp8 import scale_strides
from ..triton_common import _angle_exact
from ..triton_common import _cos_sin
from ..triton_common import _fp8_amax
from ..triton_common import _fp8_encode
from ..triton_common import _fp8_limit
from ..triton_common import _fp8_scale
from ..triton_common import inv_freq_table
from ..triton_common import pair_split
from ..triton_common import row_mean_scatter

TILE_BYTES = 4096  # one [BLOCK_T, BLOCK_H, BLOCK_D] tile of one tensor: 2 x 16 B per thread of 4 warps


@triton.jit
def _rotate(x, b_cos, b_sin, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rotate the interleaved pairs of fp32 ``x`` [BT, BH, BD] by (cos, sin) [BT, 1, BD/2]."""
    x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_T, BLOCK_H, BLOCK_D // 2, 2)))  # [BT, BH, BP] each
    rot = tl.join(x_even * b_cos - x_odd * b_sin, x_even * b_sin + x_odd * b_cos)  # [BT, BH, BP, 2]
    return tl.reshape(rot, (BLOCK_T, BLOCK_H, BLOCK_D))


@triton.jit
def _rope_append_kernel(
    # pointers (k_cache, v_cache: uint8 views of FP8 caches)
    q, k, v, q_rot, k_cache, v_cache, k_scale, v_scale, frame_slot, frame_pos, inv_freq, partial,
    # sizes
    FRAME_TOKENS, WIDTH, N_HEADS, HEAD_DIM, N_SLOTS,
    # strides
    s_qb, s_qn, s_qh, s_qd,
    s_kb, s_kn, s_kh, s_kd,
    s_vb, s_vn, s_vh, s_vd,
    s_ob, s_on, s_oh, s_od,
    s_kcb, s_kcn, s_kch, s_kcd,
    s_vcb, s_vcn, s_vch, s_vcd,
    s_ksb, s_ksn, s_ksh,
    s_vsb, s_vsn, s_vsh,
    s_fs, s_fp,
    # meta-parameters
    N_T: tl.constexpr, N_H: tl.constexpr, HAS_PROTO: tl.constexpr, FP8: tl.constexpr, ROOM: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_t = tl.program_id(0)
    i_u = tl.program_id(1)
    i_b = tl.program_id(2).to(tl.int64)
    o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT] token inside the frame, row-major (y, x)
    o_h = tl.arange(0, BLOCK_H)
    o_d = tl.arange(0, BLOCK_D)
    o_p = tl.arange(0, BLOCK_D // 2)
    m_t = o_t < FRAME_TOKENS
    m_d = (o_d < HEAD_DIM)[None, None, :]
    tok = i_u.to(tl.int64) * FRAME_TOKENS + o_t.to(tl.int64)  # [BT] row in q / k / v
    i_slot = tl.load(frame_slot + i_u * s_fs).to(tl.int64)
    rows = i_slot * FRAME_TOKENS + o_t.to(tl.int64)  # [BT] cache rows of the frame's slot
    m_td = m_t[:, None, None] & m_d  # [BT, 1, BD]
    m_rows = m_t & (rows >= 0) & (rows < N_SLOTS * FRAME_TOKENS)  # slot in range: validated in Python, but a
    m_tdc = m_rows[:, None, None] & m_d  # device table is not, and nothing is written outside the cache

    # cos/sin of every (token, pair), once for all heads of q and k: token (t, y, x) = (frame_pos[u], o_t // W, o_t % W)
    pos_t = tl.load(frame_pos + i_u * s_fp)
    pos_y = (o_t // WIDTH).to(tl.float32)
    pos_x = (o_t % WIDTH).to(tl.float32)
    b_inv_t = tl.load(inv_freq + o_p, mask=o_p < HEAD_DIM // 2, other=0.0)  # [BP] float64
    b_inv = b_inv_t.to(tl.float32)
    angle_t = _angle_exact(pos_t, b_inv_t)  # [BP]: the frame's temporal angles, reduced in fp64
    pos = tl.where((o_p < N_T + N_H)[None, :], pos_y[:, None], pos_x[:, None])
    b_cos, b_sin = _cos_sin(tl.where((o_p < N_T)[None, :], angle_t[None, :], pos * b_inv[None, :]))  # [BT, BP]
    b_cos = tl.expand_dims(b_cos, 1)  # [BT, 1, BP]
    b_sin = tl.expand_dims(b_sin, 1)

    p_q = q + i_b * s_qb + tok[:, None, None] * s_qn + o_d[None, None, :] * s_qd  # [BT, 1, BD] at head 0
    p_k = k + i_b * s_kb + tok[:, None, None] * s_kn + o_d[None, None, :] * s_kd
    p_v = v + i_b * s_vb + tok[:, None, None] * s_vn + o_d[None, None, :] * s_vd
    p_o = q_rot + i_b * s_ob + tok[:, None, None] * s_on + o_d[None, None, :] * s_od
    p_kc = k_cache + i_b * s_kcb + rows[:, None, None] * s_kcn + o_d[None, None, :] * s_kcd
    p_vc = v_cache + i_b * s_vcb + rows[:, None, None] * s_vcn + o_d[None, None, :] * s_vcd
    p_ks = k_scale + i_b * s_ksb + rows[:, None] * s_ksn  # [BT, 1] at head 0 (FP8 only)
    p_vs = v_scale + i_b * s_vsb + rows[:, None] * s_vsn
    acc = tl.zeros([BLOCK_T, BLOCK_H, BLOCK_D], tl.float32)  # pre-RoPE keys summed over head groups (proto)
    for h0 in range(0, N_HEADS, BLOCK_H):
        i_h = (h0 + o_h).to(tl.int64)[None, :, None]  # [1, BH, 1]
        m_h = i_h < N_HEADS
        m = m_td & m_h  # [BT, BH, BD]
        # the three loads first: 3 x BT x BH x BD elements in flight
        b_q = tl.load(p_q + i_h * s_qh, mask=m, other=0.0)
        b_k = tl.load(p_k + i_h * s_kh, mask=m, other=0.0)
        b_v = tl.load(p_v + i_h * s_vh, mask=m, other=0.0)
        b_k = b_k.to(tl.float32)
        if HAS_PROTO:  # masked lanes are 0; reduced over tokens and heads once, after the loop
            acc += b_k
        b_qr = _rotate(b_q.to(tl.float32), b_cos, b_sin, BLOCK_T, BLOCK_H, BLOCK_D)
        b_kr = _rotate(b_k, b_cos, b_sin, BLOCK_T, BLOCK_H, BLOCK_D)
        tl.store(p_o + i_h * s_oh, b_qr.to(q_rot.dtype.element_ty), mask=m)
        if FP8:  # the tile holds whole head rows (BD >= D, masked lanes 0): each row's amax is a register reduction
            b_v = b_v.to(tl.float32)
            b_ks, b_kinv = _fp8_scale(_fp8_amax(b_kr, 2))  # [BT, BH]
            b_vs, b_vinv = _fp8_scale(_fp8_amax(b_v, 2))
            b_klim, b_vlim = _fp8_limit(b_kinv, ROOM)[:, :, None], _fp8_limit(b_vinv, ROOM)[:, :, None]
            tl.store(p_kc + i_h * s_kch, _fp8_encode(b_kr * b_kinv[:, :, None], b_klim), mask=m_tdc & m_h)
            tl.store(p_vc + i_h * s_vch, _fp8_encode(b_v * b_vinv[:, :, None], b_vlim), mask=m_tdc & m_h)
            i_hs = (h0 + o_h).to(tl.int64)[None, :]  # [1, BH]
            m_s = m_rows[:, None] & (i_hs < N_HEADS)
            tl.store(p_ks + i_hs * s_ksh, b_ks, mask=m_s)
            tl.store(p_vs + i_hs * s_vsh, b_vs, mask=m_s)
        else:
            tl.store(p_kc + i_h * s_kch, b_kr.to(k_cache.dtype.element_ty), mask=m_tdc & m_h)
            tl.store(p_vc + i_h * s_vch, b_v.to(v_cache.dtype.element_ty), mask=m_tdc & m_h)
    if HAS_PROTO:  # workspace [B, U, n_tiles, D]
        i_ws = (i_b * tl.num_programs(1) + i_u) * tl.num_programs(0) + i_t
        tl.store(partial + i_ws * HEAD_DIM + o_d, tl.sum(tl.sum(acc, 0), 0), mask=o_d < HEAD_DIM)


def rope_append_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, proto: torch.Tensor | None, frame_slot: torch.Tensor,
                       frame_pos: torch.Tensor, height: int, width: int, k_cache_scale: torch.Tensor | None = None,
                       v_cache_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Contract: :func:`relaxkv_kernels.ops.rope_append` (arguments as it validates them: any strides, slots in range).

    One launch, two with ``proto`` (the second sums each frame's partial sums in a fixed order: deterministic, no
    atomics). Temporal angles in fp64 from the float64 table, reduced to [-pi, pi] there (exact for positions of any
    stream length); the others ``position * inv_freq`` in fp32 (inverse frequencies rounded once from float64), reduced
    to [-pi, pi] before cos/sin. FP8 caches: K quantized from the fp32 rotation, V from v.
    """
    b, n, h, d = q.shape
    f = height * width
    u = frame_slot.numel()
    dev = q.device
    q_rot = torch.empty((b, n, h, d), dtype=q.dtype, device=dev)
    if q_rot.numel() == 0:
        return q_rot
    block_d = triton.next_power_of_2(d)
    tile = TILE_BYTES // q.element_size()  # elements of one tensor per iteration
    block_h = min(triton.next_power_of_2(h), max(1, tile // (8 * block_d)))  # Wan (bf16, D = 128): 2 heads
    block_t = min(triton.next_power_of_2(f), max(1, tile // (block_h * block_d)))  # Wan: 8 tokens
    n_tiles = triton.cdiv(f, block_t)
    n_t, n_h = pair_split(d)
    n_slots = k_cache.shape[1] // f
    partial = q_rot if proto is None else torch.empty((b, u, n_tiles, d), dtype=torch.float32, device=dev)
    fp8 = is_fp8(k_cache)
    if fp8:  # codes are stored as bytes (the interpreter's own fp8 cast rounds wrongly)
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    k_scale, v_scale = (k_cache_scale, v_cache_scale) if fp8 else (q_rot, q_rot)  # q_rot: never read without FP8
    _rope_append_kernel[(n_tiles, u, b)](
        q, k, v, q_rot, k_cache, v_cache, k_scale, v_scale, frame_slot, frame_pos,
        inv_freq_table(d, dev, torch.float64), partial,
        f, width, h, d, n_slots,
        *q.stride(), *k.stride(), *v.stride(), *q_rot.stride(), *k_cache.stride(), *v_cache.stride(),
        *scale_strides(k_cache_scale), *scale_strides(v_cache_scale),
        frame_slot.stride(0), frame_pos.stride(0),
        N_T=n_t, N_H=n_h, HAS_PROTO=proto is not None, FP8=fp8, ROOM=fp8_room(k.dtype),
        BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_D=block_d,
        num_warps=4,
    )
    if proto is None:
        return q_rot
    # proto[b, frame_slot[u]] = sum over the frame's tile rows / (F * H): group g = b * U + u
    row_mean_scatter(partial.view(b * u, n_tiles, d), proto, frame_slot, f * h, u,
                     s_o0=proto.stride(0), s_o1=0, s_idx=frame_slot.stride(0), s_oi=proto.stride(1),
                     s_od=proto.stride(2))
    return q_rot
