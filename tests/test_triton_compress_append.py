"""Triton write-path kernels (block compression, RoPE + append) vs the PyTorch references."""
import os
import zlib

import pytest
import torch

pytest.importorskip("triton")
if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
    pytest.skip("Triton needs a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)

from relaxkv_kernels.reference import compress_kv_ref, rope_append_ref, rope_ref, token_positions  # noqa: E402
from relaxkv_kernels.reference.pack import compressed_grid  # noqa: E402
from relaxkv_kernels.triton import compress_kv_triton, rope_append_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _gen(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def _randn(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(DEVICE, dtype)


def _assert_output(out, truth, lowp, dtype, rtol32=1e-5, atol32=1e-5):
    """fp32: a few ulps of O(1) values. fp16: at most twice the error of the torch computation that rounds the
    same (float32/float64-exact) result to fp16 (0.5 ulp), plus 1e-5 for the kernel's fp32 angle rounding."""
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), truth, rtol=rtol32, atol=atol32)
    else:
        err = (out.double() - truth).abs().max().item()
        base = (lowp.double() - truth).abs().max().item()
        assert err <= 2 * base + 1e-5, f"kernel error {err:.3g} vs torch-{dtype} error {base:.3g}"


# (id, dtype, heads, head_dim, frames, height, width, block slot, t0, non-contiguous k/v)
COMPRESS_CASES = [
    ("fp32-exact-grid", torch.float32, 2, 16, 2, 8, 8, 1, 6, False),
    ("fp16-floored-grid", torch.float16, 2, 32, 3, 9, 10, 2, 11, False),
    ("fp32-two-tiles", torch.float32, 1, 32, 4, 12, 16, 0, 0, False),
    ("fp16-noncontig-kv", torch.float16, 2, 32, 2, 4, 12, 3, 25, True),
]


@pytest.mark.parametrize("case", COMPRESS_CASES, ids=[c[0] for c in COMPRESS_CASES])
def test_compress_kv_matches_reference(case):
    name, dtype, heads, head_dim, frames, height, width, slot, t0, noncontig = case
    gen = _gen(name)
    n = frames * height * width
    if noncontig:  # K and V interleaved in one fused buffer
        kv = _randn(gen, 2, n, heads, 2, head_dim, dtype=dtype)
        k, v = kv[:, :, :, 0], kv[:, :, :, 1]
        assert not (k.is_contiguous() or v.is_contiguous())
    else:
        k, v = _randn(gen, 2, n, heads, head_dim, dtype=dtype), _randn(gen, 2, n, heads, head_dim, dtype=dtype)
    nt, ny, nx = compressed_grid(frames, height, width)
    n_c, row0 = nt * ny * nx, 5
    rows = slice(row0 + slot * n_c, row0 + (slot + 1) * n_c)
    k_pool = _randn(gen, 2, row0 + 4 * n_c + 3, heads, head_dim, dtype=dtype)
    v_pool = _randn(gen, 2, row0 + 4 * n_c + 3, heads, head_dim, dtype=dtype)
    mean_key = _randn(gen, 2, 4, heads, head_dim)
    for t in (k_pool[:, rows], v_pool[:, rows], mean_key[:, slot]):
        t.fill_(float("nan"))  # every target element must be written
    k_pool0, v_pool0, mean_key0, k0, v0 = k_pool.clone(), v_pool.clone(), mean_key.clone(), k.clone(), v.clone()

    compress_kv_triton(k, v, k_pool, v_pool, mean_key, torch.tensor([slot], device=DEVICE),
                       torch.tensor([t0], device=DEVICE), row0, frames, height, width)

    assert torch.equal(k, k0) and torch.equal(v, v0), "inputs changed"
    keep = torch.ones(k_pool.shape[1], dtype=torch.bool)
    keep[rows] = False
    assert torch.equal(k_pool[:, keep], k_pool0[:, keep]) and torch.equal(v_pool[:, keep], v_pool0[:, keep])
    keep_slot = torch.arange(4) != slot
    assert torch.equal(mean_key[:, keep_slot], mean_key0[:, keep_slot])
    ck64, cv64, mk64 = compress_kv_ref(k.double(), v.double(), float(t0), frames, height, width)
    ck, cv, mk = compress_kv_ref(k, v, float(t0), frames, height, width)
    _assert_output(k_pool[:, rows], ck64, ck, dtype)
    _assert_output(v_pool[:, rows], cv64, cv, dtype)
    # mean key: fp32 sums of exact inputs in both, different order: fp32 rounding only, whatever the input dtype
    torch.testing.assert_close(mean_key[:, slot], mk, rtol=1e-5, atol=1e-6)


# (id, dtype, heads, head_dim, height, width, frame slots, frame positions, non-contiguous q/k/v)
APPEND_CASES = [
    ("fp32-two-frames", torch.float32, 2, 16, 3, 7, [4, 1], [9, 10], False),
    ("fp16-one-frame", torch.float16, 1, 32, 4, 5, [2], [0], False),
    ("fp16-noncontig-qkv", torch.float16, 2, 32, 5, 6, [0, 5, 3], [17, 18, 19], True),
    ("fp32-far-frames", torch.float32, 2, 32, 4, 4, [3, 4], [300, 301], False),
]


@pytest.mark.parametrize("case", APPEND_CASES, ids=[c[0] for c in APPEND_CASES])
def test_rope_append_matches_reference(case):
    name, dtype, heads, head_dim, height, width, slots, positions, noncontig = case
    gen = _gen(name)
    f, u = height * width, len(slots)
    if noncontig:  # q, k, v as slices of one fused qkv projection
        qkv = _randn(gen, 2, u * f, 3, heads, head_dim, dtype=dtype)
        q, k, v = qkv.unbind(2)
        assert not q.is_contiguous()
    else:
        q, k, v = (_randn(gen, 2, u * f, heads, head_dim, dtype=dtype) for _ in range(3))
    n_slots = 6
    k_cache = _randn(gen, 2, n_slots * f, heads, head_dim, dtype=dtype)
    v_cache = _randn(gen, 2, n_slots * f, heads, head_dim, dtype=dtype)
    proto = _randn(gen, 2, n_slots, head_dim)
    frame_slot = torch.tensor(slots, device=DEVICE)
    frame_pos = torch.tensor(positions, device=DEVICE)
    rows = (frame_slot[:, None].cpu() * f + torch.arange(f)).reshape(-1)
    for cache in (k_cache, v_cache):
        cache[:, rows] = float("nan")
    proto[:, frame_slot] = float("nan")
    k_ref, v_ref, p_ref = k_cache.clone(), v_cache.clone(), proto.clone()
    inputs = (q, k, v, frame_slot, frame_pos)
    before = [t.clone() for t in inputs]

    q_rot = rope_append_triton(q, k, v, k_cache, v_cache, proto, frame_slot, frame_pos, height, width)
    q_ref = rope_append_ref(q, k, v, k_ref, v_ref, p_ref, frame_slot, frame_pos, height, width)

    for t, t0 in zip(inputs, before):
        assert torch.equal(t, t0), "inputs changed"
    keep = torch.ones(k_cache.shape[1], dtype=torch.bool)
    keep[rows] = False
    assert torch.equal(k_cache[:, keep], k_ref[:, keep]) and torch.equal(v_cache[:, keep], v_ref[:, keep])
    assert torch.equal(v_cache, v_ref), "values are copied as they are"
    pos = token_positions(frame_pos.cpu(), height, width).to(DEVICE)
    q64, k64 = rope_ref(q.double(), pos), rope_ref(k.double(), pos)
    # far frames: an fp32 angle of ~300 rad is rounded to half an ulp (1.5e-5 rad) by design (DESIGN.md 3:
    # fp32 or better); times |x| <= ~4 that is up to ~6e-5 on the output (measured: 1e-5)
    atol32 = 6e-5 if max(positions) > 100 else 1e-5
    _assert_output(q_rot, q64, q_ref, dtype, atol32=atol32)
    _assert_output(k_cache[:, rows], k64, k_ref[:, rows], dtype, atol32=atol32)
    # prototypes: fp32 sums of exact inputs in both, different order: fp32 rounding only
    torch.testing.assert_close(proto, p_ref, rtol=1e-5, atol=1e-6, equal_nan=False)


def test_compress_kv_index_dtypes():
    """int32 slot / t0 (which the public op accepts) give the int64 result; a float slot is refused."""
    k = torch.randn(1, 2 * 4 * 4, 1, 16, device=DEVICE)
    mean_key = torch.randn(1, 2, 1, 16, device=DEVICE)
    outs = []
    for dtype in (torch.int64, torch.int32):
        pools = [torch.randn(1, 8, 1, 16, generator=torch.Generator().manual_seed(0)).to(DEVICE) for _ in range(2)]
        mk = mean_key.clone()
        compress_kv_triton(k, k, *pools, mk, torch.tensor([1], dtype=dtype, device=DEVICE),
                           torch.tensor([5], dtype=dtype, device=DEVICE), 0, 2, 4, 4)
        outs.append((*pools, mk))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="block_slot: expected int32/int64 \\[1\\]"):
        compress_kv_triton(k, k, *outs[0][:2], mean_key, torch.tensor([0.0], device=DEVICE),
                           torch.tensor([0], device=DEVICE), 0, 2, 4, 4)
