"""The CUDA extension: built when nvcc exists, safe without a GPU, rope_append_cuda vs the reference."""
import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

from relaxkv_kernels.cuda import rope_append_cuda
from relaxkv_kernels.reference.rope import rope_angles, rope_ref, token_positions

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from setup import find_nvcc  # noqa: E402  (the search the build itself uses)

# the module (relaxkv_kernels.backends is also the name of the backends() function the package exports)
backends = importlib.import_module("relaxkv_kernels.availability")


def _extension_or_skip():
    ext = backends.cuda_extension()
    if ext is None:
        pytest.skip("relaxkv_kernels._C not built (no nvcc at install time)")
    return ext


@pytest.mark.skipif(find_nvcc() is None or os.environ.get("RELAXKV_SKIP_CUDA_BUILD") == "1",
                    reason="nvcc not found (or RELAXKV_SKIP_CUDA_BUILD=1): pure-Python install")
def test_extension_built_when_nvcc_present():
    assert backends.cuda_extension() is not None, backends._extension_error
    assert backends.backends()["cuda_extension"]


def test_backends_report():
    report = backends.backends()
    assert set(report) == {"reference", "triton", "cuda_extension", "cuda_device"}
    assert report["reference"] is True
    assert report["cuda_device"] == torch.cuda.is_available()
    assert report["cuda_extension"] == (backends.cuda_extension() is not None)


def test_device_count():
    n = _extension_or_skip().device_count()
    assert isinstance(n, int) and n >= 0
    if torch.cuda.is_available():
        assert n == torch.cuda.device_count()


def test_raw_launcher_without_device_raises():
    ext = _extension_or_skip()
    if ext.device_count() > 0:
        pytest.skip("a CUDA device is present: null pointers would fault")
    n_args = 41  # 9 pointers, 8 sizes, 22 strides, dtype, stream
    with pytest.raises(RuntimeError, match="relaxkv rope_append_cuda: no CUDA device available"):
        ext.rope_append_cuda(*([0] * n_args))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CUDA-less error path")
def test_rope_append_cuda_without_cuda_raises():
    q = torch.randn(1, 4, 1, 8)
    cache = torch.randn(1, 8, 1, 8)
    with pytest.raises(RuntimeError, match="relaxkv rope_append_cuda: "):
        rope_append_cuda(q, q, q, cache, cache.clone(), torch.randn(1, 2, 8),
                         torch.tensor([1]), torch.tensor([0]), 2, 2)


# ---------------------------------------------------------------------------------------------
# GPU: rope_append_cuda against reference/rope.py. tests/conftest.py fills the package's
# torch.empty allocations (q_rot) with NaN; the cache rows and proto slots to be written are NaN too.
# ---------------------------------------------------------------------------------------------

