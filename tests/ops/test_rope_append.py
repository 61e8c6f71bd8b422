"""relaxkv::rope_append: Wan RoPE of the chunk's Q and K, K/V appended to cache rows, per-frame prototypes.

The reference against a literal restatement; the Triton kernel (interpreter on CPU) and the CUDA kernel
(``kernel_device``: GPU, or emulated on the CPU) against the reference, with NaN in every row and slot
they must write; registration (opcheck, fake) and bad inputs (public function and raw op alike).
"""
import pytest
import torch

import relaxkv_kernels as rk
from relaxkv_kernels.geometry import apply_rope
from relaxkv_kernels.geometry import rope_angles
from relaxkv_kernels.geometry import token_positions
from relaxkv_kernels.ops.fp8 import dequantize_fp8
from relaxkv_kernels.ops.fp8 import quantize_fp8
from relaxkv_kernels.ops.rope_append.cuda import rope_append_cuda
from relaxkv_kernels.ops.rope_append.reference import rope_append_ref

from helpers import DEVICE
from helpers import FP8
from helpers import assert_2x_rule
from helpers import assert_checked_matches_default
from helpers import assert_fp8_equal
from helpers import assert_int32_indices_match_int64
from helpers import assert_public_op_matches_registered
from helpers import assert_raw_op_raises_like_public
from helpers import assert_strided_inputs_match_reference
from helpers import backend_device
from helpers import fp8_pool
from helpers import gen
from helpers import need_triton
from helpers import on
from helpers import randn
from helpers import raw_op_tests
from helpers import replace
from helpers import run_on_fakes
from helpers import spaced

B, H, D, HH, WW = 2, 2, 16, 4, 4  # frames of 16 tokens
F = HH * WW


def _args(g: torch.Generator) -> list:
    """Small valid arguments: 2 frames into slots 3 and 1 of 5, int64 indices."""
    q, k, v = (randn(g, B, 2 * F, H, D) for _ in range(3))
    k_cache, v_cache = randn(g, B, 5 * F, H, D), randn(g, B, 5 * F, H, D)
    return [q, k, v, k_cache, v_cache, randn(g, B, 5, D), torch.tensor([3, 1]), torch.tensor([7, 8]), HH, WW]


# ---------------------------------------------------------------------------------- reference vs literal


@pytest.mark.parametrize("b, d, h, grid, frame_slot, frame_pos", [
    pytest.param(1, 32, 2, (2, 3), [4], [9], id="D32-single-frame"),
    pytest.param(2, 64, 2, (3, 2), [5, 1, 2], [12, 13, 14], id="D64-B2-wrapped-slots"),
    pytest.param(1, 128, 1, (1, 5), [0, 3], [0, 7], id="D128-gap-positions"),
])
def test_rope_append_ref_vs_literal(b, d, h, grid, frame_slot, frame_pos):
    g = gen(400 + d + len(frame_slot))
    gh, gw = grid
    f, u, n_slots = gh * gw, len(frame_slot), 6
    q, k, v = (randn(g, b, u * f, h, d) for _ in range(3))
    k_cache, v_cache, proto = randn(g, b, n_slots * f, h, d), randn(g, b, n_slots * f, h, d), randn(g, b, n_slots, d)
    k_cache0, v_cache0, proto0 = k_cache.clone(), v_cache.clone(), proto.clone()
    q0, k0, v0 = q.clone(), k.clone(), v.clone()

    q_rot = rope_append_ref(q, k, v, k_cache, v_cache, proto, torch.tensor(frame_slot), torch.tensor(frame_pos), gh, gw)

    pos = torch.tensor([[float(frame_pos[i]), float(y), float(x)] for i in range(u) for y in range(gh)
                        for x in range(gw)], dtype=torch.float64)  # frame u, row-major (y, x)
    assert q_rot.dtype == q.dtype
    torch.testing.assert_close(q_rot, apply_rope(q.double(), pos).float(), rtol=0, atol=1e-6)
    written = torch.zeros(n_slots * f, dtype=torch.bool)
    k_rot = apply_rope(k.double(), pos).float()
    for i, slot in enumerate(frame_slot):
        rows = slice(slot * f, (slot + 1) * f)
        written[rows] = True
        torch.testing.assert_close(k_cache[:, rows], k_rot[:, i * f:(i + 1) * f], rtol=0, atol=1e-6)
        assert torch.equal(v_cache[:, rows], v[:, i * f:(i + 1) * f])
        for bb in range(b):
            tokens_mean = k[bb, i * f:(i + 1) * f].double().mean(dim=0)  # [H, D]
            torch.testing.assert_close(proto[bb, slot], tokens_mean.mean(dim=0).float(), rtol=0, atol=1e-6)
    assert torch.equal(k_cache[:, ~written], k_cache0[:, ~written])
    assert torch.equal(v_cache[:, ~written], v_cache0[:, ~written])
    others = [s for s in range(n_slots) if s not in frame_slot]
    assert torch.equal(proto[:, others], proto0[:, others])
    assert torch.equal(q, q0) and torch.equal(k, k0) and torch.equal(v, v0)


