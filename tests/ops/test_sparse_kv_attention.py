"""relaxkv::sparse_kv_attention: attention over the K/V rows of a segment table, keys delta-rotated on load.

The reference against the literal (official-style) path: pools of PRE-RoPE keys, per batch element slice +
cat of the segments' rows, keys rotated at their FINAL positions (write position + delta), SDPA in
float64; the op instead reads pools of keys rotated at their write positions. The Triton kernel
(interpreter on CPU) against the reference; ``impl="gather"`` (gather_kv_rope + dense_attention) against
``impl="fused"``; registration and bad inputs (public function and raw op alike). (No CUDA kernel: csrc has
none for it.)

FP8 pools (float8_e4m3fn codes + fp32 scales, ``ops/fp8.py``): the reference against the literal path on the
dequantized pools, the Triton kernel against the reference (rows no segment lists poisoned in codes and
scales), the output against the one with the unquantized pools within a bound derived from e4m3's rounding,
and the scale arguments' checks.
"""
import pytest
import torch
import torch.nn.functional as F

import relaxkv_kernels as rk
from relaxkv_kernels.geometry import apply_rope
from relaxkv_kernels.geometry import token_positions
from relaxkv_kernels.ops.fp8 import dequantize_fp8
from relaxkv_kernels.ops.fp8 import quantize_fp8
from relaxkv_kernels.ops.gather_kv_rope.reference import gather_segments_ref
from relaxkv_kernels.ops.sparse_kv_attention.reference import sparse_kv_attention_ref

from helpers import DEVICE
from helpers import FP8
from helpers import assert_2x_rule
from helpers import assert_checked_matches_default
from helpers import assert_public_op_matches_registered
from helpers import assert_raw_op_raises_like_public
from helpers import close
from helpers import gen
from helpers import last_dim_strided
from helpers import need_triton
from helpers import on
from helpers import poison_fp8
from helpers import ragged_table
from helpers import randn
from helpers import replace
from helpers import run_on_fakes

B, H, D = 2, 2, 16
GRID_H, GRID_W = 2, 4  # literal tests: pool rows form frames of 8 tokens


def _args(g: torch.Generator) -> list:
    """Small valid arguments: 24 queries, pools of 80 rows, ragged tables (an unused row in batch 0)."""
    q = randn(g, B, 24, H, D)
    k_pool, v_pool = randn(g, B, 80, H, D), randn(g, B, 80, H, D)
    seg = torch.tensor([[[0, 16, 3], [40, 7, -2], [0, 0, 0]], [[16, 1, 0], [60, 20, 5], [33, 3, 1]]], dtype=torch.int32)
    return [q, k_pool, v_pool, seg]


def _attention_case(g: torch.Generator, dtype=torch.float32, device="cpu"):
    """33 queries over ragged tables of 57 keys from pools of 120 rows, D = 64."""
    q = randn(g, 2, 33, 3, 64, dtype=dtype, device=device)
    k_pool, v_pool = (randn(g, 2, 120, 3, 64, dtype=dtype, device=device) for _ in range(2))
    seg, total = ragged_table(2, 120, g)
    return q, k_pool, v_pool, seg.to(device), total


def _fp8_attention_case(g: torch.Generator) -> tuple[list, dict, int]:
    """:func:`_attention_case` with FP8 pools, unread rows poisoned: ([q, k codes, v codes, seg], scales, total)."""
    q, k_pool, v_pool, seg, total = _attention_case(g)
    unread = _unread_rows(seg, 120)
    (k_codes, k_scale), (v_codes, v_scale) = _quantized(k_pool, unread), _quantized(v_pool, unread)
    return [q, k_codes, v_codes, seg], {"k_pool_scale": k_scale, "v_pool_scale": v_scale}, total


def _fp8_args(g: torch.Generator) -> list:
    """:func:`_args` with FP8 pools, as the raw op takes them: [q, k codes, v codes, seg, scale, backend,
    k_pool_scale, v_pool_scale]."""
    q, k_pool, v_pool, seg = _args(g)
    (k_codes, k_scale), (v_codes, v_scale) = quantize_fp8(k_pool), quantize_fp8(v_pool)
    return [q, k_codes, v_codes, seg, D**-0.5, "auto", k_scale, v_scale]


def _unread_rows(seg: torch.Tensor, n_rows: int) -> torch.Tensor:
    """bool [B, n_rows]: the pool rows that no segment of ``seg`` [B, n_seg, 3] lists."""
    unread = torch.ones(seg.shape[0], n_rows, dtype=torch.bool)
    for b, table in enumerate(seg.tolist()):
        for start, length, _ in table:
            unread[b, start:start + length] = False
    return unread


