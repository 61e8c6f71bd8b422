"""Segment-table flash attention: K/V read in place from the cache pools, temporal delta RoPE folded into Q.

Keys of segment s were stored rotated at their write-time positions and must be rotated again by the
segment's temporal shift ``delta`` (docs/pages/design.md: delta RoPE). Rotations are orthogonal, so
``q . R(delta) k == R(-delta) q . k``: the kernel rotates its Q tile once per segment (BM x D work)
instead of every K tile (length x D work), and never copies or re-rotates the cache. FP8 pools (a constexpr
switch) are dequantized per tile right after the load (codes * scale of the row and head, fp32; the codes converted
by the GPU, or decoded from their bits on GPUs without FP8 units: ``triton_common.fp8_codes``), then the tile goes on
in q's dtype like a loaded one.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..availability import interpreter_enabled
from ..targets import UnsupportedGPUError
from ..targets import target_of
from .checks import require
from .fp8 import scale_strides
from .triton_common import _angle_exact
from .triton_common import _cos_sin
from .triton_common import _fp8_values
from .triton_common import fp8_codes
from .triton_common import inv_freq_table
from .triton_common import pair_split

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) == exp2(x * LOG2E); exp2 is the native instruction
MIN_HEAD_DIM = 16  # tl.dot needs tiles of at least 16 along the reduced dim


def _configs() -> list[triton.Config]:
    if interpreter_enabled():  # multi-config autotune needs a GPU driver; small tiles keep CPU tests fast
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=1, num_stages=1)]
    # D = 128 fp16/bf16 on H100: 128 x 64 tiles, 8 warps, 3 stages is the usual sweet spot (FA2 tutorial);
    # the smaller ones serve D = 64 and short query counts. 128 x 64 at 4 warps is left out: ptxas (sm_90a) spills
    # it at D = 128, where 8 warps do not (compile it with benchmarks/reports/target_report.py to see the stack frames).
    # FP8 pools (1-byte K/V tiles dequantized in registers) keep all four, compiled the same way. The pools' dtype is
    # part of Triton's autotune key, so FP8 pools are tuned on their own. On other GPUs ``fitting_configs`` drops
    # what does not fit (shared memory) or spills there: per target, benchmarks/results/targets.json.
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2),
    ]


def local_memory(kernel) -> int:
    """Per-thread local memory of a compiled kernel, in 4-byte words as Triton's ``n_spills`` counts it (loaded on the
    GPU to read it; benchmarks/reports/target_report.py, which compiles for GPUs it does not have, reads ptxas's stack
    frame instead): spilled registers plus the 32 B stack frame of libdevice's cos/sin slow path that every config
    has."""
    kernel._init_handles()
    return kernel.n_spills


def fitting_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The autotuner's ``early_config_prune``: the configs that fit the GPU Triton compiles for.

    Each config is compiled for this launch (the autotuner compiles them anyway; the JIT caches them) and kept when
    its shared memory is within the target's limit (``relaxkv_kernels.targets``: 99 KiB on sm_86 / sm_89 / sm_120,
    where the 128 x 128 tiles need 160 KiB) and it has the least local memory of those: configs that spill registers
    have more. Every config's stack frame and spills per target, at Wan shapes, are in benchmarks/results/targets.json
    (``python -m benchmarks target_report`` measures them; Triton 3.9 there: 32 B of stack frame without a spill,
    40 B to 15.9 KB with one).
    """
    if interpreter_enabled():
        return configs
    target = target_of(divmod(triton.runtime.driver.active.get_current_target().arch, 10))
    launch = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
    fit = {}
    for cfg in configs:
        kernel = _sparse_kv_attention_kernel.fn.warmup(**named_args, **launch, **cfg.all_kwargs(), grid=(1,))
        if kernel.metadata.shared <= target.smem_per_block:
            fit[cfg] = local_memory(kernel)
    if not fit:
        raise UnsupportedGPUError(f"relaxkv.sparse_kv_attention: no tile config fits the {target.smem_per_block} B of "
                                  f"shared memory of {target.arch}")
    least = min(fit.values())
    return [cfg for cfg, local in fit.items() if local == least]


