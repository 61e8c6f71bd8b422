"""relaxkv::gather_kv_rope and relaxkv::gather_kv_rope_into: the K (delta-rotated) and V rows of a segment table,
gathered into contiguous tensors (new ones, or given buffers such as a slice of an attention window).

The reference against a literal slice + cat + delta RoPE; the CUDA kernel (``kernel_device``) against the
reference with NaN-poisoned outputs, ragged and long tables, block boundaries, rows outside the pool, a
slice of a larger buffer; the Triton kernel where the op has one; registration of both ops and bad inputs
(public functions and raw ops alike). FP8 pools (float8_e4m3fn codes + fp32 scales per row and head, rows
the table does not list poisoned in codes and scales) the same way, into fp32 / fp16 / bf16 outputs.
"""
import pytest
import torch

import relaxkv_kernels as rk
from relaxkv_kernels.geometry import apply_delta_rope
from relaxkv_kernels.ops.fp8 import dequantize_fp8
from relaxkv_kernels.ops.gather_kv_rope.cuda import gather_kv_rope_cuda
from relaxkv_kernels.ops.gather_kv_rope.op import BACKENDS
from relaxkv_kernels.ops.gather_kv_rope.reference import gather_kv_rope_ref
from relaxkv_kernels.ops.gather_kv_rope.reference import gather_segments_ref

from helpers import DEVICE
from helpers import DTYPE_IDS
from helpers import DTYPES
from helpers import FP8
from helpers import assert_checked_matches_default
from helpers import assert_public_op_matches_registered
from helpers import assert_raw_op_raises_like_public
from helpers import assert_strided_inputs_match_reference
from helpers import close
from helpers import fp8_pool
from helpers import gen
from helpers import need_triton
from helpers import on
from helpers import poison_fp8
from helpers import ragged_table
from helpers import randn
from helpers import raw_op_tests
from helpers import replace
from helpers import run_on_fakes
from helpers import seg_storage
from helpers import seg_view
from helpers import strided

B, H, D = 2, 2, 16
WAN_F, WAN_H, WAN_D = 1560, 12, 128


def _args(g: torch.Generator) -> list:
    """Small valid arguments: pools of 80 rows, ragged tables of 23 rows per batch element (an unused entry)."""
    seg = torch.tensor([[[0, 16, 3], [40, 7, -2], [0, 0, 0]], [[16, 1, 0], [60, 20, 5], [33, 2, 1]]], dtype=torch.int32)
    return [randn(g, B, 80, H, D), randn(g, B, 80, H, D), seg, 23]


def _into_args(g: torch.Generator) -> list:
    """``_args`` for gather_kv_rope_into: the outputs as [B, 23, H, D] buffers of NaN instead of ``total``."""
    k_pool, v_pool, seg, total = _args(g)
    out = torch.full((B, total, H, D), float("nan"))
    return [k_pool, v_pool, seg, out, out.clone()]


def _gather_cuda(k_pool, v_pool, seg, total, fill=float("nan")):
    """gather_kv_rope_cuda into new [B, total, H, D] outputs filled with ``fill``: (k, v)."""
    shape = (k_pool.shape[0], total, *k_pool.shape[2:])
    k = torch.full(shape, fill, dtype=k_pool.dtype, device=k_pool.device)
    v = torch.full(shape, fill, dtype=k_pool.dtype, device=k_pool.device)
    gather_kv_rope_cuda(k_pool, v_pool, seg, k, v)
    return k, v


def _check_cuda(k_pool, v_pool, seg, total, dtype):
    """gather_kv_rope_cuda against the reference (fp64 K math), inputs unchanged; returns (k, v)."""
    k_pool0, v_pool0, seg0 = k_pool.clone(), v_pool.clone(), seg.clone()
    k, v = _gather_cuda(k_pool, v_pool, seg, total)
    k_ref, v_ref = gather_kv_rope_ref(k_pool.double(), v_pool, seg, total)
    close(k, k_ref, dtype, "k")
    assert torch.equal(v, v_ref)
    assert torch.equal(k_pool, k_pool0) and torch.equal(v_pool, v_pool0) and torch.equal(seg, seg0)
    return k, v


# ---------------------------------------------------------------------------------- reference vs literal


def _gather_literal(k_pool, v_pool, seg):
    """Slice + cat + apply_delta_rope, one batch element at a time: what the Relax code does on every call."""
    ks, vs = [], []
    for b in range(k_pool.shape[0]):
        kb, vb = [], []
        for start, length, delta in seg[b].tolist():
            if length == 0:
                continue
            kb.append(apply_delta_rope(k_pool[b, start:start + length], torch.full((length,), float(delta))))
            vb.append(v_pool[b, start:start + length])
        ks.append(torch.cat(kb))
        vs.append(torch.cat(vb))
    return torch.stack(ks), torch.stack(vs)


@pytest.mark.parametrize("batch, heads, head_dim", [(1, 1, 8), (2, 3, 128), (3, 2, 64)],
                         ids=["single_head-d8", "b2-wan_d", "b3-d64"])
def test_gather_kv_rope_ref_matches_literal(batch, heads, head_dim):
    g = gen(10)
    k_pool = randn(g, batch, 90, heads, head_dim, dtype=torch.float64)
    v_pool = randn(g, batch, 90, heads, head_dim, dtype=torch.float64)
    seg, total = ragged_table(batch, 90, g)
    k, v = gather_kv_rope_ref(k_pool, v_pool, seg, total)
    k_lit, v_lit = _gather_literal(k_pool, v_pool, seg)
    assert k.shape == (batch, total, heads, head_dim) and k.is_contiguous() and v.is_contiguous()
    torch.testing.assert_close(k, k_lit, rtol=1e-12, atol=1e-12)
    assert torch.equal(v, v_lit)