def _quantized(pool: torch.Tensor, unread: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``pool`` [B, n_rows, H, D] as an FP8 pool (codes, fp32 scales [B, n_rows, H]), the ``unread`` rows poisoned in
    codes and scales (the interpreter decodes the NaN code as 480: the NaN scale makes a stray read show)."""
    codes, scale = quantize_fp8(pool.float())
    poison_fp8(codes, scale, unread)
    return codes.to(pool.device), scale.to(pool.device)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN poison and FP8 codes included)."""
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


# ---------------------------------------------------------------------------------- reference vs literal


def _pool_positions(frame_pos: list[int]) -> torch.Tensor:
    """Write positions of every pool row: frames of GRID_H x GRID_W tokens, float64 [n_rows, 3]."""
    return token_positions(torch.tensor(frame_pos), GRID_H, GRID_W)


def _literal_attention(q, k_pre, v, pos, seg, scale):
    """q [B, Nq, H, D]; k_pre / v [B, n_rows, H, D]; pos [B, n_rows, 3]; seg [B, n_seg, 3] -> float64."""
    out = []
    for b in range(q.shape[0]):
        ks, vs, ps = [], [], []
        for start, length, delta in seg[b].tolist():
            ks.append(k_pre[b, start:start + length])
            vs.append(v[b, start:start + length])
            p = pos[b, start:start + length].clone()
            p[:, 0] += delta
            ps.append(p)
        k = apply_rope(torch.cat(ks).double(), torch.cat(ps))  # [Nk, H, D] at final positions
        o = F.scaled_dot_product_attention(q[b].double().transpose(0, 1), k.transpose(0, 1),
                                           torch.cat(vs).double().transpose(0, 1), scale=scale)
        out.append(o.transpose(0, 1))
    return torch.stack(out)


@pytest.mark.parametrize("b, d, h, frame_pos, table", [
    pytest.param(1, 32, 1, [3, 4, 5, 6], [[[0, 1, -2], [9, 7, 0], [16, 16, 3]]], id="D32-H1-ragged-1-7-16"),
    pytest.param(2, 32, 2, [10, 11, 40, 41], [[[0, 16, -5], [20, 0, 9], [24, 7, 2]],
                                              [[17, 1, 7], [8, 16, -30], [0, 0, 0]]], id="D32-H2-B2-len0-mixed-deltas"),
    pytest.param(2, 128, 2, [0, 1, 57, 58, 59], [[[32, 8, 0], [0, 16, 55], [16, 1, -3], [39, 1, 0]],
                                                 [[8, 8, -56], [24, 16, -20], [40, 0, 100], [0, 7, 2]]],
                 id="D128-H2-B2-relax-like"),
    pytest.param(1, 128, 1, [100], [[[3, 1, -99], [0, 0, 0]]], id="D128-H1-single-key"),
])
def test_sparse_kv_attention_ref_vs_literal(b, d, h, frame_pos, table):
    g = gen(300 + d + 7 * b + len(frame_pos))
    n_rows = len(frame_pos) * GRID_H * GRID_W
    pos = _pool_positions(frame_pos)
    k_pre, v, q = randn(g, b, n_rows, h, d), randn(g, b, n_rows, h, d), randn(g, b, 5, h, d)
    k_pool = apply_rope(k_pre, pos)  # rotated at write positions, float32
    seg = torch.tensor(table, dtype=torch.int32)
    inputs = [t.clone() for t in (q, k_pool, v, seg)]
    got = sparse_kv_attention_ref(q, k_pool, v, seg, d**-0.5)
    assert got.dtype == q.dtype and got.shape == q.shape
    # fp32 storage of the rotated keys and fp32 math against float64: a few fp32 ulps of sums of ~100 terms
    torch.testing.assert_close(got.double(), _literal_attention(q, k_pre, v, pos.expand(b, -1, -1), seg, d**-0.5),
                               rtol=0, atol=2e-5)
    for before, after in zip(inputs, (q, k_pool, v, seg)):
        assert torch.equal(before, after)


def test_sparse_kv_attention_ref_float64_inputs():
    """float64 inputs: the reference computes in float32, so it agrees to ~1e-6 with the float64 literal."""
    g = gen(310)
    pos = _pool_positions([2, 3, 9])
    k_pre, v, q = (randn(g, 1, n, 2, 64, dtype=torch.float64) for n in (24, 24, 3))
    seg = torch.tensor([[[16, 8, -6], [0, 5, 4], [5, 11, 0]]], dtype=torch.int32)
    got = sparse_kv_attention_ref(q, apply_rope(k_pre, pos), v, seg, 0.125)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, _literal_attention(q, k_pre, v, pos[None], seg, 0.125), rtol=0, atol=1e-5)