def _rope_same_dtype(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Wan RoPE computed the plain PyTorch way in x.dtype (cos/sin tables cast to x.dtype)."""
    ang = rope_angles(pos, x.shape[-1])
    cos, sin = ang.cos().to(x.dtype)[:, None], ang.sin().to(x.dtype)[:, None]  # [N, 1, D/2]
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


def _assert_rope_close(out: torch.Tensor, x: torch.Tensor, pos: torch.Tensor, what: str):
    ref = rope_ref(x.double(), pos)
    err = (out.double() - ref).abs().max().item()
    if x.dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5, msg=what)
    else:  # flash-attention rule: at most ~2x the error of the same-dtype PyTorch computation
        err_torch = (_rope_same_dtype(x, pos).double() - ref).abs().max().item()
        assert err <= 2 * err_torch + 1e-5, f"{what}: kernel err {err:.3e} vs torch {x.dtype} err {err_torch:.3e}"


def _make_qkv(layout, B, N, H, D, dtype, dev):
    g = dict(dtype=dtype, device=dev)
    if layout == "strided":  # 16-byte aligned views -> vectorised path
        q = torch.randn(B, N, H + 2, D, **g)[:, :, 1:H + 1]
        k = torch.randn(B, H, N, D, **g).transpose(1, 2)
        v = torch.randn(B, N, H, D, **g)
    else:  # "unaligned": odd element offsets and strides -> per-element path
        q = torch.randn(B, N, H, D + 1, **g)[..., 1:]
        k = torch.randn(B, N, H, D, **g)
        v = torch.randn(B, N + 1, H, D, **g)[:, 1:]
    assert not q.is_contiguous()
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("layout,U,h,w,H,D", [
    ("strided", 3, 5, 7, 3, 128),
    ("unaligned", 3, 5, 7, 3, 128),
    ("strided", 1, 1, 9, 2, 64),  # single frame, one token row, D = 64 (12/10/10 pairs)
    ("strided", 3, 30, 52, 12, 128),  # a Wan2.1-1.3B chunk: 3 frames of 1560 tokens, 12 heads
], ids=["strided-wan_d", "unaligned-wan_d", "single_frame-d64", "wan_chunk"])
def test_rope_append_cuda_matches_reference(kernel_device, dtype, layout, U, h, w, H, D):
    dev, B, F = kernel_device, 2, h * w
    n_slots = U + 2
    q, k, v = _make_qkv(layout, B, U * F, H, D, dtype, dev)
    q0, k0, v0 = q.clone(), k.clone(), v.clone()
    frame_slot = torch.randperm(n_slots, device=dev)[:U]
    frame_pos = torch.randperm(12, device=dev)[:U] + 2

    k_cache = torch.randn(B, n_slots * F, H, D, dtype=dtype, device=dev)
    v_cache = torch.randn_like(k_cache)
    proto = torch.randn(B, n_slots, D, device=dev)
    rows = (frame_slot[:, None] * F + torch.arange(F, device=dev)).flatten()  # [U * F], chunk order
    k_cache[:, rows] = float("nan")
    v_cache[:, rows] = float("nan")
    proto[:, frame_slot] = float("nan")
    untouched = torch.ones(n_slots * F, dtype=torch.bool, device=dev)
    untouched[rows] = False
    kc0, vc0, p0 = k_cache.clone(), v_cache.clone(), proto.clone()

    q_rot = rope_append_cuda(q, k, v, k_cache, v_cache, proto, frame_slot, frame_pos, h, w)

    pos = token_positions(frame_pos, h, w)
    assert q_rot.shape == q.shape and q_rot.dtype == dtype and q_rot.is_contiguous()
    _assert_rope_close(q_rot, q, pos, "q_rot")
    _assert_rope_close(k_cache[:, rows], k, pos, "k_cache")
    assert torch.equal(v_cache[:, rows], v)
    proto_ref = k.double().unflatten(1, (U, F)).mean(dim=(2, 3))  # [B, U, D]
    torch.testing.assert_close(proto[:, frame_slot].double(), proto_ref, atol=1e-5, rtol=1e-5)

    # untouched rows and slots, and the inputs, are unchanged
    assert torch.equal(k_cache[:, untouched], kc0[:, untouched])
    assert torch.equal(v_cache[:, untouched], vc0[:, untouched])
    keep = torch.ones(n_slots, dtype=torch.bool, device=dev)
    keep[frame_slot] = False
    assert torch.equal(proto[:, keep], p0[:, keep])
    assert torch.equal(q, q0) and torch.equal(k, k0) and torch.equal(v, v0)


def test_rope_append_cuda_rejects_bad_inputs(kernel_device):
    dev = kernel_device
    q = torch.randn(1, 4, 1, 8, device=dev)
    cache, proto = torch.randn(1, 8, 1, 8, device=dev), torch.randn(1, 2, 8, device=dev)
    slot, pos = torch.tensor([1], device=dev), torch.tensor([0], device=dev)
    with pytest.raises(ValueError, match="tokens"):
        rope_append_cuda(q, q, q, cache, cache.clone(), proto, slot, pos, 3, 2)
    with pytest.raises(ValueError, match="k_cache: expected a contiguous last dim"):
        strided = torch.randn(1, 8, 1, 16, device=dev)[..., ::2]  # stride(-1) == 2: written in place, refused
        rope_append_cuda(q, q, q, strided, cache.clone(), proto, slot, pos, 2, 2)
    with pytest.raises(ValueError, match="dtype"):
        rope_append_cuda(q, q, q, cache.half(), cache.half(), proto, slot, pos, 2, 2)


def _every_other(x: torch.Tensor) -> torch.Tensor:
    """x [U] as a stride-2 view over poison: a kernel that ignores the index stride reads -2^30."""
    return torch.stack([x, torch.full_like(x, -(2**30))], dim=1)[:, 0]


def _check_rope_append_views(dev, dtype, layout, U, h, w, H, D, n_slots, frame_slot, frame_pos):
    """rope_append_cuda with the caches and proto as views of larger buffers (padded heads, every other proto
    row) and stride-2 frame_slot / frame_pos; frames whose slot is outside [0, n_slots) write q_rot only
    (the wrapper's contract). Every element of the buffers outside the written rows must be unchanged."""
    B, F = 2, h * w
    q, k, v = _make_qkv(layout, B, U * F, H, D, dtype, dev)
    q0, k0, v0 = q.clone(), k.clone(), v.clone()
    kc_buf = torch.randn(B, n_slots * F, H + 2, D, dtype=dtype, device=dev)
    vc_buf = torch.randn_like(kc_buf)
    p_buf = torch.randn(B, 2 * n_slots, D, device=dev)
    cache_view = lambda t: t[:, :, 1:H + 1]  # noqa: E731
    proto_view = lambda t: t[:, 1::2]  # noqa: E731
    valid = [u for u in range(U) if 0 <= int(frame_slot[u]) < n_slots]
    slots = frame_slot[valid]
    rows = (slots[:, None] * F + torch.arange(F, device=dev)).flatten()  # cache rows, chunk order
    toks = (torch.tensor(valid, device=dev)[:, None] * F + torch.arange(F, device=dev)).flatten()
    written = [torch.zeros_like(t, dtype=torch.bool) for t in (kc_buf, vc_buf, p_buf)]
    for t in (kc_buf, vc_buf, written[0], written[1]):  # the rows to be written: NaN, and their mask
        cache_view(t)[:, rows] = True if t.dtype == torch.bool else float("nan")
    for t in (p_buf, written[2]):
        proto_view(t)[:, slots] = True if t.dtype == torch.bool else float("nan")
    bufs0 = [t.clone() for t in (kc_buf, vc_buf, p_buf)]

    q_rot = rope_append_cuda(q, k, v, cache_view(kc_buf), cache_view(vc_buf), proto_view(p_buf),
                             _every_other(frame_slot), _every_other(frame_pos), h, w)

    pos = token_positions(frame_pos, h, w)
    assert q_rot.shape == q.shape and q_rot.dtype == dtype and q_rot.is_contiguous()
    _assert_rope_close(q_rot, q, pos, "q_rot")
    _assert_rope_close(cache_view(kc_buf)[:, rows], k[:, toks], pos[toks], "k_cache")
    assert torch.equal(cache_view(vc_buf)[:, rows], v[:, toks])
    proto_ref = k.double().unflatten(1, (U, F)).mean(dim=(2, 3))[:, valid]  # [B, U', D]
    torch.testing.assert_close(proto_view(p_buf)[:, slots].double(), proto_ref, atol=1e-5, rtol=1e-5)
    for name, t, t0, mask in zip(("k_cache", "v_cache", "proto"), (kc_buf, vc_buf, p_buf), bufs0, written):
        assert torch.equal(t[~mask], t0[~mask]), f"{name}: memory outside the written rows changed"
    assert torch.equal(q, q0) and torch.equal(k, k0) and torch.equal(v, v0)


@pytest.mark.parametrize("dtype,layout,U,h,w,H,D", [
    (torch.float32, "strided", 2, 2, 4, 2, 4),  # F = 8: exactly one token tile; D = 4: temporal pairs only
    (torch.bfloat16, "unaligned", 3, 2, 3, 3, 6),  # F = 6 < one tile; D = 6: one pair per axis
    (torch.float16, "strided", 2, 4, 4, 2, 20),  # F = 16: two full tiles; D = 20: 4/3/3 pairs, scalar fp16
    (torch.float32, "unaligned", 2, 3, 3, 1, 512),  # max head_dim: 256 lanes of 2 dims, a single row lane
    (torch.float16, "unaligned", 3, 1, 5, 2, 2),  # D = 2: the single pair is temporal
    (torch.bfloat16, "strided", 3, 3, 6, 5, 128),  # F = 18: two tiles and 2 tokens, 5 heads on 16 row lanes
], ids=["one_tile-d4-fp32", "small_frame-d6-bf16", "two_tiles-d20-fp16", "d512-scalar-fp32", "d2-fp16",
        "tile_tail-wan_d-bf16"])
def test_rope_append_cuda_edge_cases(kernel_device, dtype, layout, U, h, w, H, D):
    """Token tiles (kRopeTileTokens = 8) full, partial and alone; head_dim at the ends of the range and with
    uneven pair splits; frame slots and positions out of order (descending slots, position 0)."""
    dev, n_slots = kernel_device, U + 3
    torch.manual_seed(31)
    frame_slot = torch.arange(n_slots - 1, n_slots - 1 - 2 * U, -2, device=dev)  # descending, gaps between
    frame_pos = torch.tensor([9, 0, 4][:U], device=dev)
    _check_rope_append_views(dev, dtype, layout, U, h, w, H, D, n_slots, frame_slot, frame_pos)


@pytest.mark.parametrize("bad_slot", [5, -1], ids=["slot_n_slots", "slot_negative"])
def test_rope_append_cuda_out_of_range_slot_writes_only_q_rot(kernel_device, bad_slot):
    """Wrapper contract: a frame whose slot is outside [0, n_slots) gets its q rotated; its K, V and prototype
    go nowhere (no cache row, no proto row), while the other frames of the chunk are written as usual."""
    torch.manual_seed(32)
    frame_slot = torch.tensor([3, bad_slot, 0], device=kernel_device)
    frame_pos = torch.tensor([6, 7, 8], device=kernel_device)
    _check_rope_append_views(kernel_device, torch.bfloat16, "strided", 3, 2, 5, 2, 64, 5, frame_slot, frame_pos)