def test_gather_segments_ref_order():
    g = gen(320)
    k_pool, v_pool = randn(g, 40, 2, 32), randn(g, 40, 2, 32)
    seg = torch.tensor([[30, 3, -4], [2, 1, 0], [10, 0, 5], [5, 7, 11]], dtype=torch.int32)
    k, v = gather_segments_ref(k_pool, v_pool, seg)
    rows = list(range(30, 33)) + [2] + list(range(5, 12))
    deltas = [-4.0] * 3 + [0.0] + [11.0] * 7
    assert k.shape == v.shape == (11, 2, 32)
    assert torch.equal(v, v_pool[rows])
    for i, (r, dl) in enumerate(zip(rows, deltas)):
        torch.testing.assert_close(k[i], apply_delta_rope(k_pool[r:r + 1], torch.tensor([dl]))[0], rtol=0, atol=0)
    assert torch.equal(k[3], k_pool[2])  # delta 0: unchanged
    assert torch.equal(k[..., 12:], k_pool[rows][..., 12:])  # D = 32: only the 12 temporal dims move


def test_gather_kv_rope_public_op_matches_reference():
    g = gen(11)
    k_pool, v_pool = randn(g, 2, 90, 2, 32), randn(g, 2, 90, 2, 32)
    seg, total = ragged_table(2, 90, g)
    k0, v0, s0 = k_pool.clone(), v_pool.clone(), seg.clone()
    k, v = rk.gather_kv_rope(k_pool, v_pool, seg, total)
    k_ref, v_ref = gather_kv_rope_ref(k_pool, v_pool, seg, total)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
    assert torch.equal(k_pool, k0) and torch.equal(v_pool, v0) and torch.equal(seg, s0)


# ------------------------------------------------------------------------------- Triton vs reference


@pytest.mark.skipif(BACKENDS.triton is None, reason="gather_kv_rope has no Triton kernel")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_gather_kv_rope_triton_matches_reference(dtype):
    """The Triton backend through the public op (fp32 / fp16: the interpreter computes bf16 wrongly)."""
    need_triton()
    g = gen(15)
    k_pool, v_pool = (strided(randn(g, 2, 90, 3, 32, dtype=dtype, device=DEVICE), "strided") for _ in range(2))
    seg, total = ragged_table(2, 90, g)
    seg = seg.to(DEVICE)
    k, v = rk.gather_kv_rope(k_pool, v_pool, seg, total, backend="triton")
    k_ref, v_ref = gather_kv_rope_ref(k_pool.double(), v_pool, seg, total)
    close(k, k_ref, dtype, "k")
    assert torch.equal(v, v_ref)


STREAM_SEG = [[[3, 7, 100000], [40, 5, -100000], [60, 9, 2**24 - 1], [20, 4, 0]]]  # a long stream's re-index deltas


def _stream_inputs(dev) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = gen(16)
    k_pool, v_pool = (randn(g, 1, 80, 2, 64, device=dev) for _ in range(2))
    return k_pool, v_pool, torch.tensor(STREAM_SEG, dtype=torch.int32, device=dev)


def test_gather_kv_rope_triton_at_stream_deltas():
    """Deltas of 10^5 and 2^24 - 1 (a sink re-indexed next to a chunk far into a stream): fp32 rotation to fp32
    rounding of the float64 reference (the temporal angles are reduced in fp64; in fp32 they were 3e-3 rad off)."""
    need_triton()
    k_pool, v_pool, seg = _stream_inputs(DEVICE)
    k, v = rk.gather_kv_rope(k_pool, v_pool, seg, 25, backend="triton")
    k_ref, v_ref = gather_kv_rope_ref(k_pool.double(), v_pool, seg, 25)
    close(k, k_ref, torch.float32, "k")
    assert torch.equal(v, v_ref)


def test_gather_kv_rope_cuda_at_stream_deltas(kernel_device):
    _check_cuda(*_stream_inputs(kernel_device), 25, torch.float32)


# --------------------------------------------------------------------------------- CUDA vs reference


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout, batch, heads, head_dim", [
    ("contiguous", 2, 3, 128), ("strided", 3, 2, 128), ("unaligned", 1, 1, 64),
], ids=["contiguous-b2", "strided-b3", "unaligned-d64"])
def test_gather_kv_rope_cuda_matches_reference(kernel_device, dtype, layout, batch, heads, head_dim):
    g = gen(23)
    k_pool = strided(randn(g, batch, 150, heads, head_dim, dtype=dtype, device=kernel_device), layout)
    v_pool = strided(randn(g, batch, 150, heads, head_dim, dtype=dtype, device=kernel_device), layout)
    seg, total = ragged_table(batch, 150, g)
    _check_cuda(k_pool, v_pool, seg.to(kernel_device), total, dtype)