@triton.autotune(configs=_configs(), key=["HEAD_DIM", "N_Q"], prune_configs_by={"early_config_prune": fitting_configs})
@triton.jit
def _sparse_kv_attention_kernel(
    # pointers
    q, k_pool, v_pool, seg, inv_freq, out,
    k_scale, v_scale,  # fp32 [B, n_rows, H] scales of FP8 pools; None otherwise
    # sizes and scalars
    sm_scale, N_Q, N_SEG, N_HEADS, HEAD_DIM,
    # strides
    s_qb, s_qn, s_qh, s_qd,
    s_kb, s_kn, s_kh, s_kd,
    s_vb, s_vn, s_vh, s_vd,
    s_sb, s_ss, s_sf,
    s_ob, s_on, s_oh, s_od,
    s_ksb, s_ksn, s_ksh,
    s_vsb, s_vsn, s_vsh,
    # meta-parameters
    N_T: tl.constexpr,  # temporal pairs (the only ones a delta turns)
    BLOCK_D: tl.constexpr,
    HALF_D: tl.constexpr,  # BLOCK_D // 2, >= 2 * N_T
    UPCAST: tl.constexpr,  # do the dots in fp32 (bf16 under the interpreter, where bf16 math is broken)
    FP8: tl.constexpr,  # k_pool / v_pool hold float8_e4m3fn codes, read as code * scale
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // N_HEADS).to(tl.int64)
    i_h = (i_bh % N_HEADS).to(tl.int64)
    qk_scale = tl.cast(sm_scale, tl.float32) * LOG2E  # host floats may arrive as fp64 (Inductor): keep fp32

    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    o_n = tl.arange(0, BLOCK_N)  # [BN]
    # head dims in two halves: every temporal pair (the only ones a delta turns: 44 of 128 dims) lies in
    # the first, so only that half of the Q tile is re-rotated per segment; the second stays as loaded, which keeps
    # the 128x64-tile, 8-warp config within 255 registers without a spill at D = 128 on sm_90a (248 registers, 32 B
    # of stack in benchmarks/results/targets.json; re-measure with benchmarks/reports/target_report.py)
    o_a = tl.arange(0, HALF_D)  # [BH] dims 0 .. BD/2-1
    o_b = HALF_D + tl.arange(0, HALF_D)  # [BH] dims BD/2 .. BD-1
    m_m = o_m < N_Q
    m_a = o_a < HEAD_DIM
    m_b = o_b < HEAD_DIM
    o_v = tl.arange(0, BLOCK_D)  # [BD]
    m_v = o_v < HEAD_DIM

    p_q = q + i_b * s_qb + i_h * s_qh + o_m.to(tl.int64)[:, None] * s_qn
    # q_perp[2i] = -q[2i+1], q_perp[2i+1] = q[2i]: the same tile read through swapped columns, sign applied later
    b_qa = tl.load(p_q + o_a[None, :] * s_qd, mask=m_m[:, None] & m_a[None, :], other=0.0)  # [BM, BH]
    b_qp = tl.load(p_q + (o_a ^ 1)[None, :] * s_qd, mask=m_m[:, None] & m_a[None, :], other=0.0)  # [BM, BH]
    b_qb = tl.load(p_q + o_b[None, :] * s_qd, mask=m_m[:, None] & m_b[None, :], other=0.0)  # [BM, BH]
    if UPCAST:
        b_qb = b_qb.to(tl.float32)
    b_sign = tl.where(o_a % 2 == 0, -1.0, 1.0)  # [BH]
    # inverse frequency (float64) of the temporal pair of each lane; 0 elsewhere, so cos = 1, sin = 0 exactly there
    b_inv = tl.load(inv_freq + o_a // 2, mask=(o_a // 2) < N_T, other=0.0)  # [BH]

    p_k = k_pool + i_b * s_kb + i_h * s_kh
    p_ka = p_k + o_a[:, None] * s_kd  # [BH, 1]
    p_kb = p_k + o_b[:, None] * s_kd  # [BH, 1]
    p_v = v_pool + i_b * s_vb + i_h * s_vh + o_v[None, :] * s_vd  # [1, BD]
    if FP8:
        p_ks = k_scale + i_b * s_ksb + i_h * s_ksh
        p_vs = v_scale + i_b * s_vsb + i_h * s_vsh
    p_seg = seg + i_b * s_sb

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for i_s in range(N_SEG):
        start = tl.load(p_seg + i_s * s_ss).to(tl.int64)
        length = tl.load(p_seg + i_s * s_ss + s_sf)
        delta = tl.load(p_seg + i_s * s_ss + 2 * s_sf).to(tl.float32)
        # R(-delta) q = q cos - q_perp sin on the temporal pairs, the angle reduced in fp64 (a re-indexed sink's delta
        # grows with the stream); delta = 0 leaves q bit-exact
        b_cos, b_sin = _cos_sin(_angle_exact(delta, b_inv))  # [BH]
        b_qr = b_qa.to(tl.float32) * b_cos[None, :] - b_qp.to(tl.float32) * b_sign[None, :] * b_sin[None, :]
        if not UPCAST:
            b_qr = b_qr.to(q.dtype.element_ty)
        for i_n in range(0, length, BLOCK_N):  # length 0: no iteration
            o_r = i_n + o_n  # [BN] row inside the segment
            m_n = o_r < length
            rows = start + o_r.to(tl.int64)
            b_ka = tl.load(p_ka + rows[None, :] * s_kn, mask=m_a[:, None] & m_n[None, :], other=0.0)  # [BH, BN]
            b_kb = tl.load(p_kb + rows[None, :] * s_kn, mask=m_b[:, None] & m_n[None, :], other=0.0)  # [BH, BN]
            b_v = tl.load(p_v + rows[:, None] * s_vn, mask=m_n[:, None] & m_v[None, :], other=0.0)  # [BN, BD]
            if FP8:  # values in fp32, then the dots' operand dtype (q's, or fp32 under UPCAST) like a loaded tile
                b_ks = tl.load(p_ks + rows * s_ksn, mask=m_n, other=0.0)  # [BN]
                b_vs = tl.load(p_vs + rows * s_vsn, mask=m_n, other=0.0)  # [BN]
                b_ka = (_fp8_values(b_ka) * b_ks[None, :]).to(b_qb.dtype)
                b_kb = (_fp8_values(b_kb) * b_ks[None, :]).to(b_qb.dtype)
                b_v = (_fp8_values(b_v) * b_vs[:, None]).to(b_qb.dtype)
            if UPCAST:
                b_ka = b_ka.to(tl.float32)
                b_kb = b_kb.to(tl.float32)
                b_v = b_v.to(tl.float32)
            b_s = tl.dot(b_qr, b_ka, input_precision="ieee")  # [BM, BN] fp32
            b_s = tl.dot(b_qb, b_kb, b_s, input_precision="ieee")
            b_s = tl.where(m_n[None, :], b_s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(b_s, 1))  # [BM]
            # each tile has >= 1 valid column, so m_new is finite; the guard keeps -inf - -inf out regardless
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m_i - m_safe)  # [BM]
            b_p = tl.math.exp2(b_s - m_safe[:, None])  # [BM, BN]
            l_i = l_i * alpha + tl.sum(b_p, 1)
            acc = tl.dot(b_p.to(b_v.dtype), b_v, acc * alpha[:, None], input_precision="ieee")  # [BM, BD]
            m_i = m_new

    acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # no key at all (every length 0): zeros, like the reference
    p_o = out + i_b * s_ob + i_h * s_oh + o_m.to(tl.int64)[:, None] * s_on + o_v[None, :] * s_od
    tl.store(p_o, acc.to(out.dtype.element_ty), mask=m_m[:, None] & m_v[None, :])


def require_head_dim(op: str, q: torch.Tensor) -> None:
    """The kernel's head_dim limit as an error of ``op``, the op it runs for (``sparse_kv_attention``'s backend,
    ``dense_attention``'s engine)."""
    d = q.shape[-1]
    require(op, d >= MIN_HEAD_DIM, f"q: expected head_dim >= {MIN_HEAD_DIM} for the Triton kernel (tl.dot tiles), "
            f"got {d}")



def sparse_kv_attention_triton(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, seg: torch.Tensor,
                               scale: float, k_pool_scale: torch.Tensor | None = None,
                               v_pool_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Contract: :func:`relaxkv_kernels.ops.sparse_kv_attention` (``impl="fused"``, ``scale`` given).

    One launch, no host synchronisation: the table is read in the kernel, so its rows are not checked against the pools
    here (the public op checks CPU tables). q, the pools and the scales may have any strides; the pools may also be the
    uint8 view of FP8 pools (codes decoded in software, as on GPUs without FP8 units). FP8 values are rounded to q's
    dtype for the dots. head_dim >= 16 (tl.dot tiles).
    """
    require_head_dim("relaxkv.sparse_kv_attention", q)
    b, n_q, h, d = q.shape
    out = torch.empty((b, n_q, h, d), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    n_t, _ = pair_split(d)
    block_d = max(32, triton.next_power_of_2(d))
    grid = lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), b * h)  # noqa: E731
    if k_pool_scale is not None:
        k_pool, v_pool = fp8_codes(k_pool), fp8_codes(v_pool)
    _sparse_kv_attention_kernel[grid](
        q, k_pool, v_pool, seg, inv_freq_table(d, q.device, torch.float64), out,
        k_pool_scale, v_pool_scale,
        float(scale), n_q, seg.shape[1], h, d,
        *q.stride(), *k_pool.stride(), *v_pool.stride(), *seg.stride(), *out.stride(),
        *scale_strides(k_pool_scale), *scale_strides(v_pool_scale),
        N_T=n_t,
        BLOCK_D=block_d,
        HALF_D=block_d // 2,
        UPCAST=interpreter_enabled() and q.dtype == torch.bfloat16,
        FP8=k_pool_scale is not None,
    )
    return out