def test_rope_append_ref_proto_not_normalised():
    g = gen(410)
    k = randn(g, 1, 4, 2, 16) * 5 + 3
    proto = randn(g, 1, 2, 16)
    rope_append_ref(randn(g, 1, 4, 2, 16), k, randn(g, 1, 4, 2, 16), randn(g, 1, 8, 2, 16), randn(g, 1, 8, 2, 16),
                    proto, torch.tensor([1]), torch.tensor([3]), 2, 2)
    assert proto[0, 1].norm() > 10  # mean about 3 per dim: not unit norm
    torch.testing.assert_close(proto[0, 1], k[0].mean(dim=(0, 1)), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- FP8 caches: reference vs literal


def _fp8_caches(g: torch.Generator, b: int, n_rows: int, h: int, d: int, layout: str = "contiguous", device="cpu"):
    """FP8 k and v caches with random codes and scales (helpers.fp8_pool): contiguous, as views with padded heads
    ("padded_heads": strided codes and scales, both written in place; 16-byte aligned rows), or at an odd byte
    offset ("odd_offset": no multi-code store is aligned). Returns (k_cache, v_cache, k_scale, v_scale, the four
    underlying buffers: k codes, k scales, v codes, v scales)."""
    hh, dd = h + 2 * (layout == "padded_heads"), d + (layout == "odd_offset")
    bufs = [*fp8_pool(g, b, n_rows, hh, dd, device=device), *fp8_pool(g, b, n_rows, hh, dd, device=device)]
    views = list(bufs)
    if layout == "padded_heads":
        views = [t[:, :, 1:h + 1] for t in bufs]
    elif layout == "odd_offset":
        views[0], views[2] = bufs[0][..., 1:], bufs[2][..., 1:]
    return views[0], views[2], views[1], views[3], bufs


def _spread(g: torch.Generator, x: torch.Tensor) -> torch.Tensor:
    """x [B, N, H, D] times a power of two in 2^-5 .. 2^5 per (token, head), one (token, head) row zeroed: the row
    scales differ from row to row (a scale read or written at the wrong row shows) and one is the zero row's."""
    b, n, h, _ = x.shape
    y = x * torch.exp2(torch.randint(-5, 6, (b, n, h, 1), generator=g)).to(x.device, x.dtype)
    y[0, n // 2, h - 1] = 0
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_rope_append_ref_fp8_vs_literal(dtype):
    """FP8 caches: each written (row, head) holds quantize_fp8 of the float64 rotation rounded once to fp32 (for
    fp16 inputs too: never rounded to fp16 first) and of v; other rows keep their codes and scales; q_rot and the
    prototypes are those of a cache in the compute dtype."""
    g = gen(420)
    b, h, d, gh, gw, n_slots = 2, 2, 32, 2, 3, 4
    f, frame_slot, frame_pos = gh * gw, [3, 0], [5, 9]
    u = len(frame_slot)
    q = randn(g, b, u * f, h, d, dtype=dtype)
    k, v = (_spread(g, randn(g, b, u * f, h, d, dtype=dtype)) for _ in range(2))
    k_cache, v_cache, k_scale, v_scale, _ = _fp8_caches(g, b, n_slots * f, h, d)
    proto = randn(g, b, n_slots, d)
    before = [t.clone() for t in (k_cache, v_cache, k_scale, v_scale)]
    q0, k0, v0 = q.clone(), k.clone(), v.clone()
    slots, pos = torch.tensor(frame_slot), torch.tensor(frame_pos)
    plain = [randn(g, b, n_slots * f, h, d, dtype=dtype) for _ in range(2)]
    plain_proto = proto.clone()
    q_rot_plain = rk.rope_append(q, k, v, *plain, plain_proto, slots, pos, gh, gw, backend="reference")

    q_rot = rk.rope_append(q, k, v, k_cache, v_cache, proto, slots, pos, gh, gw, backend="reference",
                           k_cache_scale=k_scale, v_cache_scale=v_scale)

    positions = torch.tensor([[float(frame_pos[i]), float(y), float(x)] for i in range(u) for y in range(gh)
                              for x in range(gw)], dtype=torch.float64)
    rows = torch.cat([torch.arange(s * f, (s + 1) * f) for s in frame_slot])  # chunk order
    k_rot = apply_rope(k.double(), positions).float()  # fp32, from float64: no rounding to dtype in between
    want_k, want_ks = quantize_fp8(k_rot)
    want_v, want_vs = quantize_fp8(v.float())
    assert_fp8_equal(k_cache[:, rows], k_scale[:, rows], want_k, want_ks, "k_cache")
    assert_fp8_equal(v_cache[:, rows], v_scale[:, rows], want_v, want_vs, "v_cache")
    # what the codes mean: e4m3 keeps 3 mantissa bits (relative error <= 2^-4), the zero rows decode to 0
    torch.testing.assert_close(dequantize_fp8(k_cache[:, rows], k_scale[:, rows]), k_rot, rtol=2 ** -4, atol=0)
    torch.testing.assert_close(dequantize_fp8(v_cache[:, rows], v_scale[:, rows]), v.float(), rtol=2 ** -4, atol=0)
    keep = torch.ones(n_slots * f, dtype=torch.bool)
    keep[rows] = False
    for name, t, t0 in zip(("k_cache", "v_cache", "k_cache_scale", "v_cache_scale"),
                           (k_cache, v_cache, k_scale, v_scale), before):
        assert torch.equal(t[:, keep].view(torch.uint8), t0[:, keep].view(torch.uint8)), f"{name}: other rows changed"
    assert torch.equal(q_rot, q_rot_plain) and torch.equal(proto, plain_proto)
    assert torch.equal(q, q0) and torch.equal(k, k0) and torch.equal(v, v0)


# ------------------------------------------------------------------------------- Triton vs reference


def _rope_same_dtype(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Wan RoPE computed the plain PyTorch way in x.dtype (cos/sin tables cast to x.dtype)."""
    ang = rope_angles(pos, x.shape[-1])
    cos, sin = ang.cos().to(x.dtype)[:, None], ang.sin().to(x.dtype)[:, None]  # [N, 1, D/2]
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


def _assert_rope_close(out: torch.Tensor, x: torch.Tensor, pos: torch.Tensor, what: str, atol32: float = 1e-5):
    """fp32: a few ulps of O(1) values; fp16 / bf16: the 2x rule against torch's same-dtype rotation."""
    ref = apply_rope(x.double(), pos)
    if x.dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref, atol=atol32, rtol=1e-5, msg=what)
    else:  # + 1e-5: the kernel's fp32 angle rounding
        assert_2x_rule(out, ref, _rope_same_dtype(x, pos), 1e-5, what)


@pytest.mark.parametrize("dtype, heads, head_dim, height, width, slots, positions, layout", [
    pytest.param(torch.float32, 2, 16, 3, 7, [4, 1], [9, 10], "contiguous", id="fp32-two-frames"),
    pytest.param(torch.float16, 1, 32, 4, 5, [2], [0], "contiguous", id="fp16-one-frame"),
    pytest.param(torch.float16, 2, 32, 5, 6, [0, 5, 3], [17, 18, 19], "fused_qkv", id="fp16-noncontig-qkv"),
    pytest.param(torch.float32, 2, 32, 4, 4, [3, 4], [300, 301], "contiguous", id="fp32-far-frames"),
    # a long stream (10^5 frames: fp32 angles were 3e-3 rad off there; the temporal ones are taken in fp64)
    pytest.param(torch.float32, 2, 32, 2, 3, [0, 2], [100000, 2**24 - 1], "contiguous", id="fp32-stream-positions"),
    # heads in groups of BLOCK_H = 2 with a masked last group, D = 40 padded to 64, F = 35: 4 tiles of 8 + 3
    pytest.param(torch.float32, 5, 40, 5, 7, [3, 0], [6, 7], "contiguous", id="fp32-5heads-d40-tile_tail"),
    # one group of BLOCK_H = 4 for 3 heads, D = 48, F = 33 tokens in 5 tiles, fused qkv views
    pytest.param(torch.float16, 3, 48, 3, 11, [5, 2, 0], [1, 2, 3], "fused_qkv", id="fp16-3heads-d48-fused"),
])
def test_rope_append_triton_matches_reference(dtype, heads, head_dim, height, width, slots, positions, layout):
    need_triton()
    from relaxkv_kernels.ops.rope_append.triton import rope_append_triton

    g = gen(sum(slots) + head_dim + height)
    f, u, n_slots = height * width, len(slots), 6
    if layout == "fused_qkv":  # q, k, v as slices of one fused qkv projection
        q, k, v = randn(g, 2, u * f, 3, heads, head_dim, dtype=dtype, device=DEVICE).unbind(2)
        assert not q.is_contiguous()
    else:
        q, k, v = (randn(g, 2, u * f, heads, head_dim, dtype=dtype, device=DEVICE) for _ in range(3))
    k_cache = randn(g, 2, n_slots * f, heads, head_dim, dtype=dtype, device=DEVICE)
    v_cache = randn(g, 2, n_slots * f, heads, head_dim, dtype=dtype, device=DEVICE)
    proto = randn(g, 2, n_slots, head_dim, device=DEVICE)
    frame_slot, frame_pos = torch.tensor(slots, device=DEVICE), torch.tensor(positions, device=DEVICE)
    rows = (frame_slot[:, None].cpu() * f + torch.arange(f)).reshape(-1)
    k_cache[:, rows] = v_cache[:, rows] = float("nan")  # every target element must be written
    proto[:, frame_slot] = float("nan")
    k_ref, v_ref, p_ref = k_cache.clone(), v_cache.clone(), proto.clone()
    inputs = (q, k, v, frame_slot, frame_pos)
    before = [t.clone() for t in inputs]

    q_rot = rope_append_triton(q, k, v, k_cache, v_cache, proto, frame_slot, frame_pos, height, width)
    rope_append_ref(q, k, v, k_ref, v_ref, p_ref, frame_slot, frame_pos, height, width)

    for t, t0 in zip(inputs, before):
        assert torch.equal(t, t0), "inputs changed"
    keep = torch.ones(k_cache.shape[1], dtype=torch.bool)
    keep[rows] = False
    assert torch.equal(k_cache[:, keep], k_ref[:, keep])
    assert torch.equal(v_cache, v_ref), "values are copied as they are"
    pos = token_positions(frame_pos.cpu(), height, width).to(DEVICE)
    # far frames: an fp32 angle of ~300 rad is rounded to half an ulp (1.5e-5 rad) by design (geometry.py:
    # angles in fp32 or better); times |x| <= ~4 that is up to ~6e-5 on the output (measured: 1e-5)
    atol32 = 6e-5 if max(positions) > 100 else 1e-5
    _assert_rope_close(q_rot, q, pos, "q_rot", atol32)
    _assert_rope_close(k_cache[:, rows], k, pos, "k_cache", atol32)
    # prototypes: fp32 sums of exact inputs in both, different order: fp32 rounding only
    torch.testing.assert_close(proto, p_ref, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------- CUDA vs reference
# tests/conftest.py fills the package's torch.empty allocations (q_rot) with NaN; the cache rows and proto
# slots to be written are NaN too.


def _make_qkv(layout: str, g: torch.Generator, b: int, n: int, h: int, d: int, dtype, dev):
    if layout == "strided":  # 16-byte aligned views -> vectorised path
        q = randn(g, b, n, h + 2, d, dtype=dtype, device=dev)[:, :, 1:h + 1]
        k = randn(g, b, h, n, d, dtype=dtype, device=dev).transpose(1, 2)
        v = randn(g, b, n, h, d, dtype=dtype, device=dev)
    else:  # "unaligned": odd element offsets and strides -> per-element path
        q = randn(g, b, n, h, d + 1, dtype=dtype, device=dev)[..., 1:]
        k = randn(g, b, n, h, d, dtype=dtype, device=dev)
        v = randn(g, b, n + 1, h, d, dtype=dtype, device=dev)[:, 1:]
    assert not q.is_contiguous()
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("layout, U, h, w, H_, D_", [
    ("strided", 3, 5, 7, 3, 128),
    ("unaligned", 3, 5, 7, 3, 128),
    ("strided", 1, 1, 9, 2, 64),  # single frame, one token row, D = 64 (12/10/10 pairs)
    ("strided", 3, 30, 52, 12, 128),  # a Wan2.1-1.3B chunk: 3 frames of 1560 tokens, 12 heads
], ids=["strided-wan_d", "unaligned-wan_d", "single_frame-d64", "wan_chunk"])
def test_rope_append_cuda_matches_reference(kernel_device, dtype, layout, U, h, w, H_, D_):
    dev, b, f, n_slots = kernel_device, 2, h * w, U + 2
    g = gen(30)
    q, k, v = _make_qkv(layout, g, b, U * f, H_, D_, dtype, dev)
    q0, k0, v0 = q.clone(), k.clone(), v.clone()
    frame_slot = torch.randperm(n_slots, generator=g)[:U].to(dev)
    frame_pos = (torch.randperm(12, generator=g)[:U] + 2).to(dev)
    k_cache = randn(g, b, n_slots * f, H_, D_, dtype=dtype, device=dev)
    v_cache = torch.randn_like(k_cache)
    proto = randn(g, b, n_slots, D_, device=dev)
    rows = (frame_slot[:, None] * f + torch.arange(f, device=dev)).flatten()  # [U * F], chunk order
    k_cache[:, rows] = v_cache[:, rows] = float("nan")
    proto[:, frame_slot] = float("nan")
    untouched = torch.ones(n_slots * f, dtype=torch.bool, device=dev)
    untouched[rows] = False
    kc0, vc0, p0 = k_cache.clone(), v_cache.clone(), proto.clone()

    q_rot = rope_append_cuda(q, k, v, k_cache, v_cache, proto, frame_slot, frame_pos, h, w)

    pos = token_positions(frame_pos, h, w)
    assert q_rot.shape == q.shape and q_rot.dtype == dtype and q_rot.is_contiguous()
    _assert_rope_close(q_rot, q, pos, "q_rot")
    _assert_rope_close(k_cache[:, rows], k, pos, "k_cache")
    assert torch.equal(v_cache[:, rows], v)
    proto_ref = k.double().unflatten(1, (U, f)).mean(dim=(2, 3))  # [B, U, D]
    torch.testing.assert_close(proto[:, frame_slot].double(), proto_ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(k_cache[:, untouched], kc0[:, untouched])
    assert torch.equal(v_cache[:, untouched], vc0[:, untouched])
    keep = torch.ones(n_slots, dtype=torch.bool, device=dev)
    keep[frame_slot] = False
    assert torch.equal(proto[:, keep], p0[:, keep])
    assert torch.equal(q, q0) and torch.equal(k, k0) and torch.equal(v, v0)


@pytest.mark.parametrize("fp8", [False, True], ids=["cache", "fp8-cache"])
def test_rope_append_cuda_at_stream_positions(kernel_device, fp8):
    """Frames at 10^5 and 2^24 - 1 (a stream far past the trained length): the fp32 kernel rotates to fp32 rounding
    of the float64 reference (its temporal angles are reduced in fp64; in fp32 they were 3e-3 rad off)."""
    dev, b, h, w, heads, d = kernel_device, 1, 3, 4, 2, 128
    g = gen(31)
    f = h * w
    q, k, v = (randn(g, b, 2 * f, heads, d, device=dev) for _ in range(3))
    frame_slot, frame_pos = torch.tensor([2, 0], device=dev), torch.tensor([100000, 2**24 - 1], device=dev)
    k_cache = torch.full((b, 3 * f, heads, d), float("nan"), device=dev)
    v_cache = torch.full_like(k_cache, float("nan"))
    scales = (torch.full(k_cache.shape[:3], float("nan"), device=dev) for _ in range(2)) if fp8 else (None, None)
    if fp8:
        k_cache, v_cache = k_cache.to(torch.float8_e4m3fn), v_cache.to(torch.float8_e4m3fn)
    q_rot = rope_append_cuda(q, k, v, k_cache, v_cache, None, frame_slot, frame_pos, h, w, *scales)
    pos = token_positions(frame_pos.cpu(), h, w).to(dev)
    _assert_rope_close(q_rot, q, pos, "q_rot")
    if not fp8:
        rows = (frame_slot[:, None] * f + torch.arange(f, device=dev)).flatten()
        _assert_rope_close(k_cache[:, rows], k, pos, "k_cache")


def _check_cuda_views(dev, dtype, layout, U, h, w, H_, D_, n_slots, frame_slot, frame_pos):
    """rope_append_cuda with the caches and proto as views of larger buffers (padded heads, every other proto
    row) and stride-2 frame_slot / frame_pos; frames whose slot is outside [0, n_slots) write q_rot only
    (the wrapper's contract). Every element of the buffers outside the written rows must be unchanged."""
    b, f = 2, h * w
    g = gen(31)
    q, k, v = _make_qkv(layout, g, b, U * f, H_, D_, dtype, dev)
    q0, k0, v0 = q.clone(), k.clone(), v.clone()
    kc_buf = randn(g, b, n_slots * f, H_ + 2, D_, dtype=dtype, device=dev)
    vc_buf = torch.randn_like(kc_buf)
    p_buf = randn(g, b, 2 * n_slots, D_, device=dev)
    cache_view = lambda t: t[:, :, 1:H_ + 1]  # noqa: E731
    proto_view = lambda t: t[:, 1::2]  # noqa: E731
    valid = [u for u in range(U) if 0 <= int(frame_slot[u]) < n_slots]
    slots = frame_slot[valid]
    rows = (slots[:, None] * f + torch.arange(f, device=dev)).flatten()  # cache rows, chunk order
    toks = (torch.tensor(valid, device=dev)[:, None] * f + torch.arange(f, device=dev)).flatten()
    written = [torch.zeros_like(t, dtype=torch.bool) for t in (kc_buf, vc_buf, p_buf)]
    for t in (kc_buf, vc_buf, written[0], written[1]):  # the rows to be written: NaN, and their mask
        cache_view(t)[:, rows] = True if t.dtype == torch.bool else float("nan")
    for t in (p_buf, written[2]):
        proto_view(t)[:, slots] = True if t.dtype == torch.bool else float("nan")
    bufs0 = [t.clone() for t in (kc_buf, vc_buf, p_buf)]

    q_rot = rope_append_cuda(q, k, v, cache_view(kc_buf), cache_view(vc_buf), proto_view(p_buf),
                             spaced(frame_slot), spaced(frame_pos), h, w)

    pos = token_positions(frame_pos, h, w)
    assert q_rot.shape == q.shape and q_rot.dtype == dtype and q_rot.is_contiguous()
    _assert_rope_close(q_rot, q, pos, "q_rot")
    _assert_rope_close(cache_view(kc_buf)[:, rows], k[:, toks], pos[toks], "k_cache")
    assert torch.equal(cache_view(vc_buf)[:, rows], v[:, toks])
    proto_ref = k.double().unflatten(1, (U, f)).mean(dim=(2, 3))[:, valid]  # [B, U', D]
    torch.testing.assert_close(proto_view(p_buf)[:, slots].double(), proto_ref, atol=1e-5, rtol=1e-5)
    for name, t, t0, mask in zip(("k_cache", "v_cache", "proto"), (kc_buf, vc_buf, p_buf), bufs0, written):
        assert torch.equal(t[~mask], t0[~mask]), f"{name}: memory outside the written rows changed"
    assert torch.equal(q, q0) and torch.equal(k, k0) and torch.equal(v, v0)


@pytest.mark.parametrize("dtype, layout, U, h, w, H_, D_", [
    (torch.float32, "strided", 2, 2, 4, 2, 4),  # F = 8: exactly one token tile; D = 4: temporal pairs only
    (torch.bfloat16, "unaligned", 3, 2, 3, 3, 6),  # F = 6 < one tile; D = 6: one pair per axis
    (torch.float16, "strided", 2, 4, 4, 2, 20),  # F = 16: two full tiles; D = 20: 4/3/3 pairs, scalar fp16
    (torch.float32, "unaligned", 2, 3, 3, 1, 512),  # max head_dim: 256 lanes of 2 dims, a single row lane
    (torch.float16, "unaligned", 3, 1, 5, 2, 2),  # D = 2: the single pair is temporal
    (torch.bfloat16, "strided", 3, 3, 6, 5, 128),  # F = 18: two tiles and 2 tokens, 5 heads on 16 row lanes
], ids=["one_tile-d4-fp32", "small_frame-d6-bf16", "two_tiles-d20-fp16", "d512-scalar-fp32", "d2-fp16",
        "tile_tail-wan_d-bf16"])
def test_rope_append_cuda_edge_cases(kernel_device, dtype, layout, U, h, w, H_, D_):
    """Token tiles (tiles of csrc/rope_append.cuh and ops/rope_append/triton.py) full, partial and alone; head_dim
    at the ends of the range and with uneven pair splits; frame slots and positions out of order (descending slots,
    position 0)."""
    n_slots = U + 3
    frame_slot = torch.arange(n_slots - 1, n_slots - 1 - 2 * U, -2, device=kernel_device)  # descending, gaps
    frame_pos = torch.tensor([9, 0, 4][:U], device=kernel_device)
    _check_cuda_views(kernel_device, dtype, layout, U, h, w, H_, D_, n_slots, frame_slot, frame_pos)


@pytest.mark.parametrize("bad_slot", [5, -1], ids=["slot_n_slots", "slot_negative"])
def test_rope_append_cuda_out_of_range_slot_writes_only_q_rot(kernel_device, bad_slot):
    """Wrapper contract: a frame whose slot is outside [0, n_slots) gets its q rotated; its K, V and prototype
    go nowhere (no cache row, no proto row), while the other frames of the chunk are written as usual."""
    frame_slot = torch.tensor([3, bad_slot, 0], device=kernel_device)
    frame_pos = torch.tensor([6, 7, 8], device=kernel_device)
    _check_cuda_views(kernel_device, torch.bfloat16, "strided", 3, 2, 5, 2, 64, 5, frame_slot, frame_pos)


def test_rope_append_cuda_rejects_a_strided_cache(kernel_device):
    """Backend-specific: a cache written in place needs unit rows (a copy would not be written back)."""
    args = _args(gen(32))
    args[3] = randn(gen(33), B, 5 * F, H, 2 * D, device=kernel_device)[..., ::2]  # stride(-1) == 2
    args = on(kernel_device, args)
    with pytest.raises(ValueError, match="k_cache: expected a contiguous last dim"):
        rope_append_cuda(*args)


# ---------------------------------------------------------------- FP8 caches: Triton and CUDA vs reference


def _check_fp8_kernel(fn, dev, dtype, layout, pool_layout, U, h, w, H_, D_, n_slots, frame_slot, frame_pos,
                      with_proto=True, proto_exact=True):
    """``fn`` (a backend's rope_append) into FP8 caches (:func:`_fp8_caches` ``pool_layout``) against the reference:
    rows to be written poisoned in codes and scales (NaN) first; K codes and scales within one e4m3 step of the
    reference's (the kernel rotates in fp32, the reference in float64), V bit for bit; every byte of the code and
    scale buffers outside the written rows unchanged; q_rot and proto those of the same call into caches in the
    compute dtype (proto_exact False: within fp32 rounding, for token tiles that differ in size with FP8 caches).
    Frames whose slot is outside [0, n_slots) write nothing but q_rot (the CUDA wrapper's contract)."""
    b, f = 2, h * w
    g = gen(40 + D_ + U)
    q, k, v = _make_qkv(layout, g, b, U * f, H_, D_, dtype, dev)
    k.copy_(_spread(g, k))
    v.copy_(_spread(g, v))
    inputs = (q, k, v, frame_slot, frame_pos)
    before = [t.clone() for t in inputs]
    k_cache, v_cache, k_scale, v_scale, bufs = _fp8_caches(g, b, n_slots * f, H_, D_, pool_layout, dev)
    valid = [i for i in range(U) if 0 <= int(frame_slot[i]) < n_slots]
    slots = frame_slot[valid]
    rows = (slots[:, None] * f + torch.arange(f, device=dev)).flatten()  # written cache rows, chunk order
    k_cache[:, rows] = v_cache[:, rows] = float("nan")  # the NaN code
    k_scale[:, rows] = v_scale[:, rows] = float("nan")
    written = []  # per buffer (k codes, k scales, v codes, v scales): the elements of the rows to be written
    for buf, view in zip(bufs, (k_cache, k_scale, v_cache, v_scale)):
        mask = torch.zeros(buf.shape, dtype=torch.bool, device=dev)  # contiguous, like buf
        mask.as_strided(view.shape, view.stride(), view.storage_offset())[:, rows] = True
        written.append(mask)
    bufs0 = [t.clone() for t in bufs]
    proto = randn(g, b, n_slots, D_, device=dev) if with_proto else None
    plain = [randn(g, b, n_slots * f, H_, D_, dtype=dtype, device=dev) for _ in range(2)]
    plain_proto = None if proto is None else proto.clone()
    q_rot_plain = fn(q, k, v, *plain, plain_proto, frame_slot, frame_pos, h, w)

    q_rot = fn(q, k, v, k_cache, v_cache, proto, frame_slot, frame_pos, h, w, k_scale, v_scale)

    ref = [t.clone() for t in (k_cache, v_cache, k_scale, v_scale)]
    chunk = lambda x: x.unflatten(1, (U, f))[:, valid].flatten(1, 2)  # noqa: E731  (the frames written)
    rope_append_ref(chunk(q), chunk(k), chunk(v), ref[0], ref[1], None, slots.cpu(), frame_pos[valid].cpu(), h, w,
                    ref[2], ref[3])
    for t, t0 in zip(inputs, before):
        assert torch.equal(t, t0), "inputs changed"
    assert_fp8_equal(k_cache[:, rows], k_scale[:, rows], ref[0][:, rows], ref[2][:, rows], "k_cache", exact=False)
    assert_fp8_equal(v_cache[:, rows], v_scale[:, rows], ref[1][:, rows], ref[3][:, rows], "v_cache")
    for name, buf, buf0, mask in zip(("k codes", "k scales", "v codes", "v scales"), bufs, bufs0, written):
        assert torch.equal(buf[~mask].view(torch.uint8), buf0[~mask].view(torch.uint8)), f"{name}: other bytes changed"
    assert torch.equal(q_rot, q_rot_plain), "q_rot depends on the cache format"
    if proto is not None and proto_exact:
        assert torch.equal(proto, plain_proto), "proto depends on the cache format"
    elif proto is not None:  # the same fp32 sums grouped in other tiles: a few ulps of values of O(1)
        torch.testing.assert_close(proto, plain_proto, rtol=1e-6, atol=1e-6, equal_nan=False)


@pytest.mark.parametrize("dtype, layout, pool_layout, U, h, w, H_, D_, with_proto", [
    pytest.param(torch.float32, "strided", "contiguous", 2, 3, 7, 2, 16, True, id="fp32-two-frames"),
    # heads in groups of BLOCK_H = 2 with a masked last group, D = 40 padded to BLOCK_D = 64 (masked lanes: amax 0)
    pytest.param(torch.float16, "unaligned", "padded_heads", 2, 5, 7, 5, 40, True, id="fp16-5heads-d40-views"),
    pytest.param(torch.float16, "strided", "odd_offset", 1, 2, 5, 3, 48, False, id="fp16-one-frame-no_proto"),
])
def test_rope_append_triton_fp8_matches_reference(dtype, layout, pool_layout, U, h, w, H_, D_, with_proto):
    need_triton()
    from relaxkv_kernels.ops.rope_append.triton import rope_append_triton

    n_slots = U + 2
    frame_slot = torch.arange(n_slots - 1, n_slots - 1 - U, -1, device=DEVICE)  # descending
    frame_pos = torch.tensor([4, 9][:U], device=DEVICE)
    _check_fp8_kernel(rope_append_triton, DEVICE, dtype, layout, pool_layout, U, h, w, H_, D_, n_slots, frame_slot,
                      frame_pos, with_proto)


@pytest.mark.parametrize("dtype, layout, pool_layout, U, h, w, H_, D_, proto_exact", [
    # 16-byte loads, 8-code stores; D = 128: L = 16 lanes of a token, R = 8 tokens per tile as without FP8
    pytest.param(torch.bfloat16, "strided", "padded_heads", 2, 3, 6, 3, 128, True, id="bf16-wide-d128"),
    # element accesses, D = 128 > 32 lanes x 2: 8 chunks per lane on L = 8 lanes; R = 16 tokens (12 without FP8)
    pytest.param(torch.float32, "unaligned", "contiguous", 2, 3, 5, 2, 128, False, id="fp32-chunks-d128"),
    # 16-byte fp32 loads, 4-code stores; D = 20: 5 accesses on L = 8 lanes (3 lanes past D), F = 9: a tile tail
    pytest.param(torch.float32, "strided", "contiguous", 3, 3, 3, 2, 20, False, id="fp32-wide-d20-tail"),
    # aligned inputs, codes at an odd byte offset: element accesses, byte stores; D = 6: 3 lanes padded to 4
    pytest.param(torch.float16, "strided", "odd_offset", 2, 2, 3, 3, 6, False, id="fp16-odd_codes-d6"),
    # D = 512, element accesses: 8 chunks on 32 lanes (a whole warp per token), 4 tokens per tile
    pytest.param(torch.bfloat16, "unaligned", "padded_heads", 1, 1, 5, 1, 512, False, id="bf16-d512-warp"),
])
def test_rope_append_cuda_fp8_matches_reference(kernel_device, dtype, layout, pool_layout, U, h, w, H_, D_,
                                                proto_exact):
    n_slots = U + 2
    frame_slot = torch.arange(n_slots - 1, n_slots - 1 - U, -1, device=kernel_device)
    frame_pos = torch.tensor([9, 0, 4][:U], device=kernel_device)
    _check_fp8_kernel(rope_append_cuda, kernel_device, dtype, layout, pool_layout, U, h, w, H_, D_, n_slots,
                      frame_slot, frame_pos, proto_exact=proto_exact)


@pytest.mark.parametrize("bad_slot", [5, -1], ids=["slot_n_slots", "slot_negative"])
def test_rope_append_cuda_fp8_out_of_range_slot_writes_only_q_rot(kernel_device, bad_slot):
    """The wrapper contract with FP8 caches: the frame with a bad slot writes no codes and no scale (its lanes still
    take part in the warp's shuffles), the others are written as usual."""
    frame_slot = torch.tensor([3, bad_slot, 0], device=kernel_device)
    frame_pos = torch.tensor([6, 7, 8], device=kernel_device)
    _check_fp8_kernel(rope_append_cuda, kernel_device, torch.bfloat16, "strided", "contiguous", 3, 2, 5, 2, 64, 5,
                      frame_slot, frame_pos)


# ----------------------------------------------------------------------------- every backend, same result


def _check_without_proto(backend: str, device: str):
    """proto=None writes q_rot, k_cache, v_cache exactly as a call with proto does; a poisoned prototype
    buffer (the one a caller would have passed) stays untouched."""
    args = on(device, _args(gen(34)))
    with_proto = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    q_rot = rk.rope_append(*with_proto, backend=backend)
    poisoned = torch.full_like(args[5], float("nan"))
    without = replace([a.clone() if isinstance(a, torch.Tensor) else a for a in args], 5, None)
    q_rot_none = rk.rope_append(*without, backend=backend)
    assert torch.equal(q_rot_none, q_rot)
    assert torch.equal(without[3], with_proto[3]) and torch.equal(without[4], with_proto[4])
    assert poisoned.isnan().all()
    assert not torch.equal(with_proto[5], args[5])  # the call with proto did write it


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_without_proto_writes_the_same_rows(backend):
    _check_without_proto(backend, backend_device(backend))


def test_without_proto_writes_the_same_rows_cuda(kernel_device):
    _check_without_proto("cuda", kernel_device)


def _check_proto_deterministic(backend: str, device: str):
    """Prototypes are summed in a fixed order (per thread / program over heads, per tile over tokens, then
    over tiles; no atomics): two calls write bitwise-equal rows. F = 65 tokens span several tiles."""
    g, h, w, u = gen(35), 5, 13, 2
    q, k, v = (randn(g, 1, u * h * w, 3, 32, device=device) for _ in range(3))
    caches = [randn(g, 1, 3 * h * w, 3, 32, device=device) for _ in range(2)]
    slots, pos = torch.tensor([2, 0], device=device), torch.tensor([4, 5], device=device)
    protos = []
    for _ in range(2):
        proto = torch.full((1, 3, 32), float("nan"), device=device)
        rk.rope_append(q, k, v, *caches, proto, slots, pos, h, w, backend=backend)
        protos.append(proto)
    written = protos[0][:, [0, 2]]
    assert not written.isnan().any() and protos[0][:, 1].isnan().all() and protos[1][:, 1].isnan().all()
    assert torch.equal(written, protos[1][:, [0, 2]]), "prototypes differ between two identical calls"


def test_proto_is_deterministic_triton():
    _check_proto_deterministic("triton", backend_device("triton"))


def test_proto_is_deterministic_cuda(kernel_device):
    _check_proto_deterministic("cuda", kernel_device)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_int32_indices_match_int64(backend):
    assert_int32_indices_match_int64("rope_append", on(backend_device(backend), _args(gen(9))), backend)


def test_int32_indices_match_int64_cuda(kernel_device):
    assert_int32_indices_match_int64("rope_append", on(kernel_device, _args(gen(9))), "cuda")


def test_last_dim_strided_inputs_cuda(kernel_device):
    """q, k, v with stride(-1) == 2 (accepted by the public op; the wrapper copies them to unit rows)."""
    assert_strided_inputs_match_reference("rope_append", on(kernel_device, _args(gen(10))), (0, 1, 2), "cuda")


# ------------------------------------------------------------------------------------------ registration


@pytest.mark.parametrize("with_proto", [True, False], ids=["proto", "no_proto"])
def test_opcheck(with_proto):
    args = _args(gen(0))
    if not with_proto:
        args[5] = None
    torch.library.opcheck(torch.ops.relaxkv.rope_append.default, (*args, "reference"))


def _fp8_args(g: torch.Generator) -> list:
    """Every argument of the raw op but ``checked`` (:func:`_args`, backend "auto") with FP8 caches and their scales."""
    k_cache, v_cache, k_scale, v_scale, _ = _fp8_caches(g, B, 5 * F, H, D)
    return replace(replace(_args(g), 3, k_cache), 4, v_cache) + ["auto", k_scale, v_scale]


def test_opcheck_fp8():
    """Without test_schema: its mutation check multiplies the inputs, which torch cannot do for float8 on the CPU
    ("mul_cpu_reduced_float" not implemented for 'Float8_e4m3fn'); test_schema_marks_written_arguments instead."""
    torch.library.opcheck(torch.ops.relaxkv.rope_append.default, tuple(replace(_fp8_args(gen(0)), 10, "reference")),
                          test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_schema_marks_written_arguments():
    """The schema declares every tensor the op writes (the caches, proto and the FP8 scales) and no other."""
    schema = torch.ops.relaxkv.rope_append.default._schema
    written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert written == {"k_cache", "v_cache", "proto", "k_cache_scale", "v_cache_scale"}


def test_checked_true_matches_default_fp8():
    assert_checked_matches_default("rope_append", replace(_fp8_args(gen(6)), 10, "reference"))


def test_public_op_matches_registered_op():
    """The public function checks and forwards to torch.ops.relaxkv.rope_append (same result, same writes)."""
    assert_public_op_matches_registered("rope_append", _args(gen(1)))


def test_fake_shape():
    out, _ = run_on_fakes("rope_append", _args(gen(3)))
    assert out.shape == (B, 2 * F, H, D) and out.dtype == torch.float32


# ------------------------------------------------------------------------------------------- bad input

BAD = [  # (argument index, replacement, error type, message fragment)
    pytest.param(0, torch.randn(B, 2 * F, H), ValueError, "q: expected rank 4", id="q_rank"),
    pytest.param(0, torch.randn(B, 2 * F, H, 15), ValueError, "head_dim must be a positive even", id="odd_head_dim"),
    pytest.param(1, torch.randn(B, 2 * F, H, D).half(), TypeError, "k: expected dtype", id="k_dtype"),
    pytest.param(0, torch.randn(B, 2 * F + 3, H, D), ValueError, "q: expected U \\* height \\* width = 2 \\* 4 \\* 4",
                 id="partial_frame"),
    pytest.param(2, torch.randn(B, 2 * F, H + 1, D), ValueError, "v: expected shape", id="v_shape"),
    pytest.param(3, torch.randn(B, 5 * F, H, D).half(), TypeError, "k_cache: expected dtype", id="k_cache_dtype"),
    pytest.param(3, torch.randn(B, 5 * F, H, 2 * D), ValueError, "k_cache: expected shape", id="k_cache_head_dim"),
    pytest.param(4, torch.randn(B, 4 * F, H, D), ValueError, "v_cache: expected shape", id="v_cache_shape"),
    pytest.param(5, torch.randn(B, 0, D), ValueError, "k_cache, proto: expected room for at least one frame slot",
                 id="no_proto_slot"),
    pytest.param(5, torch.randn(B, 5, D).double(), TypeError, "proto: expected dtype", id="proto_dtype"),
    pytest.param(6, torch.tensor([3, 5]), ValueError, "frame_slot: expected values in \\[0, 4\\]", id="slot_range"),
    pytest.param(6, torch.tensor([-1, 1]), ValueError, "frame_slot: expected values in \\[0, 4\\]", id="slot_negative"),
    pytest.param(6, torch.tensor([3.0, 1.0]), TypeError, "frame_slot: expected dtype", id="slot_float"),
    pytest.param(6, torch.tensor([2, 2]), ValueError, "frame_slot: expected distinct values", id="slot_duplicate"),
    pytest.param(7, torch.tensor([7, 8, 9]), ValueError, "frame_pos: expected shape", id="pos_length"),
    pytest.param(7, torch.tensor([7, 8], device="meta"), ValueError, "frame_pos: expected tensors on cpu",
                 id="pos_device"),
    pytest.param(8, 0, ValueError, "height: expected an int in \\[1", id="height_zero"),
    pytest.param(10, "fused", ValueError, "backend: expected one of", id="backend_name"),
]


test_bad_input_raises_before_any_kernel, test_bad_scalar_type, test_checked_true_matches_default = raw_op_tests(
    "rope_append", _args, BAD, scalar=(9, 4.0, "width"))


FP8_BAD = [  # (FP8 caches or not, argument index, replacement, error type, message fragment); 11, 12: the scales
    pytest.param(True, 11, None, ValueError, "k_cache_scale: expected the float32 \\[B, n_rows, H\\] scales",
                 id="fp8_k_without_scale"),
    pytest.param(True, 12, None, ValueError, "v_cache_scale: expected the float32", id="fp8_v_without_scale"),
    pytest.param(True, 3, torch.randn(B, 5 * F, H, D), ValueError, "k_cache_scale: expected None for a torch.float32",
                 id="scale_with_plain_k_cache"),
    pytest.param(False, 12, torch.ones(B, 5 * F, H), ValueError, "v_cache_scale: expected None", id="plain_v_scale"),
    pytest.param(True, 4, torch.randn(B, 5 * F, H, D), TypeError, "v_cache: expected dtype in \\['torch.float8_e4m3fn'",
                 id="fp8_k_plain_v"),
    pytest.param(False, 4, torch.zeros(B, 5 * F, H, D, dtype=FP8), TypeError, "v_cache: expected dtype in "
                 "\\['torch.float32'\\]", id="plain_k_fp8_v"),
    pytest.param(True, 11, torch.ones(B, 5 * F, H + 1), ValueError, "k_cache_scale: expected shape",
                 id="k_scale_shape"),
    pytest.param(True, 12, torch.ones(B, 4 * F, H), ValueError, "v_cache_scale: expected shape", id="v_scale_rows"),
    pytest.param(True, 11, torch.ones(B, 5 * F, H, dtype=torch.float64), TypeError, "k_cache_scale: expected dtype",
                 id="k_scale_dtype"),
    pytest.param(True, 12, torch.ones(B, 5 * F, H, device="meta"), ValueError,
                 "v_cache_scale: expected a tensor on cpu", id="v_scale_device"),
]


@pytest.mark.parametrize("fp8, index, value, exc, match", FP8_BAD)
def test_fp8_bad_input_raises_before_any_kernel(fp8, index, value, exc, match):
    """The cache format checks, raised alike by rk.rope_append and torch.ops.relaxkv.rope_append."""
    args = _fp8_args(gen(7)) if fp8 else [*_args(gen(7)), "auto", None, None]
    assert_raw_op_raises_like_public("rope_append", replace(args, index, value), exc, match)