def test_gather_kv_rope_cuda_uncovered_rows_are_nan_not_out_of_bounds(kernel_device):
    """total > the table's rows: an error the host cannot see; the kernel writes NaN there, nothing else."""
    dev = kernel_device
    k_pool = randn(gen(24), 2, 40, 2, 64, dtype=torch.bfloat16, device=dev)
    seg = torch.tensor([[[0, 5, 2], [10, 4, 0]], [[3, 9, -1], [0, 0, 0]]], dtype=torch.int32, device=dev)
    k, v = _gather_cuda(k_pool, k_pool, seg, 20, fill=0.0)  # zeros: the NaN rows are the kernel's writes
    k_ref, v_ref = gather_kv_rope_ref(k_pool, k_pool, seg, 9)
    close(k[:, :9], k_ref, torch.bfloat16, "covered k rows")
    assert torch.equal(v[:, :9], v_ref)
    assert k[:, 9:].isnan().all() and v[:, 9:].isnan().all()


def _long_table(batch: int, n_seg: int, n_rows: int, g: torch.Generator) -> tuple[torch.Tensor, int]:
    """n_seg (> 32) segments of 0 .. 3 rows, empty around the 32-wide scan steps, the same total for every
    batch element (permuted lengths), random starts and deltas of both signs."""
    lens = torch.randint(0, 4, (n_seg,), generator=g)
    lens[[s for s in (31, 32, 63, 64) if s < n_seg]] = 0
    lens[[s for s in (30, 33, 65) if s < n_seg]] = 2
    table = torch.zeros(batch, n_seg, 3, dtype=torch.int32)
    for b in range(batch):
        lb = lens if b == 0 else lens[torch.randperm(n_seg, generator=g)]
        table[b, :, 1] = lb.int()
        table[b, :, 0] = (torch.rand(n_seg, generator=g) * (n_rows - lb + 1)).int()
        table[b, :, 2] = torch.randint(-40, 40, (n_seg,), generator=g).int()
    return table, int(lens.sum())


@pytest.mark.parametrize("dtype, layout, batch, heads, head_dim, n_seg", [
    (torch.float16, "contiguous", 2, 2, 32, 70),  # 3 scan steps; VEC 8: temporal pairs (6) end inside a vector
    (torch.float32, "strided", 2, 3, 40, 40),  # 2 scan steps; VEC 4 on a pair-split boundary (8 temporal pairs)
    (torch.bfloat16, "contiguous", 1, 1, 512, 36),  # max head_dim: 86 temporal pairs end inside vector 21
    (torch.float32, "unaligned", 3, 2, 10, 34),  # scalar path, 3 temporal pairs
    (torch.float16, "unaligned", 2, 1, 2, 33),  # D = 2: the single pair is temporal
], ids=["70seg-fp16-d32", "40seg-strided-fp32-d40", "36seg-bf16-d512", "34seg-scalar-fp32-d10", "33seg-fp16-d2"])
def test_gather_kv_rope_cuda_long_tables(kernel_device, dtype, layout, batch, heads, head_dim, n_seg):
    dev, n_rows = kernel_device, 60
    g = gen(45)
    k_pool = strided(randn(g, batch, n_rows, heads, head_dim, dtype=dtype, device=dev), layout)
    v_pool = strided(randn(g, batch, n_rows, heads, head_dim, dtype=dtype, device=dev), layout)
    table, total = _long_table(batch, n_seg, n_rows, g)
    assert total > 2 * 16  # several blocks of kGatherRows rows
    seg = seg_view(seg_storage(batch, n_seg, "view", g, dev), "view")  # s_ss = 2, s_sf = 2 n_seg + 1
    seg.copy_(table)
    _check_cuda(k_pool, v_pool, seg, total, dtype)


@pytest.mark.parametrize("total", [16, 32, 5], ids=["one_full_block", "two_full_blocks", "partial_block"])
def test_gather_kv_rope_cuda_block_boundaries(kernel_device, total):
    dev = kernel_device
    g = gen(46)
    k_pool, v_pool = (randn(g, 2, 40, 2, 64, dtype=torch.bfloat16, device=dev) for _ in range(2))
    a = total // 3
    seg = torch.tensor([[[30, a, -7], [0, 0, 3], [2, total - a, 0]],
                        [[39, 1, 25], [5, total - 1, -30], [0, 0, 0]]], dtype=torch.int32, device=dev)
    _check_cuda(k_pool, v_pool, seg, total, torch.bfloat16)


def test_gather_kv_rope_cuda_rows_outside_the_pool_are_nan(kernel_device):
    """Kernel contract (csrc/gather_kv_rope.cuh): a source row outside the pool (negative start, start + length
    past n_rows) gives a NaN output row and is not read; a negative length counts as 0."""
    dev, n_rows = kernel_device, 20
    g = gen(47)
    k_pool, v_pool = randn(g, 2, n_rows, 2, 16, device=dev), randn(g, 2, n_rows, 2, 16, device=dev)
    seg = torch.tensor([[[-3, 5, 4], [7, -2, 1], [18, 4, -5]],  # rows -3 .. 1, nothing, 18 .. 21
                        [[4, 3, 0], [16, 6, 2], [0, 0, 0]]], dtype=torch.int32, device=dev)
    k, v = _gather_cuda(k_pool, v_pool, seg, 9, fill=0.0)
    clipped = torch.tensor([[[0, 2, 4], [18, 2, -5]], [[4, 3, 0], [16, 4, 2]]], dtype=torch.int32, device=dev)
    for b, bad in enumerate([[0, 1, 2, 7, 8], [7, 8]]):
        good = [r for r in range(9) if r not in bad]
        assert k[b, bad].isnan().all() and v[b, bad].isnan().all()
        kb, vb = gather_kv_rope_ref(k_pool[b:b + 1].double(), v_pool[b:b + 1], clipped[b:b + 1], len(good))
        close(k[b, good], kb[0], torch.float32, f"k[{b}]")
        assert torch.equal(v[b, good], vb[0])