@pytest.mark.parametrize("d, frame_pos, table", [
    pytest.param(32, [3, 4, 5, 6], [[[0, 1, -2], [9, 7, 0], [16, 16, 3]], [[24, 8, 5], [2, 5, -1], [0, 0, 0]]],
                 id="D32-B2-ragged-len0"),
    pytest.param(128, [0, 1, 57], [[[8, 8, -56], [0, 1, 55], [17, 7, 2]], [[16, 8, 0], [3, 1, -3], [9, 4, 30]]],
                 id="D128-B2-relax-like"),
])
def test_sparse_kv_attention_ref_fp8_vs_literal(d, frame_pos, table):
    """FP8 pools: the reference attends over the pools' values ``codes * scale``: the literal path on the explicitly
    dequantized pools (pre-RoPE keys recovered by rotating the dequantized keys back, float64)."""
    g = gen(320 + d)
    b, h, n_rows = len(table), 2, len(frame_pos) * GRID_H * GRID_W
    pos = _pool_positions(frame_pos)
    k_pre, v, q = randn(g, b, n_rows, h, d), randn(g, b, n_rows, h, d), randn(g, b, 5, h, d)
    seg = torch.tensor(table, dtype=torch.int32)
    unread = _unread_rows(seg, n_rows)
    assert unread.any()
    (k_codes, k_scale), (v_codes, v_scale) = _quantized(apply_rope(k_pre, pos), unread), _quantized(v, unread)
    inputs = [t.clone() for t in (q, k_codes, v_codes, seg, k_scale, v_scale)]

    got = sparse_kv_attention_ref(q, k_codes, v_codes, seg, d**-0.5, k_scale, v_scale)

    assert got.dtype == q.dtype and got.shape == q.shape
    k_values = dequantize_fp8(k_codes, k_scale).double()  # rotated at write positions; NaN in unread rows
    want = _literal_attention(q, apply_rope(k_values, -pos), dequantize_fp8(v_codes, v_scale), pos.expand(b, -1, -1),
                              seg, d**-0.5)
    # the same fp32 pool values on both sides: fp32 math against float64, as for pools in q's dtype
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5)
    for before, after in zip(inputs, (q, k_codes, v_codes, seg, k_scale, v_scale)):
        assert _same_bits(before, after)


