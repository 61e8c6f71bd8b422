"""relaxkv::compress_kv: PackForcing 2x4x4 average pooling of a block's K and V into compressed pool rows.

The reference against literal pooling loops and a literal RoPE at the window centres; the Triton kernel
(interpreter on CPU) and the CUDA kernel (``kernel_device``) against the reference, with every row and
mean key they must write set to NaN and every other element checked unchanged; registration and the
bad inputs (public function and raw op alike). (The compressed grid and its positions are in test_geometry.py.)
"""
import pytest
import torch

import relaxkv_kernels as rk
from relaxkv_kernels.geometry import compressed_grid
from relaxkv_kernels.geometry import compressed_positions
from relaxkv_kernels.ops.compress_kv.cuda import compress_kv_cuda
from relaxkv_kernels.ops.compress_kv.reference import compress_kv_into_ref
from relaxkv_kernels.ops.compress_kv.reference import compress_kv_ref
from relaxkv_kernels.ops.fp8 import dequantize_fp8
from relaxkv_kernels.ops.fp8 import quantize_fp8

from helpers import DEVICE
from helpers import DTYPE_IDS
from helpers import DTYPES
from helpers import FP8
from helpers import assert_2x_rule
from helpers import assert_fp8_equal
from helpers import assert_int32_indices_match_int64
from helpers import assert_public_op_matches_registered
from helpers import assert_raw_op_raises_like_public
from helpers import assert_strided_inputs_match_reference
from helpers import backend_device
from helpers import close
from helpers import compare_with_triton
from helpers import fp8_pool
from helpers import gen
from helpers import literal_rope
from helpers import need_triton
from helpers import on
from helpers import poison_fp8
from helpers import randn
from helpers import raw_op_tests
from helpers import replace
from helpers import run_on_fakes
from helpers import strided

B, H, D = 2, 2, 16
WAN_F, WAN_H, WAN_D, WAN_HW = 1560, 12, 128, (30, 52)


def _args(g: torch.Generator) -> list:
    """Small valid arguments: a block of 4 frames of 8x8 (Nc = 8) into slot 2 of 4, compressed rows from 40."""
    k, v = randn(g, B, 4 * 64, H, D), randn(g, B, 4 * 64, H, D)
    k_pool, v_pool = randn(g, B, 200, H, D), randn(g, B, 200, H, D)
    return [k, v, k_pool, v_pool, randn(g, B, 4, H, D), torch.tensor([2]), torch.tensor([12]), 40, 4, 8, 8]


def _one(x: int, device, dtype=torch.int64) -> torch.Tensor:
    return torch.tensor([x], device=device, dtype=dtype)


# ---------------------------------------------------------------------------------- reference vs literal