def test_gather_kv_rope_cuda_at_wan_shapes(kernel_device):
    """Frames of 1560 rows and compressed blocks of 182 (neither a multiple of the 16-row tile), hybrid deltas:
    2 sink frames, 4 of 12 archived blocks, 3 current frames."""
    dev, f, nc = kernel_device, WAN_F, 182
    g = gen(50)
    n_rows = 5 * f + 12 * nc
    k_pool, v_pool = (randn(g, 1, n_rows, WAN_H, WAN_D, dtype=torch.bfloat16, device=dev) for _ in range(2))
    mids = sorted(torch.randperm(12, generator=g)[:4].tolist())
    seg = torch.tensor([[[0, 2 * f, 296]] + [[5 * f + m * nc, nc, 40 - 4 * j] for j, m in enumerate(mids)]
                        + [[2 * f, 3 * f, 0]]], dtype=torch.int32, device=dev)
    total = 5 * f + 4 * nc
    k, v = _gather_cuda(k_pool, v_pool, seg, total)
    k_ref, v_ref = gather_kv_rope_ref(k_pool.float(), v_pool, seg, total)
    close(k, k_ref, torch.bfloat16, "k")
    assert torch.equal(v, v_ref)


def test_gather_kv_rope_cuda_rejects_outputs_with_gaps(kernel_device):
    """Backend-specific: k_out / v_out rows must be contiguous within a batch element (o_sb is the one free
    stride); a view with padded heads is refused with a clear error."""
    k_pool, v_pool, seg, total = on(kernel_device, _args(gen(25)))
    padded = torch.full((B, total, H + 1, D), float("nan"), device=kernel_device)[:, :, :H]
    with pytest.raises(ValueError, match="k_out: expected rows contiguous within a batch element"):
        gather_kv_rope_cuda(k_pool, v_pool, seg, padded, torch.empty_like(padded))


# ------------------------------------------------------------------------------- into a slice of a buffer


def _check_into_slice(backend: str, device: str, fp8: bool = False):
    """gather_kv_rope_into writes a slice [:, 5:5 + total] of a longer window (batch stride not total * H * D)
    exactly as gather_kv_rope returns it; the rest of the window is untouched. ``fp8``: FP8 memory staged into a
    bf16 window, as the cache's window mode does."""
    if fp8:
        g = gen(67)
        seg, total = ragged_table(2, 90, g)
        k_pool, v_pool, *scales = _fp8_args(g, 2, 90, H, 32, seg, device)
        seg, shape, dtype = seg.to(device), (2, total + 13, H, 32), torch.bfloat16
    else:
        k_pool, v_pool, seg, total = on(device, _args(gen(26)))
        g, scales, shape, dtype = gen(27), [None, None], (B, 40, H, D), torch.float32
    win_k, win_v = (randn(g, *shape, dtype=dtype, device=device) for _ in range(2))
    win_k[:, 5:5 + total] = win_v[:, 5:5 + total] = float("nan")
    k0, v0 = win_k.clone(), win_v.clone()
    rk.gather_kv_rope_into(k_pool, v_pool, seg, win_k[:, 5:5 + total], win_v[:, 5:5 + total], backend=backend,
                           k_pool_scale=scales[0], v_pool_scale=scales[1])
    if fp8:
        k_ref, v_ref = gather_kv_rope_ref(k_pool, v_pool, seg, total, *scales)
        _check_fp8_out(win_k[:, 5:5 + total], win_v[:, 5:5 + total], k_ref, v_ref, dtype)
    else:
        k_ref, v_ref = gather_kv_rope_ref(k_pool.double(), v_pool, seg, total)
        close(win_k[:, 5:5 + total], k_ref, torch.float32, "k slice")
        assert torch.equal(win_v[:, 5:5 + total], v_ref)
    rest = torch.ones(shape[1], dtype=torch.bool)
    rest[5:5 + total] = False
    assert torch.equal(win_k[:, rest], k0[:, rest]) and torch.equal(win_v[:, rest], v0[:, rest])


def test_into_a_slice_of_a_larger_buffer_reference():
    _check_into_slice("reference", "cpu")


def test_into_a_slice_of_a_larger_buffer_cuda(kernel_device):
    _check_into_slice("cuda", kernel_device)


def test_last_dim_strided_inputs_cuda(kernel_device):
    """k_pool and v_pool with stride(-1) == 2 (accepted by the public op; the wrapper copies them to unit rows)."""
    assert_strided_inputs_match_reference("gather_kv_rope", on(kernel_device, _args(gen(10))), (0, 1), "cuda")


# ------------------------------------------------------------------------------------------ registration


def test_opcheck():
    torch.library.opcheck(torch.ops.relaxkv.gather_kv_rope.default, (*_args(gen(0)), "reference"))


def test_opcheck_into():
    torch.library.opcheck(torch.ops.relaxkv.gather_kv_rope_into.default, (*_into_args(gen(0)), "reference"))


def test_public_ops_match_registered_ops():
    assert_public_op_matches_registered("gather_kv_rope", _args(gen(1)))
    assert_public_op_matches_registered("gather_kv_rope_into", _into_args(gen(1)))


