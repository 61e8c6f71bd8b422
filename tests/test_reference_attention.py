"""Segment attention and fused append references vs the literal (official-style) paths.

Literal attention: pools hold PRE-RoPE keys; per batch element, slice + cat the segments' rows, rotate the
gathered keys with rope_ref at their FINAL positions (write position + delta), then SDPA in float64.
The op under test instead reads pools of keys rotated at their write positions (built with rope_ref).
"""
import pytest
import torch
import torch.nn.functional as F

from relaxkv_kernels.reference.append import rope_append_ref
from relaxkv_kernels.reference.attention import gather_segments_ref, sparse_kv_attention_ref
from relaxkv_kernels.reference.rope import delta_rope_ref, rope_ref, token_positions

GRID_H, GRID_W = 2, 4  # pool rows form frames of 8 tokens


def pool_positions(frame_pos: list[int]) -> torch.Tensor:
    """Write positions of every pool row: frames of GRID_H x GRID_W tokens, float64 [n_rows, 3]."""
    return token_positions(torch.tensor(frame_pos), GRID_H, GRID_W)


def literal_attention(q, k_pre, v, pos, seg, scale):
    """q [B, Nq, H, D]; k_pre/v [B, n_rows, H, D]; pos [B, n_rows, 3]; seg [B, n_seg, 3] -> float64."""
    out = []
    for b in range(q.shape[0]):
        ks, vs, ps = [], [], []
        for start, length, delta in seg[b].tolist():
            ks.append(k_pre[b, start : start + length])
            vs.append(v[b, start : start + length])
            p = pos[b, start : start + length].clone()
            p[:, 0] += delta
            ps.append(p)
        k = rope_ref(torch.cat(ks).double(), torch.cat(ps))  # [Nk, H, D] at final positions
        vv = torch.cat(vs).double()
        o = F.scaled_dot_product_attention(
            q[b].double().transpose(0, 1), k.transpose(0, 1), vv.transpose(0, 1), scale=scale
        )
        out.append(o.transpose(0, 1))
    return torch.stack(out)


CASES = [
    pytest.param(
        1, 32, 1, [3, 4, 5, 6],
        [[[0, 1, -2], [9, 7, 0], [16, 16, 3]]],
        id="D32-H1-ragged-1-7-16",
    ),
    pytest.param(
        2, 32, 2, [10, 11, 40, 41],
        [
            [[0, 16, -5], [20, 0, 9], [24, 7, 2]],
            [[17, 1, 7], [8, 16, -30], [0, 0, 0]],
        ],
        id="D32-H2-B2-len0-mixed-deltas",
    ),
    pytest.param(
        2, 128, 2, [0, 1, 57, 58, 59],
        [
            [[32, 8, 0], [0, 16, 55], [16, 1, -3], [39, 1, 0]],
            [[8, 8, -56], [24, 16, -20], [40, 0, 100], [0, 7, 2]],
        ],
        id="D128-H2-B2-relax-like",
    ),
    pytest.param(
        1, 128, 1, [100], [[[3, 1, -99], [0, 0, 0]]],
        id="D128-H1-single-key",
    ),
]


@pytest.mark.parametrize("b, d, h, frame_pos, table", CASES)
def test_sparse_kv_attention_ref_vs_literal(b, d, h, frame_pos, table):
    g = torch.Generator().manual_seed(300 + d + 7 * b + len(frame_pos))
    n_rows = len(frame_pos) * GRID_H * GRID_W
    nq = 5
    pos = pool_positions(frame_pos)
    k_pre = torch.randn(b, n_rows, h, d, generator=g)
    v = torch.randn(b, n_rows, h, d, generator=g)
    q = torch.randn(b, nq, h, d, generator=g)
    k_pool = rope_ref(k_pre, pos)  # rotated at write positions, float32
    seg = torch.tensor(table, dtype=torch.int32)
    inputs = [t.clone() for t in (q, k_pool, v, seg)]
    scale = d**-0.5
    got = sparse_kv_attention_ref(q, k_pool, v, seg, scale)
    assert got.dtype == q.dtype and got.shape == q.shape
    expected = literal_attention(q, k_pre, v, pos.expand(b, -1, -1), seg, scale)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=2e-5)
    for before, after in zip(inputs, (q, k_pool, v, seg)):
        assert torch.equal(before, after)