def _literal_compress(x: torch.Tensor, t0: float, frames: int, height: int, width: int):
    """Average 2x4x4 windows with explicit loops: pooled float64 [B, Nc, H, D] and centres [Nc, 3]."""
    pooled, centres = [], []
    for tc in range(frames // 2):
        for yc in range(height // 4):
            for xc in range(width // 4):
                acc = 0
                for t in range(2 * tc, 2 * tc + 2):
                    for y in range(4 * yc, 4 * yc + 4):
                        for xx in range(4 * xc, 4 * xc + 4):
                            acc = acc + x[:, (t * height + y) * width + xx].double()
                pooled.append(acc / 32)
                centres.append([t0 + 2 * tc + 0.5, 4 * yc + 1.5, 4 * xc + 1.5])
    return torch.stack(pooled, dim=1), torch.tensor(centres, dtype=torch.float64)


@pytest.mark.parametrize("b, h, d, t0, frames, height, width", [
    pytest.param(1, 2, 32, 0.0, 2, 4, 4, id="one-window"),
    pytest.param(2, 2, 32, 8.0, 4, 6, 9, id="floors-4x6x9-B2"),
    pytest.param(1, 1, 128, 24.0, 5, 8, 12, id="D128-odd-frames"),
])
def test_compress_kv_ref_vs_literal(b, h, d, t0, frames, height, width):
    g = gen(500 + d + frames + width)
    n = frames * height * width
    k, v = randn(g, b, n, h, d), randn(g, b, n, h, d)
    k0, v0 = k.clone(), v.clone()
    ck, cv, mean_key = compress_kv_ref(k, v, t0, frames, height, width)
    pk, centres = _literal_compress(k, t0, frames, height, width)
    pv, _ = _literal_compress(v, t0, frames, height, width)
    nt, ny, nx = compressed_grid(frames, height, width)
    assert ck.shape == cv.shape == (b, nt * ny * nx, h, d)
    assert ck.dtype == k.dtype and cv.dtype == v.dtype and mean_key.dtype == torch.float32
    torch.testing.assert_close(compressed_positions(t0, frames, height, width), centres, rtol=0, atol=0)
    torch.testing.assert_close(cv.double(), pv, rtol=0, atol=1e-6)
    torch.testing.assert_close(ck.double(), literal_rope(pk, centres), rtol=0, atol=1e-6)
    torch.testing.assert_close(mean_key.double(), pk.mean(dim=1), rtol=0, atol=1e-6)
    assert torch.equal(k, k0) and torch.equal(v, v0)


def test_compress_kv_ref_ignores_tokens_outside_windows():
    """Tokens past the floors (last frame, last rows, last columns) do not enter any window."""
    g = gen(510)
    frames, height, width = 3, 5, 9
    k, v = randn(g, 1, frames * height * width, 1, 32), randn(g, 1, frames * height * width, 1, 32)
    ck, cv, mk = compress_kv_ref(k, v, 0.0, frames, height, width)
    grid = torch.arange(frames * height * width).view(frames, height, width)
    outside = torch.ones_like(grid, dtype=torch.bool)
    outside[:2, :4, :8] = False
    k2, v2 = k.clone(), v.clone()
    k2[:, grid[outside]] += 100.0
    v2[:, grid[outside]] -= 100.0
    ck2, cv2, mk2 = compress_kv_ref(k2, v2, 0.0, frames, height, width)
    assert torch.equal(ck, ck2) and torch.equal(cv, cv2) and torch.equal(mk, mk2)


@pytest.mark.parametrize("slot, t0, row0", [
    pytest.param(0, 0, 0, id="slot0-row0"),
    pytest.param(2, 36, 50, id="slot2-row50"),
])
def test_compress_kv_into_ref_writes_only_its_rows(slot, t0, row0):
    g = gen(800 + slot)
    b, h, d, frames, height, width, nc, n_blocks = 2, 2, 32, 4, 6, 9, 4, 3
    n_rows = row0 + n_blocks * nc + 5
    k, v = randn(g, b, frames * height * width, h, d), randn(g, b, frames * height * width, h, d)
    k_pool, v_pool, mean_key = randn(g, b, n_rows, h, d), randn(g, b, n_rows, h, d), randn(g, b, n_blocks, h, d)
    kp0, vp0, mk0 = k_pool.clone(), v_pool.clone(), mean_key.clone()
    compress_kv_into_ref(k, v, k_pool, v_pool, mean_key, torch.tensor([slot]), torch.tensor([t0]), row0, frames,
                         height, width)
    ck, cv, mk = compress_kv_ref(k, v, float(t0), frames, height, width)
    rows = torch.zeros(n_rows, dtype=torch.bool)
    rows[row0 + slot * nc:row0 + (slot + 1) * nc] = True
    assert torch.equal(k_pool[:, rows], ck) and torch.equal(v_pool[:, rows], cv)
    assert torch.equal(k_pool[:, ~rows], kp0[:, ~rows]) and torch.equal(v_pool[:, ~rows], vp0[:, ~rows])
    assert torch.equal(mean_key[:, slot], mk)
    others = [s for s in range(n_blocks) if s != slot]
    assert torch.equal(mean_key[:, others], mk0[:, others])


# ------------------------------------------------------------------------------- Triton vs reference


TRITON_CASES = pytest.mark.parametrize("dtype, heads, head_dim, frames, height, width, slot, t0, layout", [
    pytest.param(torch.float32, 2, 16, 2, 8, 8, 1, 6, "contiguous", id="fp32-exact-grid"),
    pytest.param(torch.float16, 2, 32, 3, 9, 10, 2, 11, "contiguous", id="fp16-floored-grid"),
    pytest.param(torch.float32, 1, 32, 4, 12, 16, 0, 0, "contiguous", id="fp32-two-tiles"),
    pytest.param(torch.float32, 1, 48, 4, 12, 16, 0, 0, "contiguous", id="fp32-D48-two-tiles"),
    pytest.param(torch.float16, 2, 32, 2, 4, 12, 3, 25, "fused_kv", id="fp16-noncontig-kv"),
    # a long stream: at t0 = 10^5 fp32 angles were 3e-3 rad off; the temporal ones are taken in fp64
    pytest.param(torch.float32, 2, 32, 2, 8, 8, 1, 100000, "contiguous", id="fp32-stream-t0"),
])


def _triton_kv(g, layout: str, n: int, heads: int, head_dim: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A block's k, v [2, n, H, D] on DEVICE: separate tensors, or interleaved in one fused buffer ("fused_kv")."""
    if layout == "fused_kv":
        k, v = randn(g, 2, n, heads, 2, head_dim, dtype=dtype, device=DEVICE).unbind(3)
        assert not (k.is_contiguous() or v.is_contiguous())
        return k, v
    return tuple(randn(g, 2, n, heads, head_dim, dtype=dtype, device=DEVICE) for _ in range(2))


@TRITON_CASES
def test_compress_kv_triton_matches_reference(dtype, heads, head_dim, frames, height, width, slot, t0, layout):
    need_triton()
    from relaxkv_kernels.ops.compress_kv.triton import compress_kv_triton

    g = gen(frames * 100 + height + width)
    n = frames * height * width
    k, v = _triton_kv(g, layout, n, heads, head_dim, dtype)
    nc, row0 = len(compressed_positions(0.0, frames, height, width)), 5
    rows = slice(row0 + slot * nc, row0 + (slot + 1) * nc)
    k_pool, v_pool = (randn(g, 2, row0 + 4 * nc + 3, heads, head_dim, dtype=dtype, device=DEVICE) for _ in range(2))
    mean_key = randn(g, 2, 4, heads, head_dim, device=DEVICE)
    for t in (k_pool[:, rows], v_pool[:, rows], mean_key[:, slot]):
        t.fill_(float("nan"))  # every target element must be written
    k_pool0, v_pool0, mean_key0, k0, v0 = k_pool.clone(), v_pool.clone(), mean_key.clone(), k.clone(), v.clone()

    compress_kv_triton(k, v, k_pool, v_pool, mean_key, _one(slot, DEVICE), _one(t0, DEVICE), row0, frames, height,
                       width)

    assert torch.equal(k, k0) and torch.equal(v, v0), "inputs changed"
    keep = torch.ones(k_pool.shape[1], dtype=torch.bool)
    keep[rows] = False
    assert torch.equal(k_pool[:, keep], k_pool0[:, keep]) and torch.equal(v_pool[:, keep], v_pool0[:, keep])
    keep_slot = torch.arange(4) != slot
    assert torch.equal(mean_key[:, keep_slot], mean_key0[:, keep_slot])
    ck64, cv64, _ = compress_kv_ref(k.double(), v.double(), float(t0), frames, height, width)
    ck, cv, mk = compress_kv_ref(k, v, float(t0), frames, height, width)
    for got, truth, same_dtype, what in ((k_pool[:, rows], ck64, ck, "k_pool"), (v_pool[:, rows], cv64, cv, "v_pool")):
        if dtype == torch.float32:  # a few ulps of O(1) values
            torch.testing.assert_close(got.double(), truth, rtol=1e-5, atol=1e-5, msg=what)
        else:  # fp16: the 2x rule against the reference's one rounding to fp16; + 1e-5: fp32 angle rounding
            assert_2x_rule(got, truth, same_dtype, 1e-5, what)
    # mean key: fp32 sums of exact inputs in both, different order: fp32 rounding only, whatever the input dtype
    torch.testing.assert_close(mean_key[:, slot], mk, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------- CUDA vs reference


def _check_cuda(dev, dtype, layout, batch, frames, height, width, heads, head_dim, slot, t0, compare_triton: bool):
    """The CUDA kernel against the reference (and the Triton kernel): written rows, mean key, untouched memory."""
    n_blocks, row0 = 4, 5
    g = gen(43)
    n = frames * height * width
    k = strided(randn(g, batch, n, heads, head_dim, dtype=dtype, device=dev), layout)
    v = strided(randn(g, batch, n, heads, head_dim, dtype=dtype, device=dev), layout)
    nc = (frames // 2) * (height // 4) * (width // 4)
    n_rows = row0 + n_blocks * nc + 2
    k_pool = randn(g, batch, n_rows, heads, head_dim, dtype=dtype, device=dev)
    v_pool = torch.randn_like(k_pool)
    # mean_key lives in a [B, H, n_blocks, 2D] buffer for the strided case: m_sn = 2D, m_sh = n_blocks * 2D, m_sd = 2
    if layout == "strided":
        mk_base = randn(g, batch, heads, n_blocks, 2 * head_dim, device=dev)
        as_mean_key = lambda t: t.transpose(1, 2)[..., 1::2]  # noqa: E731
    else:
        mk_base = randn(g, batch, n_blocks, heads, head_dim, device=dev)
        as_mean_key = lambda t: t  # noqa: E731
    rows = torch.arange(row0 + slot * nc, row0 + (slot + 1) * nc, device=dev)
    k_pool[:, rows] = v_pool[:, rows] = float("nan")
    as_mean_key(mk_base)[:, slot] = float("nan")
    k0, v0 = k.clone(), v.clone()
    index_dtype = torch.int32 if dtype == torch.float16 else torch.int64
    slot_t, t0_t = _one(slot, dev, index_dtype), _one(t0, dev, index_dtype)
    got = [t.clone() for t in (k_pool, v_pool, mk_base)]
    compress_kv_cuda(k, v, got[0], got[1], as_mean_key(got[2]), slot_t, t0_t, row0, frames, height, width)
    ref = [t.clone() for t in (k_pool, v_pool, mk_base)]
    compress_kv_into_ref(k, v, ref[0], ref[1], as_mean_key(ref[2]), slot_t, t0_t, row0, frames, height, width)
    close(got[0][:, rows], ref[0][:, rows], dtype, "k_pool")
    close(got[1][:, rows], ref[1][:, rows], dtype, "v_pool")
    torch.testing.assert_close(as_mean_key(got[2])[:, slot], as_mean_key(ref[2])[:, slot], rtol=1e-5, atol=1e-5)
    keep = torch.ones(n_rows, dtype=torch.bool, device=dev)
    keep[rows] = False
    assert torch.equal(got[0][:, keep], k_pool[:, keep]) and torch.equal(got[1][:, keep], v_pool[:, keep])
    written = torch.zeros_like(mk_base, dtype=torch.bool)
    as_mean_key(written)[:, slot] = True
    assert torch.equal(got[2][~written], mk_base[~written])  # other slots and the gaps of the strided buffer
    assert torch.equal(k, k0) and torch.equal(v, v0)
    if compare_triton and compare_with_triton(dev, dtype):
        from relaxkv_kernels.ops.compress_kv.triton import compress_kv_triton

        tri = [t.clone() for t in (k_pool, v_pool, mk_base)]
        compress_kv_triton(k, v, tri[0], tri[1], as_mean_key(tri[2]), slot_t, t0_t, row0, frames, height, width)
        close(got[0], tri[0], dtype, "k_pool vs triton")
        close(got[1], tri[1], dtype, "v_pool vs triton")
        torch.testing.assert_close(got[2], tri[2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", [  # layout, batch, frames, height, width, heads, head_dim, slot, t0
    ("contiguous", 2, 4, 8, 8, 2, 128, 2, 13),
    ("strided", 2, 5, 9, 10, 3, 128, 2, 13),  # odd grid: floors 2x2x2; strided mean_key
    ("unaligned", 2, 2, 4, 12, 1, 64, 2, 13),
], ids=["contiguous-4x8x8", "strided-odd_grid", "unaligned-d64"])
def test_compress_kv_cuda_matches_reference(kernel_device, dtype, case):
    _check_cuda(kernel_device, dtype, *case, compare_triton=True)


@pytest.mark.parametrize("dtype, case", [
    (torch.float32, ("contiguous", 3, 3, 7, 5, 2, 128, 0, 0)),  # one compressed token (floors 1x1x1), first slot
    (torch.float16, ("unaligned", 2, 2, 4, 9, 5, 128, 3, 41)),  # scalar path: 4 head lanes for 5 heads; last slot
    (torch.float32, ("contiguous", 2, 2, 5, 4, 9, 128, 1, 6)),  # vector path: 8 head lanes for 9 heads
    (torch.bfloat16, ("strided", 2, 4, 4, 9, 33, 64, 2, 97)),  # 32 head lanes for 33 heads; strided mean_key
    (torch.float32, ("contiguous", 2, 2, 8, 8, 2, 128, 1, 2**24 - 8)),  # a stream's far position: fp64 angles
], ids=["single_token-fp32", "head_loop-scalar-fp16", "head_loop-vector-fp32", "head_loop-strided_mean_key-bf16",
        "stream_t0-fp32"])
def test_compress_kv_cuda_edge_cases(kernel_device, dtype, case):
    _check_cuda(kernel_device, dtype, *case, compare_triton=False)


@pytest.mark.parametrize("slot", [4, -1, 3], ids=["slot_n_blocks", "slot_negative", "slot_past_pool_rows"])
def test_compress_kv_cuda_out_of_range_slot_writes_nothing(kernel_device, slot):
    """Wrapper contract: a slot outside [0, n_blocks), or whose Nc rows would not fit in the pool, writes nothing."""
    dev, b, h, d, n_blocks, row0 = kernel_device, 2, 2, 32, 4, 3
    g = gen(44)
    k = randn(g, b, 2 * 4 * 8, h, d, device=dev)  # Nc = 2
    k_pool = randn(g, b, row0 + 3 * 2 + 1, h, d, device=dev)  # room for slots 0 .. 2 only
    pools = [k_pool, torch.randn_like(k_pool), randn(g, b, n_blocks, h, d, device=dev)]
    got = [t.clone() for t in pools]
    compress_kv_cuda(k, k, *got, _one(slot, dev), _one(8, dev), row0, 2, 4, 8)
    for name, t, t0 in zip(("k_pool", "v_pool", "mean_key"), got, pools):
        assert torch.equal(t, t0), name


def test_compress_kv_cuda_at_wan_shapes(kernel_device):
    """Wan2.1 frames (30 x 52, Nc = 182 with a remainder row), 12 heads of 128, bf16."""
    dev, (h, w), frames, n_blocks, row0, slot, t0 = kernel_device, WAN_HW, 4, 6, 3 * WAN_F, 4, 36
    g = gen(51)
    nc = (frames // 2) * (h // 4) * (w // 4)  # 182
    k, v = (randn(g, 2, frames * WAN_F, WAN_H, WAN_D, dtype=torch.bfloat16, device=dev) for _ in range(2))
    pools = [randn(g, 2, row0 + n_blocks * nc, WAN_H, WAN_D, dtype=torch.bfloat16, device=dev) for _ in range(2)]
    pools.append(randn(g, 2, n_blocks, WAN_H, WAN_D, device=dev))
    rows = slice(row0 + slot * nc, row0 + (slot + 1) * nc)
    for t in pools[:2]:
        t[:, rows] = float("nan")
    pools[2][:, slot] = float("nan")
    got, ref = [t.clone() for t in pools], [t.clone() for t in pools]
    compress_kv_cuda(k, v, *got, _one(slot, dev), _one(t0, dev), row0, frames, h, w)
    compress_kv_into_ref(k, v, *ref, _one(slot, dev), _one(t0, dev), row0, frames, h, w)
    close(got[0], ref[0], torch.bfloat16, "k_pool")
    close(got[1], ref[1], torch.bfloat16, "v_pool")
    torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ FP8 pools


def _fp8_pools(g: torch.Generator, b: int, n_rows: int, h: int, d: int, rows, device) -> list[torch.Tensor]:
    """Random FP8 k and v pools and their scales, [k_pool, v_pool, k_scale, v_scale], with the ``rows`` the op must
    write poisoned: NaN codes and NaN scales."""
    (kp, ks), (vp, vs) = fp8_pool(g, b, n_rows, h, d, device=device), fp8_pool(g, b, n_rows, h, d, device=device)
    for codes, scale in ((kp, ks), (vp, vs)):
        poison_fp8(codes, scale, (slice(None), rows))
    return [kp, vp, ks, vs]


def _assert_fp8_rows_kept(got: list[torch.Tensor], before: list[torch.Tensor], keep: torch.Tensor) -> None:
    """Codes and scales of the pool rows ``keep`` (bool [n_rows]) bit-identical to ``before``."""
    for name, a, b in zip(("k_pool", "v_pool", "k_pool_scale", "v_pool_scale"), got, before):
        if a.dtype == FP8:
            a, b = a.view(torch.uint8), b.view(torch.uint8)
        assert torch.equal(a[:, keep], b[:, keep]), f"{name}: a row outside the block changed"


def _check_fp8(run, dev, dtype, k, v, slot: int, t0: int, row0: int, frames: int, height: int, width: int,
               want=None) -> None:
    """``run`` (a backend's op form) with FP8 pools against ``want`` (the reference's FP8 pools by default): the
    block's codes and scales, every other row and mean key slot untouched, mean_key that of the call with pools in
    the compute dtype, inputs unchanged."""
    b, _, h, d = k.shape
    n_blocks, nc = 4, len(compressed_positions(0.0, frames, height, width))
    n_rows = row0 + n_blocks * nc + 3
    rows = torch.arange(row0 + slot * nc, row0 + (slot + 1) * nc, device=dev)
    g = gen(700 + frames + height + width)
    pools = _fp8_pools(g, b, n_rows, h, d, rows, dev)
    mean_key = randn(g, b, n_blocks, h, d, device=dev)
    mean_key[:, slot] = float("nan")
    slot_t, t0_t = _one(slot, dev), _one(t0, dev)
    k0, v0 = k.clone(), v.clone()
    got = [t.clone() for t in pools]
    got_mk = mean_key.clone()
    run(k, v, got[0], got[1], got_mk, slot_t, t0_t, row0, frames, height, width, got[2], got[3])
    assert torch.equal(k, k0) and torch.equal(v, v0), "inputs changed"
    if want is None:
        want = [t.clone() for t in pools]
        compress_kv_into_ref(k, v, want[0], want[1], mean_key.clone(), slot_t, t0_t, row0, frames, height, width,
                             want[2], want[3])
    # K: rotated in fp32 by the kernels, in float64 by the reference; V: fp32 window sums in another order
    assert_fp8_equal(got[0][:, rows], got[2][:, rows], want[0][:, rows], want[2][:, rows], "k_pool", exact=False)
    assert_fp8_equal(got[1][:, rows], got[3][:, rows], want[1][:, rows], want[3][:, rows], "v_pool", exact=False)
    keep = torch.ones(n_rows, dtype=torch.bool, device=dev)
    keep[rows] = False
    _assert_fp8_rows_kept(got, pools, keep)
    plain = [randn(g, b, n_rows, h, d, dtype=dtype, device=dev) for _ in range(2)]
    plain_mk = mean_key.clone()
    run(k, v, *plain, plain_mk, slot_t, t0_t, row0, frames, height, width)
    assert torch.equal(got_mk, plain_mk), "mean_key: not that of the call with pools in the compute dtype"


@pytest.mark.parametrize("b, h, d, t0, frames, height, width, slot, row0", [
    pytest.param(1, 2, 32, 0, 2, 4, 4, 0, 0, id="one-window-slot0"),
    pytest.param(2, 2, 32, 8, 4, 6, 9, 2, 5, id="floors-4x6x9-B2"),
    pytest.param(1, 1, 128, 24, 5, 8, 12, 3, 7, id="D128-odd-frames-last_slot"),
])
def test_compress_kv_into_ref_fp8_vs_literal(b, h, d, t0, frames, height, width, slot, row0):
    """FP8 pools receive quantize_fp8 of the literal rotated pooled keys / pooled values, within e4m3's error of
    them; other rows keep their codes and scales; mean_key is the non-FP8 call's (and the literal's)."""
    g = gen(900 + d + frames)
    n = frames * height * width
    k, v = randn(g, b, n, h, d), randn(g, b, n, h, d)
    pk, centres = _literal_compress(k, t0, frames, height, width)
    pv, _ = _literal_compress(v, t0, frames, height, width)
    ck = literal_rope(pk, centres)
    want_k, want_v = quantize_fp8(ck), quantize_fp8(pv)
    nc = ck.shape[1]
    n_rows = row0 + 4 * nc + 2
    rows = torch.arange(row0 + slot * nc, row0 + (slot + 1) * nc)
    pools = _fp8_pools(g, b, n_rows, h, d, rows, "cpu")
    mean_key0 = randn(g, b, 4, h, d)
    mean_key0[:, slot] = float("nan")
    got, mean_key = [t.clone() for t in pools], mean_key0.clone()
    compress_kv_into_ref(k, v, got[0], got[1], mean_key, _one(slot, "cpu"), _one(t0, "cpu"), row0, frames, height,
                         width, got[2], got[3])
    # the reference rounds its fp32 results, the literal float64 values: a value at an e4m3 tie may differ
    assert_fp8_equal(got[0][:, rows], got[2][:, rows], *want_k, "k_pool", exact=False)
    assert_fp8_equal(got[1][:, rows], got[3][:, rows], *want_v, "v_pool", exact=False)
    for codes, scale, truth in ((got[0], got[2], ck), (got[1], got[3], pv)):  # e4m3: 2^-4 relative, half a subnormal
        back = dequantize_fp8(codes[:, rows], scale[:, rows]).double()
        bound = 2.0**-4 * truth.abs() + 2.0**-10 * scale[:, rows, :, None] + 1e-6
        assert bool(((back - truth).abs() <= bound).all())
    keep = torch.ones(n_rows, dtype=torch.bool)
    keep[rows] = False
    _assert_fp8_rows_kept(got, pools, keep)
    plain_mk = mean_key0.clone()
    compress_kv_into_ref(k, v, randn(g, b, n_rows, h, d), randn(g, b, n_rows, h, d), plain_mk, _one(slot, "cpu"),
                         _one(t0, "cpu"), row0, frames, height, width)
    assert torch.equal(mean_key, plain_mk)
    torch.testing.assert_close(mean_key[:, slot].double(), pk.mean(dim=1), rtol=0, atol=1e-6)


@TRITON_CASES
def test_compress_kv_triton_fp8_matches_reference(dtype, heads, head_dim, frames, height, width, slot, t0, layout):
    need_triton()
    from relaxkv_kernels.ops.compress_kv.triton import compress_kv_triton

    g = gen(frames * 100 + height + width + 1)
    k, v = _triton_kv(g, layout, frames * height * width, heads, head_dim, dtype)
    _check_fp8(compress_kv_triton, DEVICE, dtype, k, v, slot, t0, 5, frames, height, width)


@pytest.mark.parametrize("dtype, case", [  # layout, batch, frames, height, width, heads, head_dim, slot, t0
    (torch.float32, ("contiguous", 2, 4, 8, 8, 2, 128, 2, 13)),  # 16-byte path: 32 lanes per head row
    (torch.bfloat16, ("strided", 1, 5, 9, 10, 3, 128, 1, 13)),  # odd grid; 16 lanes, 3 head rows per block
    (torch.float16, ("unaligned", 2, 2, 4, 9, 5, 128, 3, 41)),  # element path: 64 lanes, rows over 2 warps
    (torch.float16, ("contiguous", 1, 2, 4, 8, 3, 96, 0, 7)),  # 12 lanes: head rows straddle warps
    (torch.bfloat16, ("contiguous", 1, 2, 4, 4, 33, 64, 2, 97)),  # 32 head rows for 33 heads: a round of 1 live
], ids=["fp32-D128", "bf16-strided-odd_grid", "fp16-unaligned-scalar", "fp16-D96-straddling", "bf16-33_heads"])
def test_compress_kv_cuda_fp8_matches_reference(kernel_device, dtype, case):
    layout, batch, frames, height, width, heads, head_dim, slot, t0 = case
    g = gen(45)
    n = frames * height * width
    k = strided(randn(g, batch, n, heads, head_dim, dtype=dtype, device=kernel_device), layout)
    v = strided(randn(g, batch, n, heads, head_dim, dtype=dtype, device=kernel_device), layout)
    _check_fp8(compress_kv_cuda, kernel_device, dtype, k, v, slot, t0, 5, frames, height, width)


def _fp8_tie_values(dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """k random and v with pooled values 1.0625 + eps / 32 (eps: one ulp of ``dtype`` at 1): one 2x4x4 window of
    1.0625 but for one token 1.0625 + eps. Quantized from fp32 (scale 2^-8: 272 + 2^-7 units) the rows code 288,
    i.e. 1.125; rounded to ``dtype`` first (1.0625 exactly: 272, an e4m3 tie) they would code 256, i.e. 1.0."""
    eps = torch.finfo(dtype).eps
    g = gen(46)
    k = randn(g, 1, 32, 2, 16, dtype=dtype, device=device)
    v = torch.full((1, 32, 2, 16), 1.0625, dtype=dtype, device=device)
    v[:, 5] = 1.0625 + eps
    pooled = v.float().mean(dim=1)
    assert bool((pooled == 1.0625 + eps / 32).all()) and bool((pooled.to(dtype) == 1.0625).all())
    assert bool((dequantize_fp8(*quantize_fp8(pooled.to(dtype))) == 1.0).all())  # the double rounding
    return k, v


def _assert_v_quantized_from_fp32(run, dtype, device) -> None:
    k, v = _fp8_tie_values(dtype, device)
    pools = _fp8_pools(gen(47), 1, 3, 2, 16, [1], device)
    run(k, v, *pools[:2], randn(gen(48), 1, 1, 2, 16, device=device), _one(0, device), _one(0, device), 1, 2, 4, 4,
        *pools[2:])
    assert bool((dequantize_fp8(pools[1][:, 1], pools[3][:, 1]) == 1.125).all()), "v_pool: rounded to the compute dtype"


@pytest.mark.parametrize("backend, dtype", [
    ("reference", torch.float16), ("reference", torch.bfloat16), ("triton", torch.float16),
], ids=["reference-fp16", "reference-bf16", "triton-fp16"])  # bf16: broken in the Triton interpreter
def test_fp8_rows_are_quantized_from_fp32(backend, dtype):
    """The pooled fp32 value is quantized, never first rounded to the compute dtype."""
    dev = backend_device(backend)
    if backend == "triton":
        from relaxkv_kernels.ops.compress_kv.triton import compress_kv_triton as run
    else:
        run = compress_kv_into_ref
    _assert_v_quantized_from_fp32(run, dtype, dev)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_fp8_rows_are_quantized_from_fp32_cuda(kernel_device, dtype):
    _assert_v_quantized_from_fp32(compress_kv_cuda, dtype, kernel_device)


def _fp8_args(g: torch.Generator) -> list:
    """:func:`_args` with FP8 pools, then the raw op's backend and the scales (the arguments of the raw op but
    ``checked``)."""
    args = _args(g)
    kp, vp, ks, vs = _fp8_pools(g, B, 200, H, D, [], "cpu")
    args[2:4] = [kp, vp]
    return [*args, "auto", ks, vs]


def test_opcheck_fp8():
    """test_schema is left out: its comparison of the tensors multiplies them, which torch lacks for float8 on
    the CPU ("mul_cpu_reduced_float" not implemented for 'Float8_e4m3fn')."""
    args = _fp8_args(gen(0))
    args[11] = "reference"
    torch.library.opcheck(torch.ops.relaxkv.compress_kv.default, tuple(args),
                          test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_public_fp8_op_writes_the_reference_rows():
    args = _fp8_args(gen(1))
    want = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    rk.compress_kv(*args[:11], k_pool_scale=args[12], v_pool_scale=args[13])
    compress_kv_into_ref(*want[:11], *want[12:])
    for i in (2, 3, 4, 12, 13):
        got, ref = args[i], want[i]
        assert torch.equal(got.view(torch.uint8) if got.dtype == FP8 else got,
                           ref.view(torch.uint8) if ref.dtype == FP8 else ref), i


_SCALE = torch.zeros(B, 200, H)
BAD_FP8 = [  # (argument index, replacement, error type, message fragment) on _fp8_args
    pytest.param(12, None, ValueError, "k_pool_scale: expected the float32", id="fp8_k_pool_without_scale"),
    pytest.param(13, None, ValueError, "v_pool_scale: expected the float32", id="fp8_v_pool_without_scale"),
    pytest.param(12, _SCALE[:, :199], ValueError, "k_pool_scale: expected shape", id="k_scale_rows"),
    pytest.param(13, _SCALE[..., :1], ValueError, "v_pool_scale: expected shape", id="v_scale_heads"),
    pytest.param(12, _SCALE.double(), TypeError, "k_pool_scale: expected dtype", id="k_scale_float64"),
    pytest.param(13, _SCALE.half(), TypeError, "v_pool_scale: expected dtype", id="v_scale_fp16"),
    pytest.param(12, _SCALE.to("meta"), ValueError, "k_pool_scale: expected a tensor on cpu", id="k_scale_device"),
]


@pytest.mark.parametrize("index, value, exc, match", BAD_FP8)
def test_fp8_bad_input_raises_before_any_kernel(index, value, exc, match):
    assert_raw_op_raises_like_public("compress_kv", replace(_fp8_args(gen(4)), index, value), exc, match)


@pytest.mark.parametrize("fp8_pool_index", [2, 3], ids=["fp8_k_pool-fp32_v_pool", "fp32_k_pool-fp8_v_pool"])
def test_pools_of_different_dtypes_are_rejected(fp8_pool_index):
    """One FP8 pool (with its scales) and one in the compute dtype (without): the k and v pools share a dtype."""
    args = _fp8_args(gen(4))
    plain = 5 - fp8_pool_index  # the other pool: fp32, no scales
    args[plain], args[plain + 10] = torch.randn(B, 200, H, D), None
    assert_raw_op_raises_like_public("compress_kv", args, TypeError, "v_pool: expected dtype")


@pytest.mark.parametrize("index, match", [(12, "k_pool_scale: expected None"), (13, "v_pool_scale: expected None")],
                         ids=["k_scale_with_fp32_pools", "v_scale_with_fp32_pools"])
def test_scales_of_non_fp8_pools_are_rejected(index, match):
    args = [*_args(gen(4)), "auto", None, None]
    assert_raw_op_raises_like_public("compress_kv", replace(args, index, _SCALE.clone()), ValueError, match)


# ----------------------------------------------------------------------------- every backend, same result


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_int32_indices_match_int64(backend):
    assert_int32_indices_match_int64("compress_kv", on(backend_device(backend), _args(gen(9))), backend)


def test_int32_indices_match_int64_cuda(kernel_device):
    assert_int32_indices_match_int64("compress_kv", on(kernel_device, _args(gen(9))), "cuda")


def test_last_dim_strided_inputs_cuda(kernel_device):
    """k and v with stride(-1) == 2 (accepted by the public op; the wrapper copies them to unit rows)."""
    assert_strided_inputs_match_reference("compress_kv", on(kernel_device, _args(gen(10))), (0, 1), "cuda")


def test_compress_kv_cuda_rejects_a_strided_pool(kernel_device):
    """Backend-specific: pools written in place need unit rows (a copy would not be written back)."""
    args = on(kernel_device, _args(gen(11)))
    args[3] = randn(gen(12), B, 200, H, 2 * D, device=kernel_device)[..., ::2]
    with pytest.raises(ValueError, match="v_pool: expected a contiguous last dim"):
        compress_kv_cuda(*args)


# ------------------------------------------------------------------------------------------ registration


def test_opcheck():
    torch.library.opcheck(torch.ops.relaxkv.compress_kv.default, (*_args(gen(0)), "reference"))


def test_public_op_matches_registered_op():
    assert_public_op_matches_registered("compress_kv", _args(gen(1)))  # no output: the same rows written


def test_fake_returns_none():
    out, fake = run_on_fakes("compress_kv", _args(gen(3)))
    assert out is None and fake[2].shape == (B, 200, H, D) and fake[4].shape == (B, 4, H, D)


# ------------------------------------------------------------------------------------------- bad input

BAD = [  # (argument index, replacement, error type, message fragment)
    pytest.param(5, torch.tensor([4]), ValueError, "block_slot: expected values in \\[0, 3\\]", id="slot_range"),
    pytest.param(5, torch.tensor([-1]), ValueError, "block_slot: expected values in \\[0, 3\\]", id="slot_negative"),
    pytest.param(5, torch.tensor([0.0]), TypeError, "block_slot: expected dtype", id="slot_float"),
    pytest.param(6, torch.tensor([12, 13]), ValueError, "t0: expected shape \\[1\\]", id="t0_length"),
    pytest.param(0, torch.randn(B, 4 * 64 - 1, H, D), ValueError, "k: expected 4\\*8\\*8", id="k_tokens"),
    pytest.param(0, torch.randn(B, 4 * 64, H, D - 1), ValueError, "k: head_dim must be a positive even",
                 id="k_odd_head_dim"),
    pytest.param(1, torch.randn(B, 4 * 64, H, D).half(), TypeError, "v: expected dtype", id="v_dtype"),
    pytest.param(2, torch.randn(B, 200, H, 2 * D), ValueError, "k_pool: expected shape", id="k_pool_head_dim"),
    pytest.param(4, torch.randn(B, 4, H, D).half(), TypeError, "mean_key: expected dtype", id="mean_key_fp16"),
    pytest.param(4, torch.randn(B, 4, H + 1, D), ValueError, "mean_key: expected shape", id="mean_key_heads"),
    pytest.param(8, 1, ValueError, "at least 2x4x4", id="one_frame"),
    pytest.param(7, 195, ValueError, "row0", id="row0_past_pool"),
    pytest.param(4, torch.randn(B, 4, H, D, device="meta"), ValueError, "mean_key: expected tensors on cpu",
                 id="mean_key_device"),
    pytest.param(11, "fused", ValueError, "backend: expected one of", id="backend_name"),
]


test_bad_input_raises_before_any_kernel, test_bad_scalar_type, test_checked_true_matches_default = raw_op_tests(
    "compress_kv", _args, BAD, scalar=(10, 8.0, "width"))
