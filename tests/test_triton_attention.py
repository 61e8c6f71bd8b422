"""Triton segment attention vs the PyTorch reference (interpreter on CPU, real kernels on a GPU)."""
import os
import zlib

import pytest
import torch

pytest.importorskip("triton")
if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
    pytest.skip("Triton needs a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)

from relaxkv_kernels.reference import gather_segments_ref, sparse_kv_attention_ref  # noqa: E402
from relaxkv_kernels.triton import sparse_kv_attention_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (id, dtype, heads, head_dim, n_q, segments of batch 0, segments of batch 1, non-contiguous inputs)
# A segment is (start_row, length, delta); the pools have 128 rows.
CASES = [
    ("fp32-d16-ragged", torch.float32, 2, 16, 13,
     [(0, 1, 0), (3, 7, 3), (12, 16, -2), (30, 37, 5), (70, 0, 4)],
     [(100, 16, -7), (5, 0, 0), (40, 37, 2), (90, 1, 1), (0, 7, 0)], False),
    ("fp16-d32-ragged", torch.float16, 2, 32, 21,
     [(0, 37, -3), (50, 0, 9), (60, 16, 0), (80, 1, 6), (90, 7, -1)],
     [(10, 7, 4), (20, 1, -5), (30, 16, 0), (64, 37, 3), (120, 0, 0)], False),
    ("fp32-d32-one-frame", torch.float32, 1, 32, 24, [(16, 24, 0)], [(48, 24, 0)], False),
    ("fp16-d64-large-deltas", torch.float16, 1, 64, 17,
     [(0, 40, -40), (64, 33, 25)], [(20, 50, 17), (100, 9, -33)], False),
    ("fp32-d32-noncontig", torch.float32, 2, 32, 19,
     [(2, 16, 1), (40, 37, -4), (90, 0, 3)], [(7, 7, -2), (60, 30, 5), (1, 1, 0)], True),
    ("fp16-d32-batch1-empty", torch.float16, 2, 32, 9,
     [(0, 16, 2), (20, 0, 0)], [(0, 0, 3), (40, 0, -1)], False),
]


def _inputs(dtype, heads, head_dim, n_q, noncontig, gen):
    shape_q, shape_kv = (2, n_q, heads, head_dim), (2, 128, heads, head_dim)
    if noncontig:  # q: every other token of a longer one; pools: K and V interleaved in one buffer
        q = torch.randn(2, 2 * n_q, heads, head_dim, generator=gen).to(DEVICE, dtype)[:, ::2]
        kv = torch.randn(2, 128, heads, 2, head_dim, generator=gen).to(DEVICE, dtype)
        k_pool, v_pool = kv[:, :, :, 0], kv[:, :, :, 1]
        assert not (q.is_contiguous() or k_pool.is_contiguous() or v_pool.is_contiguous())
    else:
        q = torch.randn(shape_q, generator=gen).to(DEVICE, dtype)
        k_pool = torch.randn(shape_kv, generator=gen).to(DEVICE, dtype)
        v_pool = torch.randn(shape_kv, generator=gen).to(DEVICE, dtype)
    return q, k_pool, v_pool


def _attention_lowp(q, k_pool, v_pool, seg, scale):
    """The same computation done by torch in q's dtype: keys delta-rotated and rounded, matmuls and softmax low."""
    out = []
    for b in range(q.shape[0]):
        k, v = gather_segments_ref(k_pool[b], v_pool[b], seg[b].cpu())
        qb = q[b].transpose(0, 1)  # [H, Nq, D]
        logits = (qb @ k.permute(1, 2, 0)) * scale  # [H, Nq, Nk]
        out.append((logits.softmax(-1) @ v.transpose(0, 1)).transpose(0, 1))
    return torch.stack(out)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_sparse_kv_attention_matches_reference(case):
    _, dtype, heads, head_dim, n_q, seg0, seg1, noncontig = case
    gen = torch.Generator().manual_seed(zlib.crc32(case[0].encode()))
    q, k_pool, v_pool = _inputs(dtype, heads, head_dim, n_q, noncontig, gen)
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
        # fp16: P and the rotated Q are rounded to fp16 before the dots (flash-attention practice); allow
        # twice the error of the same computation done by torch in fp16 (~7e-4 here), plus 2e-4 (a few fp16
        # ulps of the ~0.1-0.5 outputs; the kernel's own error is ~3e-4)
        err = (out.double() - truth).abs().max().item()
        base = (_attention_lowp(q, k_pool, v_pool, seg, scale).double() - truth).abs().max().item()
        assert err <= 2 * base + 2e-4, f"kernel error {err:.3g} vs torch-fp16 error {base:.3g}"
    if seg[1, :, 1].sum() == 0:  # a batch element with no key at all gets zeros, like the reference
        assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_sparse_kv_attention_rejects_bad_shapes():
    q = torch.randn(2, 4, 1, 16, device=DEVICE)
    pool = torch.randn(2, 8, 1, 16, device=DEVICE)
    seg = torch.zeros(2, 1, 3, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="seg: expected int32"):
        sparse_kv_attention_triton(q, pool, pool, seg, 0.25)
    with pytest.raises(ValueError, match="k_pool: expected"):
        sparse_kv_attention_triton(q, pool[:, :, :, :8], pool, seg.int(), 0.25)