def test_sparse_kv_attention_ref_float64_tight():
    """float64 inputs: the reference computes in float32, so it agrees to ~1e-6 with the float64 literal."""
    g = torch.Generator().manual_seed(310)
    d, h = 64, 2
    pos = pool_positions([2, 3, 9])
    k_pre = torch.randn(1, 24, h, d, dtype=torch.float64, generator=g)
    v = torch.randn(1, 24, h, d, dtype=torch.float64, generator=g)
    q = torch.randn(1, 3, h, d, dtype=torch.float64, generator=g)
    seg = torch.tensor([[[16, 8, -6], [0, 5, 4], [5, 11, 0]]], dtype=torch.int32)
    got = sparse_kv_attention_ref(q, rope_ref(k_pre, pos), v, seg, 0.125)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, literal_attention(q, k_pre, v, pos[None], seg, 0.125), rtol=0, atol=1e-5)


def test_sparse_kv_attention_segment_order_irrelevant_to_softmax():
    """One softmax over all segments: permuting table rows (same keys, same deltas) leaves the output unchanged."""
    g = torch.Generator().manual_seed(311)
    d, h = 32, 2
    k_pool = torch.randn(1, 32, h, d, generator=g)
    v = torch.randn(1, 32, h, d, generator=g)
    q = torch.randn(1, 4, h, d, generator=g)
    seg = torch.tensor([[[0, 7, 3], [12, 16, -1], [9, 1, 0]]], dtype=torch.int32)
    a = sparse_kv_attention_ref(q, k_pool, v, seg, d**-0.5)
    b = sparse_kv_attention_ref(q, k_pool, v, seg[:, [2, 0, 1]], d**-0.5)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_gather_segments_ref_order():
    g = torch.Generator().manual_seed(320)
    d, h = 32, 2
    k_pool = torch.randn(40, h, d, generator=g)
    v_pool = torch.randn(40, h, d, generator=g)
    seg = torch.tensor([[30, 3, -4], [2, 1, 0], [10, 0, 5], [5, 7, 11]], dtype=torch.int32)
    k, v = gather_segments_ref(k_pool, v_pool, seg)
    rows = list(range(30, 33)) + [2] + list(range(5, 12))
    deltas = [-4.0] * 3 + [0.0] + [11.0] * 7
    assert k.shape == v.shape == (11, h, d)
    assert torch.equal(v, v_pool[rows])
    for i, (r, dl) in enumerate(zip(rows, deltas)):
        torch.testing.assert_close(
            k[i], delta_rope_ref(k_pool[r : r + 1], torch.tensor([dl]))[0], rtol=0, atol=0
        )
    assert torch.equal(k[3], k_pool[2])  # delta 0: unchanged
    assert torch.equal(k[..., 12:], k_pool[rows][..., 12:])  # D = 32: only the 12 temporal dims move


# ---------------------------------------------------------------------------------------------- append


