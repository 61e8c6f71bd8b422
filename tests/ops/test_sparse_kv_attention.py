"""relaxkv::sparse_kv_attention: attention over the K/V rows of a segment table, keys delta-rotated on load.

The reference against the literal (official-style) path: pools of PRE-RoPE keys, per batch element slice +
cat of the segments' rows, keys rotated at their FINAL positions (write position + delta), SDPA in
float64; the op instead reads pools of keys rotated at their write positions. The Triton kernel
(interpreter on CPU) against the reference; ``impl="gather"`` (gather_kv_rope + dense_attention) against
``impl="fused"``; registration and bad inputs (public function and raw op alike). (No CUDA kernel: csrc has
none for it.)
"""
import pytest
import torch
import torch.nn.functional as F

import relaxkv_kernels as rk
from relaxkv_kernels.geometry import apply_rope
from relaxkv_kernels.geometry import token_positions
from relaxkv_kernels.ops.gather_kv_rope.reference import gather_segments_ref
from relaxkv_kernels.ops.sparse_kv_attention.reference import sparse_kv_attention_ref

from helpers import DEVICE
from helpers import assert_2x_rule
from helpers import assert_checked_matches_default
from helpers import assert_public_op_matches_registered
from helpers import assert_raw_op_raises_like_public
from helpers import close
from helpers import gen
from helpers import need_triton
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
def test_sparse_kv_attention_triton_matches_reference(dtype, heads, head_dim, n_q, seg0, seg1, layout):
    need_triton()
    from relaxkv_kernels.ops.sparse_kv_attention.triton import sparse_kv_attention_triton

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
    before = [t.clone() for t in (q, k_pool, v_pool, seg)]

    out = sparse_kv_attention_triton(q, k_pool, v_pool, seg, scale)

    for t, t0 in zip((q, k_pool, v_pool, seg), before):
        assert torch.equal(t, t0), "inputs of a non-mutating op changed"
    assert out.dtype == dtype and out.shape == q.shape
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


def test_sparse_kv_attention_triton_refuses_head_dim_below_16():
    """Backend-specific: tl.dot tiles need head_dim >= 16 (the reference takes any even head_dim); the public
    function and the raw op name the op, the argument and the constraint."""
    need_triton()
    g = gen(12)
    q, pool = randn(g, 1, 4, 1, 8, device=DEVICE), randn(g, 1, 8, 1, 8, device=DEVICE)
    seg = torch.tensor([[[0, 8, 0]]], dtype=torch.int32, device=DEVICE)
    assert_raw_op_raises_like_public("sparse_kv_attention", [q, pool, pool, seg, 0.25, "triton"], ValueError,
                                     "relaxkv.sparse_kv_attention: q: expected head_dim >= 16 for the Triton kernel")


# -------------------------------------------------------------------------------- impl="gather" vs fused


@pytest.mark.parametrize("scale", [None, 0.3], ids=["default_scale", "scale0.3"])
def test_gather_impl_matches_fused_on_cpu(scale):
    q, k_pool, v_pool, seg, total = _attention_case(gen(12))
    fused = rk.sparse_kv_attention(q, k_pool, v_pool, seg, scale, backend="reference", impl="fused")
    gather = rk.sparse_kv_attention(q, k_pool, v_pool, seg, scale, backend="reference", impl="gather", total=total)
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


def test_public_op_matches_registered_op():
    assert_public_op_matches_registered("sparse_kv_attention", _args(gen(1)), D**-0.5)  # the default scale


def test_fake_shape():
    out, _ = run_on_fakes("sparse_kv_attention", _args(gen(3)), 0.25)
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


def test_bad_scale_type():
    """A string scale: the public function names it; the raw op's schema refuses it first (torch's error)."""
    with pytest.raises(TypeError, match="scale: expected a float"):
        rk.sparse_kv_attention(*_args(gen(5)), "0.1")
    with pytest.raises(RuntimeError, match="argument 'scale'"):
        torch.ops.relaxkv.sparse_kv_attention(*_args(gen(5)), "0.1", "reference")


def test_checked_true_matches_default():
    assert_checked_matches_default("sparse_kv_attention", [*_args(gen(6)), 0.3, "reference"])