def test_into_writes_what_gather_returns():
    into = _into_args(gen(2))
    rk.gather_kv_rope_into(*into)
    k, v = rk.gather_kv_rope(*_args(gen(2)))
    assert torch.equal(into[3], k) and torch.equal(into[4], v)


def test_fake_shapes():
    (k, v), _ = run_on_fakes("gather_kv_rope", _args(gen(3)))
    assert k.shape == v.shape == (B, 23, H, D) and k.dtype == torch.float32
    out, _ = run_on_fakes("gather_kv_rope_into", _into_args(gen(3)))
    assert out is None


# ------------------------------------------------------------------------------------------- bad input

_SEG = torch.tensor([[[0, 16, 3], [40, 7, -2]], [[16, 1, 0], [60, 20, 5]]], dtype=torch.int32)  # 23 and 21 rows
BAD = [  # (argument index, replacement, error type, message fragment)
    pytest.param(3, 24, ValueError, "total: expected sum\\(length\\).*\\[23, 23\\], got 24", id="total_mismatch"),
    pytest.param(3, 0, ValueError, "total: expected an int in \\[1", id="total_zero"),
    pytest.param(2, _SEG, ValueError, "\\[23, 21\\], got 23", id="ragged_totals"),
    pytest.param(2, _SEG.long(), TypeError, "seg: expected dtype", id="seg_int64"),
    pytest.param(2, torch.tensor([[[76, 7, 0]], [[3, 7, 0]]], dtype=torch.int32), ValueError, "rows inside the pool",
                 id="seg_outside_pool"),
    pytest.param(2, torch.tensor([[[4, 0, 1], [9, 0, 2]]] * B, dtype=torch.int32), ValueError,
                 "at least one key row per batch element, got an empty table", id="seg_all_empty"),
    pytest.param(1, torch.randn(B, 80, H, D).half(), TypeError, "v_pool: expected dtype", id="v_pool_dtype"),
    pytest.param(1, torch.randn(B, 70, H, D), ValueError, "v_pool: expected shape", id="v_pool_shape"),
    pytest.param(0, torch.randn(B, 80, H, D - 1), ValueError, "head_dim must be a positive even", id="odd_head_dim"),
    pytest.param(2, _SEG.to("meta"), ValueError, "seg: expected tensors on cpu", id="seg_device"),
    pytest.param(4, "fused", ValueError, "backend: expected one of", id="backend_name"),
]


test_bad_input_raises_before_any_kernel, test_bad_total_type, test_checked_true_matches_default = raw_op_tests(
    "gather_kv_rope", _args, BAD, scalar=(3, 23.0, "total"))


BAD_INTO = [  # (argument index, replacement, error type, message fragment)
    pytest.param(2, torch.tensor([[[0, 17, 3], [40, 7, -2]], [[16, 2, 0], [60, 20, 5]]], dtype=torch.int32), ValueError,
                 "total: expected sum\\(length\\).*\\[24, 22\\], got 23", id="table_rows_not_out_rows"),
    pytest.param(2, torch.tensor([[[0, 23, 0]], [[70, 23, 0]]], dtype=torch.int32), ValueError, "rows inside the pool",
                 id="seg_outside_pool"),
    pytest.param(3, torch.randn(B, 23, H + 1, D), ValueError, "k_out: expected shape", id="k_out_heads"),
    pytest.param(4, torch.randn(B, 23, H, D).half(), TypeError, "v_out: expected dtype", id="v_out_dtype"),
    pytest.param(4, torch.randn(B, 22, H, D), ValueError, "v_out: expected shape", id="v_out_shape"),
    pytest.param(4, torch.randn(B, 23, H, D, device="meta"), ValueError, "v_out: expected tensors on cpu",
                 id="v_out_device"),
    pytest.param(5, "fused", ValueError, "backend: expected one of", id="backend_name"),
]


@pytest.mark.parametrize("index, value, exc, match", BAD_INTO)
def test_into_bad_input_raises_before_any_kernel(index, value, exc, match):
    """The public function and the raw op (torch.ops.relaxkv.gather_kv_rope_into) raise the same error."""
    args = replace([*_into_args(gen(5)), "auto"], index, value)
    assert_raw_op_raises_like_public("gather_kv_rope_into", args, exc, match)


def test_into_checked_true_matches_default():
    assert_checked_matches_default("gather_kv_rope_into", [*_into_args(gen(6)), "reference"])


# ------------------------------------------------------------------------------------------- FP8 pools



def _listed(seg: torch.Tensor, n_rows: int) -> torch.Tensor:
    """bool [B, n_rows]: the pool rows some segment of ``seg`` lists (rows outside the pool dropped)."""
    listed = torch.zeros(seg.shape[0], n_rows, dtype=torch.bool)
    for b, table in enumerate(seg.cpu().tolist()):
        for start, length, _ in table:
            listed[b, max(start, 0):max(min(start + length, n_rows), 0)] = True
    return listed


def _scale_view(scale: torch.Tensor, layout: str) -> torch.Tensor:
    """Scales [B, n_rows, H] as a contiguous tensor, or for other layouts a view with padded heads (strides
    (n_rows (H + 1), H + 1, 1): a kernel ignoring the scale strides reads the NaN padding)."""
    if layout == "contiguous":
        return scale.contiguous()
    b, n, h = scale.shape
    out = torch.full((b, n, h + 1), float("nan"), device=scale.device)[..., 1:]
    out.copy_(scale)
    return out