def test_sparse_kv_attention_segment_order_irrelevant_to_softmax():
    """One softmax over all segments: permuting table rows (same keys, same deltas) leaves the output unchanged."""
    g = gen(311)
    k_pool, v, q = randn(g, 1, 32, 2, 32), randn(g, 1, 32, 2, 32), randn(g, 1, 4, 2, 32)
    seg = torch.tensor([[[0, 7, 3], [12, 16, -1], [9, 1, 0]]], dtype=torch.int32)
    a = sparse_kv_attention_ref(q, k_pool, v, seg, 32**-0.5)
    b = sparse_kv_attention_ref(q, k_pool, v, seg[:, [2, 0, 1]], 32**-0.5)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_sparse_kv_attention_ref_non_contiguous_pools():
    g = gen(330)
    k_pool = randn(g, 1, 24, 4, 32)[:, :, ::2]  # every other head
    v_pool = randn(g, 1, 2, 24, 32).transpose(1, 2)  # [1, 24, H, D] view of [1, H, 24, D]
    q = randn(g, 1, 3, 2, 32)
    seg = torch.tensor([[[8, 16, -3], [0, 1, 5]]], dtype=torch.int32)
    assert not k_pool.is_contiguous() and not v_pool.is_contiguous()
    torch.testing.assert_close(sparse_kv_attention_ref(q, k_pool, v_pool, seg, 32**-0.5),
                               sparse_kv_attention_ref(q, k_pool.contiguous(), v_pool.contiguous(), seg, 32**-0.5),
                               rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------- Triton vs reference


def _attention_same_dtype(q, k_pool, v_pool, seg, scale):
    """The same computation done by torch in q's dtype: keys delta-rotated and rounded, matmuls and softmax low."""
    out = []
    for b in range(q.shape[0]):
        k, v = gather_segments_ref(k_pool[b], v_pool[b], seg[b].cpu())
        logits = (q[b].transpose(0, 1) @ k.permute(1, 2, 0)) * scale  # [H, Nq, Nk]
        out.append((logits.softmax(-1) @ v.transpose(0, 1)).transpose(0, 1))
    return torch.stack(out)


# segments (start_row, length, delta) of batch elements 0 and 1 over pools of 128 rows
@pytest.mark.parametrize("dtype, heads, head_dim, n_q, seg0, seg1, layout", [
    pytest.param(torch.float32, 2, 16, 13, [(0, 1, 0), (3, 7, 3), (12, 16, -2), (30, 37, 5), (70, 0, 4)],
                 [(100, 16, -7), (5, 0, 0), (40, 37, 2), (90, 1, 1), (0, 7, 0)], "contiguous", id="fp32-d16-ragged"),
    pytest.param(torch.float16, 2, 32, 21, [(0, 37, -3), (50, 0, 9), (60, 16, 0), (80, 1, 6), (90, 7, -1)],
                 [(10, 7, 4), (20, 1, -5), (30, 16, 0), (64, 37, 3), (120, 0, 0)], "contiguous", id="fp16-d32-ragged"),
    pytest.param(torch.float32, 1, 32, 24, [(16, 24, 0)], [(48, 24, 0)], "contiguous", id="fp32-d32-one-frame"),
    pytest.param(torch.float16, 1, 64, 17, [(0, 40, -40), (64, 33, 25)], [(20, 50, 17), (100, 9, -33)], "contiguous",
                 id="fp16-d64-large-deltas"),
    pytest.param(torch.float32, 2, 32, 19, [(2, 16, 1), (40, 37, -4), (90, 0, 3)], [(7, 7, -2), (60, 30, 5), (1, 1, 0)],
                 "interleaved", id="fp32-d32-noncontig"),
    pytest.param(torch.float16, 2, 32, 9, [(0, 16, 2), (20, 0, 0)], [(0, 0, 3), (40, 0, -1)], "contiguous",
                 id="fp16-d32-batch1-empty"),
])
@pytest.mark.parametrize("pools", ["compute", "fp8", "fp8_software"],
                         ids=["pools_compute_dtype", "pools_fp8", "pools_fp8_software_decode"])
def test_sparse_kv_attention_triton_matches_reference(dtype, heads, head_dim, n_q, seg0, seg1, layout, pools,
                                                      monkeypatch):
    """pools "fp8": codes and scales of pools whose rows and heads span 3 binades, rows no segment lists
    poisoned (NaN codes and scales); "interleaved" then gives the codes and the two scales three layouts.
    "fp8_software": the codes read through uint8 views and decoded from their bits, as on sm_80 / sm_86."""
    need_triton()
    from relaxkv_kernels.ops import triton_attention as kernel
    from relaxkv_kernels.ops.triton_attention import sparse_kv_attention_triton

    if pools == "fp8_software":
        monkeypatch.setattr(kernel, "fp8_codes", lambda pool: pool.view(torch.uint8))
        pools = "fp8"

    g = gen(n_q + head_dim + len(seg0))
    if layout == "interleaved":  # q: every other token of a longer one; pools: K and V interleaved in one buffer
        q = randn(g, 2, 2 * n_q, heads, head_dim, dtype=dtype, device=DEVICE)[:, ::2]
        k_pool, v_pool = randn(g, 2, 128, heads, 2, head_dim, dtype=dtype, device=DEVICE).unbind(3)
        assert not (q.is_contiguous() or k_pool.is_contiguous() or v_pool.is_contiguous())
    else:
        q = randn(g, 2, n_q, heads, head_dim, dtype=dtype, device=DEVICE)
        k_pool, v_pool = (randn(g, 2, 128, heads, head_dim, dtype=dtype, device=DEVICE) for _ in range(2))
    seg = torch.tensor([seg0, seg1], dtype=torch.int32, device=DEVICE)
    scale = head_dim**-0.5
    scales = []
    if pools == "fp8":
        unread = _unread_rows(seg.cpu(), 128)
        spread = [torch.exp2(torch.randint(-2, 1, (2, 128, heads, 1), generator=g)).to(DEVICE) for _ in range(2)]
        (k_pool, k_scale), (v_pool, v_scale) = (_quantized(x * s, unread) for x, s in zip((k_pool, v_pool), spread))
        if layout == "interleaved":  # codes and k_scale over NaN gaps; v_scale a [B, H, n_rows] buffer transposed
            k_pool, v_pool, k_scale = map(last_dim_strided, (k_pool, v_pool, k_scale))
            v_scale = v_scale.transpose(1, 2).contiguous().transpose(1, 2)
        scales = [k_scale, v_scale]
    inputs = (q, k_pool, v_pool, seg, *scales)
    before = [t.clone() for t in inputs]

    out = sparse_kv_attention_triton(q, k_pool, v_pool, seg, scale, *scales)

    for t, t0 in zip(inputs, before):
        assert _same_bits(t, t0), "inputs of a non-mutating op changed"
    assert out.dtype == dtype and out.shape == q.shape
    if pools == "fp8":
        truth = sparse_kv_attention_ref(q.double(), k_pool, v_pool, seg, scale, k_scale, v_scale).double()
        # the pools' values (code * scale: 4 significant bits, exact in fp16 here) for torch's same-dtype path
        k_pool, v_pool = dequantize_fp8(k_pool, k_scale).to(dtype), dequantize_fp8(v_pool, v_scale).to(dtype)
    else:
        truth = sparse_kv_attention_ref(q.double(), k_pool.double(), v_pool.double(), seg, scale).double()
    if dtype == torch.float32:
        # fp32 storage, fp32 math (dots in IEEE fp32, no TF32) vs float64: rounding of O(1) values only
        torch.testing.assert_close(out.double(), truth, rtol=1e-5, atol=1e-5)
    else:
        # fp16: P and the rotated Q are rounded to fp16 before the dots (flash-attention practice); + 2e-4: a few
        # fp16 ulps of the ~0.1-0.5 outputs (the kernel's own error is ~3e-4, torch's fp16 one ~7e-4)
        assert_2x_rule(out, truth, _attention_same_dtype(q, k_pool, v_pool, seg, scale), 2e-4, "out")
    if seg[1, :, 1].sum() == 0:  # a batch element with no key at all gets zeros, like the reference
        assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_sparse_kv_attention_triton_at_stream_deltas():
    """Deltas of 10^5 and 2^24 - 1 (re-indexed frames far into a stream): the fp32 kernel attends within fp32
    rounding of the float64 reference (q's temporal angles are reduced in fp64; in fp32 they were 3e-3 rad off)."""
    need_triton()
    g = gen(17)
    q = randn(g, 1, 9, 2, 32, device=DEVICE)
    k_pool, v_pool = (randn(g, 1, 80, 2, 32, device=DEVICE) for _ in range(2))
    seg = torch.tensor([[[3, 7, 100000], [40, 5, -100000], [60, 9, 2**24 - 1]]], dtype=torch.int32, device=DEVICE)
    got = rk.sparse_kv_attention(q, k_pool, v_pool, seg, 32**-0.5, backend="triton", impl="fused")
    want = sparse_kv_attention_ref(q.double(), k_pool.double(), v_pool.double(), seg, 32**-0.5)
    close(got, want, torch.float32, "out")


def test_sparse_kv_attention_triton_refuses_head_dim_below_16():
    """Backend-specific: tl.dot tiles need head_dim >= 16 (the reference takes any even head_dim); the public
    function and the raw op name the op, the argument and the constraint."""
    need_triton()
    g = gen(12)
    q, pool = randn(g, 1, 4, 1, 8, device=DEVICE), randn(g, 1, 8, 1, 8, device=DEVICE)
    seg = torch.tensor([[[0, 8, 0]]], dtype=torch.int32, device=DEVICE)
    assert_raw_op_raises_like_public("sparse_kv_attention", [q, pool, pool, seg, 0.25, "triton"], ValueError,
                                     "relaxkv.sparse_kv_attention: q: expected head_dim >= 16 for the Triton kernel")


# ------------------------------------------------------------------------ FP8 pools vs unquantized pools

E4M3_REL = 2.0**-4  # a normal e4m3 code keeps 3 mantissa bits, rounded to nearest: relative error <= 2^-4
E4M3_SUB = 2.0**-10  # subnormal codes (|x| < 2^-6 scale) are multiples of 2^-9 scale: absolute error <= 2^-10 scale


def _pair_norms(x: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [..., D/2]: the length of every RoPE pair (2i, 2i+1), which a rotation keeps."""
    return x.unflatten(-1, (-1, 2)).norm(dim=-1)


def _fp8_error_bound(q, k_pool, v_pool, k_scale, v_scale, seg, scale) -> torch.Tensor:
    """A bound on |out(FP8 pools) - out(pools)| for every output element, from e4m3's rounding: float64 [B, Nq, H, D].

    The FP8 pools hold the pools quantized (``k_scale``, ``v_scale``: their scales). Each stored element reads back
    as x~ = x + e with |e| <= E(x) = 2^-4 |x| + 2^-10 s (s: the scale of its row and head; normal codes have a
    relative error of at most 2^-4, subnormal ones an absolute one of half their step 2^-9 s).
    Logits: s~_j - s_j = scale * q . R_j e_j (R_j: key j's delta rotation, turning each pair of dims by some angle);
    per pair, Cauchy-Schwarz and |R e| = |e| give |s~_j - s_j| <= L = scale * max_j sum_pairs |q_pair| |E(k_j)_pair|.
    Weights: p~_j / p_j = e^(d_j) / sum_i p_i e^(d_i) with every |d| <= L lies in [e^-2L, e^2L], so
    |p~_j - p_j| <= (e^2L - 1) p_j.
    Output: o~ - o = sum_j (p~_j - p_j) (v_j - o) + sum_j p~_j e_j (both weight sets sum to 1), so
    |o~ - o| <= (e^2L - 1) sum_j p_j |v_j - o| + e^2L sum_j p_j E(v_j): here computed from the pools in float64.
    """
    bound = []
    for b in range(q.shape[0]):
        rows = torch.cat([torch.arange(start, start + n) for start, n, _ in seg[b].tolist()])
        k, v = gather_segments_ref(k_pool[b].double(), v_pool[b].double(), seg[b])  # [Nk, H, D]
        p = (q[b].double().transpose(0, 1) @ k.permute(1, 2, 0) * scale).softmax(-1)  # [H, Nq, Nk]
        o = p @ v.transpose(0, 1)  # [H, Nq, D]
        err_k, err_v = (E4M3_REL * x[b, rows].double().abs() + E4M3_SUB * s[b, rows, :, None].double()
                        for x, s in ((k_pool, k_scale), (v_pool, v_scale)))  # [Nk, H, D]
        logit = scale * torch.einsum("ihp,jhp->hij", _pair_norms(q[b].double()), _pair_norms(err_k)).amax(-1)
        grow = torch.exp(2 * logit)[..., None]  # [H, Nq, 1]
        spread = (p[..., None] * (v.transpose(0, 1)[:, None] - o[:, :, None]).abs()).sum(2)  # [H, Nq, D]
        bound.append(((grow - 1) * spread + grow * (p @ err_v.transpose(0, 1))).transpose(0, 1))
    return torch.stack(bound)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fp8_pools_output_close_to_unquantized(backend):
    """The public function on FP8 pools (the fp32 pools quantized, rows and heads over 3 binades) against the same
    call on the fp32 pools: within :func:`_fp8_error_bound` everywhere, + 1e-5 for the fp32 rounding of both (as in
    the fp32 tests). A worst case (rounding errors all aligned): here about 13x the largest error seen; a K or V
    scale read from the next row, or K's from the other head, exceeds it 2-4x."""
    device = DEVICE if backend == "triton" else "cpu"
    if backend == "triton":
        need_triton()
    g = gen(40)
    q = 2 * randn(g, 2, 20, 2, 32)  # logits up to ~7, largest weights 0.2-0.8: a softmax neither flat nor one-hot
    k_pool, v_pool = (randn(g, 2, 120, 2, 32) * torch.exp2(torch.randint(-2, 1, (2, 120, 2, 1), generator=g))
                      for _ in range(2))
    seg, _ = ragged_table(2, 120, g)
    scale = 32**-0.5
    unread = _unread_rows(seg, 120)
    (k_codes, k_scale), (v_codes, v_scale) = _quantized(k_pool, unread), _quantized(v_pool, unread)
    bound = _fp8_error_bound(q, k_pool, v_pool, quantize_fp8(k_pool)[1], quantize_fp8(v_pool)[1], seg, scale)

    want = rk.sparse_kv_attention(*on(device, [q, k_pool, v_pool, seg]), backend=backend)
    got = rk.sparse_kv_attention(*on(device, [q, k_codes, v_codes, seg]), backend=backend,
                                 k_pool_scale=k_scale.to(device), v_pool_scale=v_scale.to(device))

    err = (got.double() - want.double()).abs().cpu()
    assert got.dtype == q.dtype and not err.isnan().any()
    worst = (err / (bound + 1e-5)).max().item()
    assert worst <= 1, f"FP8 output off by {worst:.2f} x the e4m3 bound (max error {err.max():.2e})"


# -------------------------------------------------------------------------------- impl="gather" vs fused


@pytest.mark.parametrize("scale", [None, 0.3], ids=["default_scale", "scale0.3"])
def test_gather_impl_matches_fused_on_cpu(scale):
    q, k_pool, v_pool, seg, total = _attention_case(gen(12))
    fused = rk.sparse_kv_attention(q, k_pool, v_pool, seg, scale, backend="reference", impl="fused")
    gather = rk.sparse_kv_attention(q, k_pool, v_pool, seg, scale, backend="reference", impl="gather", total=total)
    assert gather.shape == fused.shape and gather.dtype == fused.dtype
    torch.testing.assert_close(gather, fused, rtol=1e-5, atol=1e-5)


def test_gather_impl_matches_fused_fp8_pools():
    """impl="gather" dequantizes the rows into q's dtype (gather_kv_rope_into), then attends: the fused result."""
    args, scales, total = _fp8_attention_case(gen(15))
    fused = rk.sparse_kv_attention(*args, backend="reference", impl="fused", **scales)
    gather = rk.sparse_kv_attention(*args, backend="reference", impl="gather", total=total, **scales)
    assert gather.shape == fused.shape and gather.dtype == fused.dtype
    torch.testing.assert_close(gather, fused, rtol=1e-5, atol=1e-5)


def test_auto_impl_is_fused_off_cuda():
    """impl="auto" gathers only on CUDA (when total is given): on CPU it is the fused kernel, total or not."""
    q, k_pool, v_pool, seg, total = _attention_case(gen(13))
    fused = rk.sparse_kv_attention(q, k_pool, v_pool, seg, impl="fused")
    gather = rk.sparse_kv_attention(q, k_pool, v_pool, seg, impl="gather", total=total)
    assert not torch.equal(fused, gather)  # different computations: distinguishable results
    assert torch.equal(rk.sparse_kv_attention(q, k_pool, v_pool, seg, total=total), fused)
    assert torch.equal(rk.sparse_kv_attention(q, k_pool, v_pool, seg), fused)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gather_impl_matches_fused_on_gpu(dtype):
    need_triton("cuda")
    q, k_pool, v_pool, seg, total = _attention_case(gen(24), dtype, "cuda")
    fused = rk.sparse_kv_attention(q, k_pool, v_pool, seg, impl="fused")
    gather = rk.sparse_kv_attention(q, k_pool, v_pool, seg, impl="gather", total=total)
    want = rk.sparse_kv_attention(q, k_pool, v_pool, seg, backend="reference", impl="fused")
    close(gather, want, dtype, "gather vs reference")
    close(fused, want, dtype, "fused vs reference")


@pytest.mark.parametrize("impl, engine", [("gather", "auto"), ("gather", "sdpa"), ("auto", "auto")],
                         ids=["gather-engine_auto", "gather-engine_sdpa", "auto"])
def test_compiled_attention_matches_eager(impl, engine):
    q, k_pool, v_pool, seg, total = _attention_case(gen(14))

    def attend(q, k_pool, v_pool, seg):
        return rk.sparse_kv_attention(q, k_pool, v_pool, seg, impl=impl, total=total, engine=engine)

    compiled = torch.compile(attend, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q, k_pool, v_pool, seg), attend(q, k_pool, v_pool, seg))


@pytest.mark.parametrize("impl", ["gather", "fused"])
def test_compiled_fp8_attention_matches_eager(impl):
    args, scales, total = _fp8_attention_case(gen(17))

    def attend(q, k_codes, v_codes, seg, k_scale, v_scale):
        return rk.sparse_kv_attention(q, k_codes, v_codes, seg, k_pool_scale=k_scale, v_pool_scale=v_scale,
                                      impl=impl, total=total)

    compiled = torch.compile(attend, fullgraph=True, backend="eager")
    inputs = [*args, scales["k_pool_scale"], scales["v_pool_scale"]]
    torch.testing.assert_close(compiled(*inputs), attend(*inputs))


def test_impl_arguments_are_checked():
    q, k_pool, v_pool, seg, total = _attention_case(gen(16))
    with pytest.raises(ValueError, match="impl: expected one of"):
        rk.sparse_kv_attention(q, k_pool, v_pool, seg, impl="flash")
    with pytest.raises(ValueError, match="total: required for impl='gather'"):
        rk.sparse_kv_attention(q, k_pool, v_pool, seg, impl="gather")
    with pytest.raises(ValueError, match="total: expected sum\\(length\\)"):
        rk.sparse_kv_attention(q, k_pool, v_pool, seg, impl="gather", total=total + 1)
    with pytest.raises(ValueError, match="engine: expected one of"):
        rk.sparse_kv_attention(q, k_pool, v_pool, seg, impl="gather", total=total, engine="fastest")
    with pytest.raises(RuntimeError, match="backend 'cuda' needs a CUDA kernel"):
        rk.sparse_kv_attention(q, k_pool, v_pool, seg, backend="cuda", impl="fused")


# ------------------------------------------------------------------------------------------ registration


def test_opcheck():
    torch.library.opcheck(torch.ops.relaxkv.sparse_kv_attention.default, (*_args(gen(0)), D**-0.5, "reference"))


def test_opcheck_fp8_pools():
    """Without test_schema: its mutation check multiplies the inputs, which torch cannot do for float8 on the CPU."""
    args = replace(_fp8_args(gen(0)), 5, "reference")
    torch.library.opcheck(torch.ops.relaxkv.sparse_kv_attention.default, tuple(args),
                          test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_public_op_matches_registered_op():
    assert_public_op_matches_registered("sparse_kv_attention", _args(gen(1)), D**-0.5)  # the default scale


def test_public_op_matches_registered_op_fp8_pools():
    q, k_codes, v_codes, seg, scale, _, k_scale, v_scale = _fp8_args(gen(1))
    inputs = [t.clone() for t in (q, k_codes, v_codes, seg, k_scale, v_scale)]
    out = rk.sparse_kv_attention(q, k_codes, v_codes, seg, k_pool_scale=k_scale, v_pool_scale=v_scale)
    assert torch.equal(out, torch.ops.relaxkv.sparse_kv_attention(q, k_codes, v_codes, seg, scale, "reference",
                                                                  k_scale, v_scale))
    for before, after in zip(inputs, (q, k_codes, v_codes, seg, k_scale, v_scale)):
        assert _same_bits(before, after)


def test_fake_shape():
    out, _ = run_on_fakes("sparse_kv_attention", _args(gen(3)), 0.25)
    assert out.shape == (B, 24, H, D) and out.dtype == torch.float32


def test_fake_shape_fp8_pools():
    """The fake takes the scales: the output has q's shape and dtype, whatever the pools' format."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in _fp8_args(gen(3))]
        out = torch.ops.relaxkv.sparse_kv_attention(*replace(args, 5, "reference"))
    assert out.shape == (B, 24, H, D) and out.dtype == torch.float32


# ------------------------------------------------------------------------------------------- bad input

BAD = [  # (argument index, replacement, error type, message fragment)
    pytest.param(3, torch.tensor([[[0, 16, 0]], [[70, 20, 0]]], dtype=torch.int32), ValueError, "rows inside the pool",
                 id="seg_outside_pool"),
    pytest.param(3, torch.tensor([[[0, -1, 0]], [[0, 2, 0]]], dtype=torch.int32), ValueError, "lengths >= 0",
                 id="seg_negative_length"),
    pytest.param(3, torch.tensor([[[0, 0, 0]], [[0, 2, 0]]], dtype=torch.int32), ValueError, "empty table",
                 id="seg_batch_without_keys"),
    pytest.param(3, torch.tensor([[[5, 0, 1], [9, 0, 2]]] * B, dtype=torch.int32), ValueError,
                 "at least one key row per batch element, got an empty table", id="seg_all_empty"),
    pytest.param(3, torch.zeros(B, 0, 3, dtype=torch.int32), ValueError, "at least one segment row", id="seg_no_rows"),
    pytest.param(3, torch.ones(B, 2, 3, dtype=torch.int64), TypeError, "seg: expected dtype", id="seg_int64"),
    pytest.param(3, torch.ones(B, 2, 2, dtype=torch.int32), ValueError, "seg: expected shape", id="seg_shape"),
    pytest.param(1, torch.randn(B, 80, H + 1, D), ValueError, "k_pool: expected shape", id="k_pool_heads"),
    pytest.param(1, torch.randn(B, 80, H, 8), ValueError, "k_pool: expected shape", id="k_pool_head_dim"),
    pytest.param(0, torch.randn(B, 24, H, 7), ValueError, "q: head_dim must be a positive even", id="q_odd_head_dim"),
    pytest.param(2, torch.randn(B, 80, H, D).half(), TypeError, "v_pool: expected dtype", id="v_pool_dtype"),
    pytest.param(0, torch.randn(B, 24, H, D).double(), TypeError, "q: expected dtype", id="q_float64"),
    pytest.param(3, torch.ones(B, 2, 3, dtype=torch.int32, device="meta"), ValueError,
                 "seg: expected tensors on cpu like q, k_pool, v_pool, got seg on meta", id="seg_device"),
    pytest.param(4, float("nan"), ValueError, "scale: expected a finite number", id="scale_nan"),
    pytest.param(5, "fused", ValueError, "backend: expected one of", id="backend_name"),
]


@pytest.mark.parametrize("index, value, exc, match", BAD)
def test_bad_input_raises_before_any_kernel(index, value, exc, match):
    """The public function and the raw op (torch.ops.relaxkv.sparse_kv_attention) raise the same error."""
    args = replace([*_args(gen(4)), D**-0.5, "auto"], index, value)
    assert_raw_op_raises_like_public("sparse_kv_attention", args, exc, match)


BAD_FP8 = [  # (pools, argument index, replacement, error type, message fragment); the raw op's arguments with scales
    pytest.param("fp8", 6, None, ValueError, r"k_pool_scale: expected the float32 \[B, n_rows, H\] scales of the "
                 "torch.float8_e4m3fn k_pool, got None", id="fp8_k_pool_without_scale"),
    pytest.param("fp8", 7, None, ValueError, "v_pool_scale: expected the float32", id="fp8_v_pool_without_scale"),
    pytest.param("compute", 6, torch.ones(B, 80, H), ValueError,
                 "k_pool_scale: expected None for a torch.float32 k_pool", id="scale_with_fp32_k_pool"),
    pytest.param("compute", 7, torch.ones(B, 80, H), ValueError,
                 "v_pool_scale: expected None for a torch.float32 v_pool", id="scale_with_fp32_v_pool"),
    pytest.param("fp8", 6, torch.ones(B, 80, H + 1), ValueError,
                 r"k_pool_scale: expected shape \[2, 80, 2\], got \(2, 80, 3\)", id="k_scale_heads"),
    pytest.param("fp8", 7, torch.ones(B, 81, H), ValueError,
                 r"v_pool_scale: expected shape \[2, 80, 2\], got \(2, 81, 2\)", id="v_scale_rows"),
    pytest.param("fp8", 6, torch.ones(B, 80, H, dtype=torch.float16), TypeError, "k_pool_scale: expected dtype",
                 id="k_scale_fp16"),
    pytest.param("fp8", 7, torch.ones(B, 80, H, device="meta"), ValueError,
                 "v_pool_scale: expected a tensor on cpu, got one on meta", id="v_scale_device"),
    pytest.param("fp8", 2, torch.randn(B, 80, H, D), TypeError,
                 r"v_pool: expected dtype in \['torch.float8_e4m3fn'\], got torch.float32", id="fp8_k_fp32_v"),
    pytest.param("compute", 2, torch.randn(B, 80, H, D).to(FP8), TypeError,
                 r"v_pool: expected dtype in \['torch.float32'\], got torch.float8_e4m3fn", id="fp32_k_fp8_v"),
    pytest.param("fp8", 1, torch.randn(B, 80, H, D).half(), TypeError, "k_pool: expected dtype", id="k_pool_fp16"),
]


@pytest.mark.parametrize("pools, index, value, exc, match", BAD_FP8)
def test_bad_pool_format_raises_before_any_kernel(pools, index, value, exc, match):
    """FP8 pools and their scales: the public function and the raw op raise the same named error."""
    args = _fp8_args(gen(7)) if pools == "fp8" else [*_args(gen(7)), D**-0.5, "auto", None, None]
    assert_raw_op_raises_like_public("sparse_kv_attention", replace(args, index, value), exc, match)


def test_bad_scale_type():
    """A string scale: the public function names it; the raw op's schema refuses it first (torch's error)."""
    with pytest.raises(TypeError, match="scale: expected a float"):
        rk.sparse_kv_attention(*_args(gen(5)), "0.1")
    with pytest.raises(RuntimeError, match="argument 'scale'"):
        torch.ops.relaxkv.sparse_kv_attention(*_args(gen(5)), "0.1", "reference")


def test_checked_true_matches_default():
    assert_checked_matches_default("sparse_kv_attention", [*_args(gen(6)), 0.3, "reference"])


def test_checked_true_matches_default_fp8_pools():
    assert_checked_matches_default("sparse_kv_attention", replace(_fp8_args(gen(6)), 5, "reference"))
