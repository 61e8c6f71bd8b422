"""quantize_frames in Triton: one pass over a chunk's rows, each row and head quantized into its pool slot.

One program per (tile of rows, leading index n) loads whole head rows (D), takes their largest magnitude,
and writes the e4m3 codes and the power-of-two scale (``triton_common._fp8_scale`` / ``_fp8_encode``: the
codes of ``ops/fp8.py``, bit for bit); the pool row is read from ``frame_slot`` on the device.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...availability import interpreter_enabled
from ..fp8 import fp8_room
from ..triton_common import _fp8_amax
from ..triton_common import _fp8_encode
from ..triton_common import _fp8_limit
from ..triton_common import _fp8_scale


@triton.jit
def _quantize_frames_kernel(
    # pointers
    x, pool, pool_scale, frame_slot,
    # sizes
    N_TOKENS, FRAME_TOKENS, N_HEADS, HEAD_DIM,
    # strides
    s_xn, s_xr, s_xh, s_xd,
    s_cn, s_cr, s_ch, s_cd,
    s_sn, s_sr, s_sh,
    # meta-parameters
    ROOM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_n = tl.program_id(1).to(tl.int64)
    o_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR] rows of x
    m_r = o_r < N_TOKENS
    i_slot = tl.load(frame_slot + o_r // FRAME_TOKENS, mask=m_r, other=0).to(tl.int64)
    rows = i_slot * FRAME_TOKENS + (o_r % FRAME_TOKENS)  # [BR] pool rows
    o_d = tl.arange(0, BLOCK_D)
    m = m_r[:, None] & (o_d < HEAD_DIM)[None, :]
    for i_h in range(N_HEADS):
        p_x = x + i_n * s_xn + i_h * s_xh + o_r.to(tl.int64)[:, None] * s_xr + o_d[None, :] * s_xd
        b_x = tl.load(p_x, mask=m, other=0.0).to(tl.float32)  # [BR, BD]
        b_scale, b_inv = _fp8_scale(_fp8_amax(b_x, 1))  # [BR]
        p_c = pool + i_n * s_cn + i_h * s_ch + rows[:, None] * s_cr + o_d[None, :] * s_cd
        tl.store(p_c, _fp8_encode(b_x * b_inv[:, None], _fp8_limit(b_inv, ROOM)[:, None]), mask=m)
        tl.store(pool_scale + i_n * s_sn + i_h * s_sh + rows * s_sr, b_scale, mask=m_r)


def quantize_frames_triton(x: torch.Tensor, pool: torch.Tensor, pool_scale: torch.Tensor,
                           frame_slot: torch.Tensor, frame_tokens: int) -> None:
    """Contract: :func:`relaxkv_kernels.ops.quantize_frames`, in one launch (x, pool, pool_scale: any strides)."""
    n, _, h, d = x.shape
    n_tokens = frame_slot.numel() * frame_tokens
    if n == 0:
        return
    block_r = 16 if interpreter_enabled() else 32
    _quantize_frames_kernel[(triton.cdiv(n_tokens, block_r), n)](
        x, pool.view(torch.uint8), pool_scale, frame_slot,
        n_tokens, frame_tokens, h, d,
        *x.stride(), *pool.stride(), *pool_scale.stride(),
        ROOM=fp8_room(x.dtype), BLOCK_R=block_r, BLOCK_D=triton.next_power_of_2(d), num_warps=4,
    )