@pytest.mark.parametrize(
    "b, d, h, grid, frame_slot, frame_pos",
    [
        pytest.param(1, 32, 2, (2, 3), [4], [9], id="D32-single-frame"),
        pytest.param(2, 64, 2, (3, 2), [5, 1, 2], [12, 13, 14], id="D64-B2-wrapped-slots"),
        pytest.param(1, 128, 1, (1, 5), [0, 3], [0, 7], id="D128-gap-positions"),
    ],
)
def test_rope_append_ref_vs_literal(b, d, h, grid, frame_slot, frame_pos):
    g = torch.Generator().manual_seed(400 + d + len(frame_slot))
    gh, gw = grid
    f = gh * gw
    u = len(frame_slot)
    n_slots = 6
    q = torch.randn(b, u * f, h, d, generator=g)
    k = torch.randn(b, u * f, h, d, generator=g)
    v = torch.randn(b, u * f, h, d, generator=g)
    k_cache = torch.randn(b, n_slots * f, h, d, generator=g)
    v_cache = torch.randn(b, n_slots * f, h, d, generator=g)
    proto = torch.randn(b, n_slots, d, generator=g)
    k_cache0, v_cache0, proto0 = k_cache.clone(), v_cache.clone(), proto.clone()
    q0, k0, v0 = q.clone(), k.clone(), v.clone()

    q_rot = rope_append_ref(
        q, k, v, k_cache, v_cache, proto, torch.tensor(frame_slot), torch.tensor(frame_pos), gh, gw
    )

    # literal positions: frame u, row-major (y, x)
    pos = torch.tensor(
        [[float(frame_pos[i]), float(y), float(x)] for i in range(u) for y in range(gh) for x in range(gw)],
        dtype=torch.float64,
    )
    assert q_rot.dtype == q.dtype
    torch.testing.assert_close(q_rot, rope_ref(q.double(), pos).float(), rtol=0, atol=1e-6)
    written = torch.zeros(n_slots * f, dtype=torch.bool)
    k_rot = rope_ref(k.double(), pos).float()
    for i, slot in enumerate(frame_slot):
        rows = slice(slot * f, (slot + 1) * f)
        written[rows] = True
        torch.testing.assert_close(k_cache[:, rows], k_rot[:, i * f : (i + 1) * f], rtol=0, atol=1e-6)
        assert torch.equal(v_cache[:, rows], v[:, i * f : (i + 1) * f])
        for bb in range(b):
            tokens_mean = k[bb, i * f : (i + 1) * f].double().mean(dim=0)  # [H, D]
            torch.testing.assert_close(proto[bb, slot], tokens_mean.mean(dim=0).float(), rtol=0, atol=1e-6)
    assert torch.equal(k_cache[:, ~written], k_cache0[:, ~written])
    assert torch.equal(v_cache[:, ~written], v_cache0[:, ~written])
    others = [s for s in range(n_slots) if s not in frame_slot]
    assert torch.equal(proto[:, others], proto0[:, others])
    assert torch.equal(q, q0) and torch.equal(k, k0) and torch.equal(v, v0)


def test_rope_append_ref_proto_not_normalised():
    g = torch.Generator().manual_seed(410)
    k = torch.randn(1, 4, 2, 16, generator=g) * 5 + 3
    proto = torch.randn(1, 2, 16, generator=g)
    rope_append_ref(
        torch.randn(1, 4, 2, 16, generator=g), k, torch.randn(1, 4, 2, 16, generator=g),
        torch.randn(1, 8, 2, 16, generator=g), torch.randn(1, 8, 2, 16, generator=g), proto,
        torch.tensor([1]), torch.tensor([3]), 2, 2,
    )
    assert proto[0, 1].norm() > 10  # mean about 3 per dim: not unit norm
    torch.testing.assert_close(proto[0, 1], k[0].mean(dim=(0, 1)), rtol=0, atol=1e-6)


def test_sparse_kv_attention_ref_non_contiguous_pools():
    g = torch.Generator().manual_seed(330)
    d, h = 32, 2
    k_big = torch.randn(1, 24, 2 * h, d, generator=g)
    v_big = torch.randn(1, h, 24, d, generator=g)
    k_pool, v_pool = k_big[:, :, ::2], v_big.transpose(1, 2)  # [1, 24, H, D] views
    q = torch.randn(1, 3, h, d, generator=g)
    seg = torch.tensor([[[8, 16, -3], [0, 1, 5]]], dtype=torch.int32)
    assert not k_pool.is_contiguous() and not v_pool.is_contiguous()
    torch.testing.assert_close(
        sparse_kv_attention_ref(q, k_pool, v_pool, seg, d**-0.5),
        sparse_kv_attention_ref(q, k_pool.contiguous(), v_pool.contiguous(), seg, d**-0.5),
        rtol=0,
        atol=1e-6,
    )