def _fp8_args(g: torch.Generator, batch: int, n_rows: int, heads: int, head_dim: int, seg: torch.Tensor,
              device="cpu", layout: str = "contiguous") -> list[torch.Tensor]:
    """[k_codes, v_codes, k_scale, v_scale]: random FP8 pools [B, n_rows, H, D] and fp32 scales [B, n_rows, H]
    (helpers.fp8_pool) laid out as ``layout``; rows ``seg`` does not list poisoned in codes and scales (NaN), so
    a kernel reading them writes NaN."""
    unread = ~_listed(seg, n_rows)
    pools = []
    for _ in range(2):
        codes, scale = fp8_pool(g, batch, n_rows, heads, head_dim)
        poison_fp8(codes, scale, unread)
        pools.append((strided(codes.to(device), layout), _scale_view(scale.to(device), layout)))
    (k, ks), (v, vs) = pools
    return [k, v, ks, vs]


def _fp8_copies(args: list[torch.Tensor]) -> list[torch.Tensor]:
    """FP8 pools and scales as comparable copies (torch.equal has no float8 kernel: codes as uint8)."""
    return [a.view(torch.uint8).clone() if a.dtype == FP8 else a.clone() for a in args]


def _assert_unchanged(args: list[torch.Tensor], copies: list[torch.Tensor]) -> None:
    for a, c in zip(args, copies):
        torch.testing.assert_close(a.view(torch.uint8) if a.dtype == FP8 else a, c, rtol=0, atol=0, equal_nan=True)


def _close_rows(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """``got`` within :data:`helpers.TOL` of ``dtype`` of ``want``, relative to the largest magnitude of each row
    and head: FP8 rows span 2^-6 .. 2^6 from row to row, and the fp32 rotation error of a pair scales with the
    pair's magnitude, not with a component that cancels to ~0."""
    amax = want.double().abs().amax(-1, keepdim=True)
    close(got.double() / amax, want.double() / amax, dtype, what)


def _check_fp8_out(k, v, k_ref, v_ref, dtype, what=""):
    """Kernel outputs (``dtype``) against the reference's fp32 rows: K (fp32 rotation vs float64) by
    :func:`_close_rows`; V exactly (code * scale is exact in fp32, then one round to nearest even, as torch casts)."""
    assert k.dtype == v.dtype == dtype
    _close_rows(k, k_ref, dtype, f"{what} k")
    assert torch.equal(v.cpu(), v_ref.to(dtype).cpu()), f"{what} v"


@pytest.mark.parametrize("batch, heads, head_dim", [(1, 1, 8), (2, 3, 64)], ids=["single_head-d8", "b2-d64"])
def test_gather_kv_rope_ref_fp8_matches_literal(batch, heads, head_dim):
    """FP8 pools: dequantize_fp8 of the whole pool, then the literal slice + cat + delta RoPE (unread rows are
    NaN there, so the reference reading one would show)."""
    g = gen(60)
    seg, total = ragged_table(batch, 90, g)
    kc, vc, ks, vs = _fp8_args(g, batch, 90, heads, head_dim, seg)
    k, v = gather_kv_rope_ref(kc, vc, seg, total, ks, vs)
    k_lit, v_lit = _gather_literal(dequantize_fp8(kc, ks), dequantize_fp8(vc, vs), seg)
    assert k.dtype == v.dtype == torch.float32 and k.shape == (batch, total, heads, head_dim)
    assert torch.equal(k, k_lit) and torch.equal(v, v_lit)  # the same fp32 values through the same float64 math


def test_gather_segments_ref_fp8_reads_only_listed_rows():
    g = gen(61)
    seg = torch.tensor([[[30, 3, -4], [2, 1, 0], [10, 0, 5]]], dtype=torch.int32)
    kc, vc, ks, vs = _fp8_args(g, 1, 40, 2, 32, seg)
    k, v = gather_segments_ref(kc[0], vc[0], seg[0], ks[0], vs[0])
    rows = [30, 31, 32, 2]
    assert k.dtype == torch.float32 and not k.isnan().any()
    assert torch.equal(v, dequantize_fp8(vc[0, rows], vs[0, rows]))
    assert torch.equal(k[3], dequantize_fp8(kc[0, 2], ks[0, 2]))  # delta 0: the dequantized row


def test_gather_kv_rope_fp8_public_ops_reference():
    """rk.gather_kv_rope returns the dequantized rows in float32; rk.gather_kv_rope_into rounds them once into
    bf16 buffers (the cache's window); inputs unchanged."""
    g = gen(62)
    seg, total = ragged_table(2, 90, g)
    args = _fp8_args(g, 2, 90, 2, 32, seg)
    kc, vc, ks, vs = args
    copies = _fp8_copies(args)
    k, v = rk.gather_kv_rope(kc, vc, seg, total, k_pool_scale=ks, v_pool_scale=vs)
    k_ref, v_ref = gather_kv_rope_ref(kc, vc, seg, total, ks, vs)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref) and k.dtype == torch.float32
    k_out = torch.full((2, total, 2, 32), float("nan"), dtype=torch.bfloat16)
    v_out = k_out.clone()
    rk.gather_kv_rope_into(kc, vc, seg, k_out, v_out, k_pool_scale=ks, v_pool_scale=vs)
    assert torch.equal(k_out, k_ref.bfloat16()) and torch.equal(v_out, v_ref.bfloat16())
    _assert_unchanged(args, copies)


