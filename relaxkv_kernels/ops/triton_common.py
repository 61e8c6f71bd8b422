"""Shared pieces of the Triton kernels: the RoPE inverse-frequency table, angle reduction, pair rotation, top-k.

One copy, used by the attention (temporal delta on Q), staging (temporal delta on K), compression (window-centre
positions) and append (token positions) kernels. Height and width angles are computed in fp32 as
``position * inv_freq`` with the table rounded once from float64 (``rope_inv_freq``), then reduced to [-pi, pi]
before cos/sin, so GPU ``cos``/``sin`` never see a large argument (``width`` pair 0 reaches ~52 rad). Temporal angles
(absolute positions, and re-index deltas, which grow as large) are computed and reduced in fp64 from the float64
table (:func:`_angle_exact`): in fp32 a frame at position 10^5 turns 3e-3 rad off (fp32 rounding of the table and of
the product), which the streams of any length reach (10^4 latent frames: 42 minutes of video).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..availability import interpreter_enabled
from ..geometry import rope_inv_freq
from ..geometry import rope_pair_split
from ..targets import target_of

TWO_PI_INV = tl.constexpr(0.15915494309189535)  # 1 / (2 pi)
# 2 pi split in fp32-exact parts (Cody-Waite): HI has 8 significant bits, so k * HI is exact; HI + LO is 2 pi to fp32
# precision (the fp32 reduction), HI + LO + LO2 to fp64 precision (the fp64 one)
TWO_PI_HI = tl.constexpr(6.28125)
TWO_PI_LO = tl.constexpr(0.0019353071693331003)  # fp32(2 pi - HI)
TWO_PI_LO2 = tl.constexpr(1.0253131677018246e-11)  # 2 pi - HI - LO

_INV_FREQ_CACHE: dict[tuple[int, str, torch.dtype], torch.Tensor] = {}


def inv_freq_table(head_dim: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[D/2] inverse frequency of every pair (axes t, h, w) in ``dtype``: fp32 rounded once from float64, or the
    float64 table itself (kernels with absolute temporal positions, :func:`_angle_exact`); cached per device.

    Built with device-side torch ops only (no host-to-device copy), so a first call inside CUDA-graph
    capture is safe.
    """
    key = (head_dim, str(device), dtype)
    table = _INV_FREQ_CACHE.get(key)
    if table is None:
        table = rope_inv_freq(head_dim, device=device).to(dtype)
        _INV_FREQ_CACHE[key] = table
    return table


def pair_split(head_dim: int) -> tuple[int, int]:
    """(temporal, height) pair counts for ``head_dim``; width takes the rest."""
    n_t, n_h, _ = rope_pair_split(head_dim)
    return n_t, n_h


@triton.jit
def _cos_sin(angle):
    """cos and sin of fp32 angles of any size: reduce to [-pi, pi] first (two-part 2 pi), then evaluate."""
    k = tl.floor(angle * TWO_PI_INV + 0.5)
    r = angle - k * TWO_PI_HI
    r = r - k * TWO_PI_LO
    return tl.cos(r), tl.sin(r)


@triton.jit
def _angle_exact(pos, inv):
    """fp64 ``pos * inv`` (a position, any size, and a float64 inverse frequency) reduced to [-pi, pi], as fp32: exact
    to fp32 rounding for positions up to 2^24 (the fp32 product is off by 3e-3 rad at 10^5)."""
    a = pos.to(tl.float64) * inv
    k = tl.floor(a * TWO_PI_INV + 0.5)
    r = a - k * TWO_PI_HI
    r = r - k * TWO_PI_LO
    r = r - k * TWO_PI_LO2
    return r.to(tl.float32)


@triton.jit
def _rope_rotate(x, pos_t, pos_y, pos_x, p_inv, N_T: tl.constexpr, N_H: tl.constexpr, HALF_D,
                 BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rotate the interleaved pairs of fp32 ``x`` [BT, BD] at positions (t, y, x), each [BT]; ``p_inv``: the float64
    table (``inv_freq_table(..., torch.float64)``).

    Pair p < N_T turns by pos_t * inv[p] (in fp64, :func:`_angle_exact`: positions and deltas of any size),
    N_T <= p < N_T + N_H by pos_y * inv[p], the rest by pos_x * inv[p] (fp32). Padding pairs (p >= HALF_D) get angle
    0 (their lanes are masked by the caller anyway).
    """
    BLOCK_P: tl.constexpr = BLOCK_D // 2
    o_p = tl.arange(0, BLOCK_P)
    b_inv_t = tl.load(p_inv + o_p, mask=o_p < HALF_D, other=0.0)  # [BP] float64
    b_inv = b_inv_t.to(tl.float32)
    pos = tl.where((o_p < N_T + N_H)[None, :], pos_y[:, None], pos_x[:, None])  # [BT, BP], spatial pairs
    angle = tl.where((o_p < N_T)[None, :], _angle_exact(pos_t[:, None], b_inv_t[None, :]), pos * b_inv[None, :])
    b_cos, b_sin = _cos_sin(angle)  # [BT, BP]
    x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_T, BLOCK_P, 2)))  # [BT, BP] each
    rot = tl.join(x_even * b_cos - x_odd * b_sin, x_even * b_sin + x_odd * b_cos)  # [BT, BP, 2]
    return tl.reshape(rot, (BLOCK_T, BLOCK_D))


@triton.jit
def _top_k_mask(b_x, m_valid, K, BLOCK: tl.constexpr):
    """Mask of the K best valid entries of ``b_x`` [BLOCK]: finite ones highest first, ties to the lower index,
    then the non-finite ones (NaN, +-inf) by index: a non-finite score is never chosen over a finite one.

    K rounds of (max over the lanes still available, then its lowest lane): O(K * BLOCK), exact with the
    non-finite entries mapped to -inf (no sentinel value is ever compared against a real score).
    """
    b_x = tl.where((b_x == b_x) & (tl.abs(b_x) < float("inf")), b_x, float("-inf"))
    o = tl.arange(0, BLOCK)
    m_sel = o < 0  # [BLOCK] all False
    for _ in range(K):
        m_avail = m_valid & (~m_sel)
        b_best = tl.max(tl.where(m_avail, b_x, float("-inf")), 0)
        i_best = tl.min(tl.where(m_avail & (b_x == b_best), o, BLOCK), 0)
        m_sel = m_sel | (o == i_best)
    return m_sel


@triton.jit
def _row_mean_scatter_kernel(
    # pointers
    ws, out, idx,
    # sizes
    N_ROWS, COUNT, INNER, HEAD_DIM,
    # strides
    s_idx, s_o0, s_o1, s_oi, s_od,
    # meta-parameters
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[g // INNER, g % INNER, idx[g % INNER]] = sum of the N_ROWS partial rows of group g / COUNT.

    Second, deterministic half of a mean over many programs: each program of the first kernel wrote
    one partial sum row into ``ws`` [G, N_ROWS, D] (fp32); the destination slot is read from the device.
    """
    i_g = tl.program_id(0).to(tl.int64)
    o_r = tl.arange(0, BLOCK_R)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    p_ws = ws + i_g * N_ROWS * HEAD_DIM + o_d[None, :]  # [1, BD]
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for i_0 in range(0, N_ROWS, BLOCK_R):
        o_row = i_0 + o_r  # [BR]
        acc += tl.load(p_ws + o_row.to(tl.int64)[:, None] * HEAD_DIM, mask=(o_row < N_ROWS)[:, None] & m_d[None, :],
                       other=0.0)
    b_mean = tl.sum(acc, 0) / COUNT  # [BD]
    i_o = i_g // INNER
    i_i = i_g % INNER
    i_slot = tl.load(idx + i_i * s_idx).to(tl.int64)
    tl.store(out + i_o * s_o0 + i_i * s_o1 + i_slot * s_oi + o_d * s_od, b_mean, mask=m_d)


def row_mean_scatter(ws: torch.Tensor, out: torch.Tensor, idx: torch.Tensor, count: int, inner: int,
                     s_o0: int, s_o1: int, s_idx: int, s_oi: int, s_od: int) -> None:
    """Launch ``_row_mean_scatter_kernel`` over the G = ws.shape[0] groups of partial sums ws [G, R, D]."""
    g, n_rows, d = ws.shape
    _row_mean_scatter_kernel[(g,)](
        ws, out, idx, n_rows, count, inner, d, s_idx, s_o0, s_o1, s_oi, s_od,
        BLOCK_R=min(16, triton.next_power_of_2(n_rows)), BLOCK_D=triton.next_power_of_2(d),
    )


@triton.jit
def _fp8_amax(x, AXIS: tl.constexpr):
    """max |x| along ``AXIS`` of fp32 ``x``, NaN-propagating like torch's amax (ops/fp8.py's reference): taken on the
    int32 bits (a NaN's magnitude bits exceed every number's), the same on the GPU, whose float max drops NaN, and in
    the interpreter."""
    return tl.max(tl.abs(x).to(tl.int32, bitcast=True), AXIS).to(tl.float32, bitcast=True)


@triton.jit
def _fp8_scale(amax):
    """Power-of-two fp32 scale of rows with largest magnitude ``amax`` (fp32 [...]) and its inverse (ops/fp8.py)."""
    bits = amax.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 135 + ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)
    e = tl.minimum(tl.maximum(e, -126), 127)
    return ((e + 127) << 23).to(tl.float32, bitcast=True), ((127 - e) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _fp8_limit(inv, ROOM: tl.constexpr):
    """The largest e4m3 value whose product with a row's scale (``1 / inv``, fp32 [...]) is finite in the compute
    dtype (ops/fp8.py's ``fp8_limit``; ``ROOM``: its ``fp8_room``): ``ROOM * inv`` (exact), at most 448."""
    inv = tl.minimum(inv, 512.0 / ROOM)  # past it the product exceeds 448 anyway (and stays finite)
    return tl.minimum(inv * ROOM, 448.0)


@triton.jit
def _fp8_encode(y, lim):
    """e4m3fn codes (uint8) of fp32 ``y`` clamped to ``[-lim, lim]`` (``lim`` <= 448 from :func:`_fp8_limit`,
    broadcast to ``y``), rounded to nearest even; NaN gives the NaN code.

    From the bits, so every backend (GPU and interpreter, whose fp8 cast rounds differently) writes the same
    codes as torch's ``.to(torch.float8_e4m3fn)``: normal codes round the fp32 mantissa to 3 bits and re-bias
    the exponent (127 -> 7); below 2^-6 the code is round(|y| * 2^9), rounded by one fp32 add of 2^23.
    """
    y = tl.where(tl.abs(y) > lim, tl.where(y < 0, -lim, lim), y)  # NaN compares false: kept
    bits = y.to(tl.int32, bitcast=True)
    sign = ((bits >> 24) & 0x80).to(tl.int32)
    a = bits & 0x7FFFFFFF
    normal = (a + 0x7FFFF + ((a >> 20) & 1)) >> 20
    normal = normal - (120 << 3)
    mag = tl.abs(y) * 512.0
    sub = ((mag + 8388608.0) - 8388608.0).to(tl.int32)
    code = tl.where(a >= 0x3C800000, normal, sub)  # 0x3C800000: 2^-6, e4m3's smallest normal
    code = tl.where(a > 0x7F800000, 0x7F, code)
    return (code | sign).to(tl.uint8)


@triton.jit
def _fp8_decode(codes):
    """fp32 values of e4m3fn ``codes`` (uint8), bit for bit those of the GPU's converter and of torch's ``.float()``.

    For GPUs without FP8 units (sm_80, sm_86: Triton refuses ``fp8e4nv`` there). Normal codes (exponent field > 0)
    re-bias the exponent (7 -> 127: add 120 << 23) under the 3 mantissa bits moved to the top of fp32's;
    subnormal ones are mantissa * 2^-9 (an exact fp32 product, itself normal: no denormal flushing); 0x7F and
    0xFF are NaN. The sign bit is copied last, so -0 stays -0.
    """
    c = codes.to(tl.int32)
    mag = c & 0x7F
    normal = (mag << 20) + (120 << 23)
    sub = (mag.to(tl.float32) * 0.001953125).to(tl.int32, bitcast=True)  # 2^-9
    bits = tl.where(mag >= 8, normal, sub)
    bits = tl.where(mag == 0x7F, 0x7FC00000, bits)
    return (bits | ((c >> 7) << 31)).to(tl.float32, bitcast=True)


@triton.jit
def _fp8_values(codes):
    """fp32 values of loaded e4m3fn codes: converted by the GPU where they were loaded as ``fp8e4nv``, decoded from
    the bits (``_fp8_decode``) where they were loaded through a uint8 view (``fp8_codes``)."""
    if codes.dtype == tl.uint8:
        return _fp8_decode(codes)
    return codes.to(tl.float32)


def fp8_codes(pool: torch.Tensor) -> torch.Tensor:
    """An FP8 pool as the kernels load it (``_fp8_values``): the pool itself where e4m3 converts in hardware (the
    target Triton compiles for has FP8 tensor cores, ``relaxkv_kernels.targets``; the interpreter), its uint8 codes
    where it does not (sm_80, sm_86)."""
    if interpreter_enabled():
        return pool
    arch = triton.runtime.driver.active.get_current_target().arch  # the capability Triton compiles for, e.g. 86
    return pool if target_of(divmod(arch, 10)).fp8_tensor_cores else pool.view(torch.uint8)