@pytest.mark.skipif(BACKENDS.triton is None, reason="gather_kv_rope has no Triton kernel")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("decode", ["converter", "software"])
def test_gather_kv_rope_fp8_triton_matches_reference(dtype, layout, decode, monkeypatch):
    """FP8 pools into fp32 / fp16 buffers (the interpreter computes bf16 wrongly); fp32: gather_kv_rope's new
    tensors too. "software": the codes read through uint8 views and decoded from their bits, as on sm_80 / sm_86."""
    need_triton()
    if decode == "software":
        from relaxkv_kernels.ops.gather_kv_rope import triton as kernel

        monkeypatch.setattr(kernel, "fp8_codes", lambda pool: pool.view(torch.uint8))
    g = gen(63)
    seg, total = ragged_table(2, 90, g)
    args = _fp8_args(g, 2, 90, 3, 32, seg, DEVICE, layout)
    kc, vc, ks, vs = args
    copies = _fp8_copies(args)
    seg = seg.to(DEVICE)
    k, v = (torch.full((2, total, 3, 32), float("nan"), dtype=dtype, device=DEVICE) for _ in range(2))
    rk.gather_kv_rope_into(kc, vc, seg, k, v, backend="triton", k_pool_scale=ks, v_pool_scale=vs)
    k_ref, v_ref = gather_kv_rope_ref(kc, vc, seg, total, ks, vs)
    _check_fp8_out(k, v, k_ref, v_ref, dtype, "into")
    if dtype == torch.float32:
        kn, vn = rk.gather_kv_rope(kc, vc, seg, total, backend="triton", k_pool_scale=ks, v_pool_scale=vs)
        assert torch.equal(kn, k) and torch.equal(vn, v)
    _assert_unchanged(args, copies)


def _gather_cuda_fp8(args, seg, total, dtype, fill=float("nan")):
    """gather_kv_rope_cuda on FP8 ``args`` (codes and scales) into new [B, total, H, D] ``dtype`` outputs filled
    with ``fill``: (k, v)."""
    kc, vc, ks, vs = args
    shape = (kc.shape[0], total, *kc.shape[2:])
    k, v = (torch.full(shape, fill, dtype=dtype, device=kc.device) for _ in range(2))
    gather_kv_rope_cuda(kc, vc, seg, k, v, ks, vs)
    return k, v


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout, heads, head_dim", [
    ("contiguous", 3, 128),  # 16 codes per 16-byte load, 2 loads cover the 22 temporal pairs
    ("strided", 2, 32),  # padded heads, still 16-byte aligned: wide
    ("unaligned", 1, 64),  # odd byte offset: 2 codes per item
    ("contiguous", 2, 40),  # head_dim not a multiple of 16: 2 codes per item, outputs aligned
], ids=["contiguous-d128", "strided-d32", "unaligned-d64", "contiguous-d40"])
def test_gather_kv_rope_cuda_fp8_matches_reference(kernel_device, dtype, layout, heads, head_dim):
    g = gen(64)
    seg, total = ragged_table(2, 150, g)
    args = _fp8_args(g, 2, 150, heads, head_dim, seg, kernel_device, layout)
    copies = _fp8_copies(args)
    seg = seg.to(kernel_device)
    k, v = _gather_cuda_fp8(args, seg, total, dtype)
    k_ref, v_ref = gather_kv_rope_ref(*args[:2], seg, total, *args[2:])
    _check_fp8_out(k, v, k_ref, v_ref, dtype)
    _assert_unchanged(args, copies)


def test_gather_kv_rope_cuda_fp8_long_table(kernel_device):
    """70 segments (3 scan steps) over several 16-row blocks, fp16 outputs, D = 32 (6 temporal pairs inside the
    first 16 codes)."""
    g = gen(65)
    table, total = _long_table(2, 70, 60, g)
    args = _fp8_args(g, 2, 60, 2, 32, table, kernel_device)
    seg = table.to(kernel_device)
    k, v = _gather_cuda_fp8(args, seg, total, torch.float16)
    k_ref, v_ref = gather_kv_rope_ref(*args[:2], seg, total, *args[2:])
    _check_fp8_out(k, v, k_ref, v_ref, torch.float16)


def test_gather_kv_rope_cuda_fp8_rows_outside_the_pool_are_nan(kernel_device):
    """The kernel contract with FP8 pools: a source row outside the pool gives a NaN output row (bf16 outputs
    filled with zeros first, so the NaN rows are the kernel's writes) and its codes and scale are not read."""
    dev, n_rows = kernel_device, 20
    seg = torch.tensor([[[-3, 5, 4], [7, -2, 1], [18, 4, -5]],  # rows -3 .. 1, nothing, 18 .. 21
                        [[4, 3, 0], [16, 6, 2], [0, 0, 0]]], dtype=torch.int32)
    args = _fp8_args(gen(66), 2, n_rows, 2, 16, seg, dev)
    k, v = _gather_cuda_fp8(args, seg.to(dev), 9, torch.bfloat16, fill=0.0)
    clipped = torch.tensor([[[0, 2, 4], [18, 2, -5]], [[4, 3, 0], [16, 4, 2]]], dtype=torch.int32)
    for b, bad in enumerate([[0, 1, 2, 7, 8], [7, 8]]):
        good = [r for r in range(9) if r not in bad]
        assert k[b, bad].isnan().all() and v[b, bad].isnan().all()
        one = [a[b:b + 1] for a in args]
        kb, vb = gather_kv_rope_ref(*one[:2], clipped[b:b + 1], len(good), *one[2:])
        _check_fp8_out(k[b, good], v[b, good], kb[0], vb[0], torch.bfloat16, f"batch {b}")


def test_fp8_into_a_slice_of_a_bf16_window_reference():
    _check_into_slice("reference", "cpu", fp8=True)


def test_fp8_into_a_slice_of_a_bf16_window_cuda(kernel_device):
    _check_into_slice("cuda", kernel_device, fp8=True)


def _fp8_op_args(g: torch.Generator) -> list:
    """Valid arguments of the raw gather_kv_rope with FP8 pools (``_args``' table): k, v, seg, 23, "auto", scales."""
    seg = _args(gen(0))[2]
    kc, vc, ks, vs = _fp8_args(g, B, 80, H, D, seg)
    return [kc, vc, seg, 23, "auto", ks, vs]


def _fp8_into_args(g: torch.Generator) -> list:
    """:func:`_fp8_op_args` for gather_kv_rope_into: bf16 [B, 23, H, D] outputs of NaN instead of ``total``."""
    args = _fp8_op_args(g)
    args[3:4] = [torch.full((B, 23, H, D), float("nan"), dtype=torch.bfloat16)] * 2
    args[4] = args[3].clone()
    return args


def test_opcheck_fp8():
    """Registration with FP8 pools; torch's schema test is left out: it compares the inputs with allclose, which
    has no float8 kernel on the CPU (NotImplementedError "mul_cpu_reduced_float")."""
    utils = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    args = _fp8_op_args(gen(0))
    torch.library.opcheck(torch.ops.relaxkv.gather_kv_rope.default, (*args[:4], "reference", *args[5:]),
                          test_utils=utils)
    into = _fp8_into_args(gen(0))
    torch.library.opcheck(torch.ops.relaxkv.gather_kv_rope_into.default, (*into[:5], "reference", *into[6:]),
                          test_utils=utils)


def test_fake_shapes_fp8():
    """gather_kv_rope's new tensors are float32 for FP8 pools (the registered fake, on fake tensors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = _fp8_op_args(gen(3))
    with FakeTensorMode() as mode:
        k, v = torch.ops.relaxkv.gather_kv_rope(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                                                  for a in args))
    assert k.shape == v.shape == (B, 23, H, D) and k.dtype == v.dtype == torch.float32


_F = torch.randn(B, 80, H, D)
BAD_FP8 = [  # ({argument index: replacement}, error type, message fragment); raw op arguments as _fp8_op_args
    pytest.param({5: None}, ValueError, "k_pool_scale: expected the float32 \\[B, n_rows, H\\] scales",
                 id="no_k_scale"),
    pytest.param({6: None}, ValueError, "v_pool_scale: expected the float32", id="no_v_scale"),
    pytest.param({0: _F, 1: _F}, ValueError, "k_pool_scale: expected None for a torch.float32 k_pool",
                 id="scales_with_float_pools"),
    pytest.param({1: _F, 6: None}, TypeError,
                 "v_pool: expected dtype in \\['torch.float8_e4m3fn'\\], got torch.float32", id="k_fp8_v_float"),
    pytest.param({0: _F, 5: None}, TypeError, "v_pool: expected dtype in \\['torch.float32'\\], got torch.float8",
                 id="k_float_v_fp8"),
    pytest.param({5: torch.rand(B, 80, H + 1)}, ValueError, "k_pool_scale: expected shape \\[2, 80, 2\\]",
                 id="k_scale_shape"),
    pytest.param({6: torch.rand(B, 79, H)}, ValueError, "v_pool_scale: expected shape", id="v_scale_shape"),
    pytest.param({5: torch.rand(B, 80, H).half()}, TypeError, "k_pool_scale: expected dtype in \\['torch.float32'\\]",
                 id="k_scale_dtype"),
    pytest.param({6: torch.rand(B, 80, H, device="meta")}, ValueError, "v_pool_scale: expected a tensor on cpu",
                 id="v_scale_device"),
]


@pytest.mark.parametrize("into", [False, True], ids=["gather", "into"])
@pytest.mark.parametrize("change, exc, match", BAD_FP8)
def test_fp8_bad_input_raises_before_any_kernel(into, change, exc, match):
    """Both ops, public function and raw op alike (the into op has one argument more before the scales)."""
    args = _fp8_into_args(gen(7)) if into else _fp8_op_args(gen(7))
    for i, value in change.items():
        args[i + into if i > 3 else i] = value
    assert_raw_op_raises_like_public("gather_kv_rope_into" if into else "gather_kv_rope", args, exc, match)


@pytest.mark.parametrize("index, value, match", [
    (3, torch.zeros(B, 23, H, D, dtype=FP8), "k_out: expected dtype in \\['torch.float16', 'torch.bfloat16', "
                                              "'torch.float32'\\], got torch.float8"),
    (4, torch.zeros(B, 23, H, D, dtype=torch.float16), "v_out: expected dtype in \\['torch.bfloat16'\\]"),
], ids=["k_out_fp8", "v_out_other_dtype"])
def test_fp8_into_bad_outputs(index, value, match):
    """FP8 pools: outputs of any compute dtype, the same for k_out and v_out."""
    args = replace(_fp8_into_args(gen(8)), index, value)
    assert_raw_op_raises_like_public("gather_kv_rope_into", args, TypeError, match)
