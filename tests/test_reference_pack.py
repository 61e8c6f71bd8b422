"""PackForcing reference (2x4x4 compression, mid-block affinity, top-k selection) vs literal loops."""
import pytest
import torch

from relaxkv_kernels.reference.pack import (
    compress_kv_into_ref,
    compress_kv_ref,
    compressed_grid,
    compressed_positions,
    mid_affinity_literal,
    mid_affinity_ref,
    mid_select_ref,
)


def literal_rope(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Wan 3D RoPE as a complex float64 multiply at real positions: x [B, N, H, D], pos [N, 3] -> float64."""
    d = x.shape[-1]
    dims = [d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)]
    ang = torch.cat(
        [
            pos[:, a : a + 1].double() / 10000.0 ** (torch.arange(0, n, 2, dtype=torch.float64) / n)
            for a, n in enumerate(dims)
        ],
        dim=1,
    )[:, None, :]
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(xc * torch.polar(torch.ones_like(ang), ang)).flatten(-2)


def literal_compress(x: torch.Tensor, t0: float, frames: int, height: int, width: int):
    """Average 2x4x4 windows with explicit loops: pooled float64 [B, Nc, H, D] and centres [Nc, 3]."""
    nt, ny, nx = frames // 2, height // 4, width // 4
    pooled, centres = [], []
    for tc in range(nt):
        for yc in range(ny):
            for xc in range(nx):
                acc = 0
                for t in range(2 * tc, 2 * tc + 2):
                    for y in range(4 * yc, 4 * yc + 4):
                        for xx in range(4 * xc, 4 * xc + 4):
                            acc = acc + x[:, (t * height + y) * width + xx].double()
                pooled.append(acc / 32)
                centres.append([t0 + 2 * tc + 0.5, 4 * yc + 1.5, 4 * xc + 1.5])
    return torch.stack(pooled, dim=1), torch.tensor(centres, dtype=torch.float64)


@pytest.mark.parametrize(
    "frames, height, width, expected",
    [
        pytest.param(4, 30, 52, (2, 7, 13), id="wan-832x480"),
        pytest.param(4, 6, 9, (2, 1, 2), id="floors-4x6x9"),
        pytest.param(3, 4, 4, (1, 1, 1), id="odd-frames"),
        pytest.param(1, 8, 8, (0, 2, 2), id="single-frame-empty"),
    ],
)
def test_compressed_grid(frames, height, width, expected):
    assert compressed_grid(frames, height, width) == expected


def test_wan_block_tokens():
    nt, ny, nx = compressed_grid(4, 30, 52)
    assert nt * ny * nx == 182
    assert compressed_positions(8.0, 4, 30, 52).shape == (182, 3)


@pytest.mark.parametrize(
    "b, h, d, t0, frames, height, width",
    [
        pytest.param(1, 2, 32, 0.0, 2, 4, 4, id="one-window"),
        pytest.param(2, 2, 32, 8.0, 4, 6, 9, id="floors-4x6x9-B2"),
        pytest.param(1, 1, 128, 24.0, 5, 8, 12, id="D128-odd-frames"),
    ],
)
def test_compress_kv_ref_vs_literal(b, h, d, t0, frames, height, width):
    g = torch.Generator().manual_seed(500 + d + frames + width)
    n = frames * height * width
    k = torch.randn(b, n, h, d, generator=g)
    v = torch.randn(b, n, h, d, generator=g)
    k0, v0 = k.clone(), v.clone()
    ck, cv, mean_key = compress_kv_ref(k, v, t0, frames, height, width)
    pk, centres = literal_compress(k, t0, frames, height, width)
    pv, _ = literal_compress(v, t0, frames, height, width)
    nt, ny, nx = compressed_grid(frames, height, width)
    assert ck.shape == cv.shape == (b, nt * ny * nx, h, d)
    assert ck.dtype == k.dtype and cv.dtype == v.dtype and mean_key.dtype == torch.float32
    torch.testing.assert_close(compressed_positions(t0, frames, height, width), centres, rtol=0, atol=0)
    torch.testing.assert_close(cv.double(), pv, rtol=0, atol=1e-6)
    torch.testing.assert_close(ck.double(), literal_rope(pk, centres), rtol=0, atol=1e-6)
    torch.testing.assert_close(mean_key.double(), pk.mean(dim=1), rtol=0, atol=1e-6)
    assert torch.equal(k, k0) and torch.equal(v, v0)


def test_compress_kv_ref_window_centres_4x6x9():
    pos = compressed_positions(8.0, 4, 6, 9)
    assert pos.tolist() == [[8.5, 1.5, 1.5], [8.5, 1.5, 5.5], [10.5, 1.5, 1.5], [10.5, 1.5, 5.5]]


def test_compress_kv_ref_ignores_tokens_outside_windows():
    """Tokens past the floors (last frame, last rows, last columns) do not enter any window."""
    g = torch.Generator().manual_seed(510)
    frames, height, width = 3, 5, 9
    k = torch.randn(1, frames * height * width, 1, 32, generator=g)
    v = torch.randn(1, frames * height * width, 1, 32, generator=g)
    ck, cv, mk = compress_kv_ref(k, v, 0.0, frames, height, width)
    grid = torch.arange(frames * height * width).view(frames, height, width)
    outside = torch.ones_like(grid, dtype=torch.bool)
    outside[:2, :4, :8] = False
    k2, v2 = k.clone(), v.clone()
    k2[:, grid[outside]] += 100.0
    v2[:, grid[outside]] -= 100.0
    ck2, cv2, mk2 = compress_kv_ref(k2, v2, 0.0, frames, height, width)
    assert torch.equal(ck, ck2) and torch.equal(cv, cv2) and torch.equal(mk, mk2)


# ---------------------------------------------------------------------------------------------- affinity


def _blocks(g, b, m, nc, h, d):
    return [torch.randn(b, nc, h, d, generator=g) + 0.2 * torch.randn(1, 1, h, d, generator=g) for _ in range(m)]


@pytest.mark.parametrize(
    "b, h, d, nsq, nc, m",
    [
        pytest.param(2, 4, 32, 6, 5, 3, id="B2-H4-D32"),
        pytest.param(2, 4, 128, 9, 12, 5, id="B2-H4-D128"),
        pytest.param(1, 2, 64, 1, 1, 2, id="B1-H2-single-token"),
    ],
)
def test_mid_affinity_ref_equals_literal(b, h, d, nsq, nc, m):
    g = torch.Generator().manual_seed(600 + d + nc)
    q = torch.randn(b, nsq, h, d, generator=g) + 0.3
    blocks = _blocks(g, b, m, nc, h, d)
    mean_key = torch.stack([blk.mean(dim=1) for blk in blocks], dim=1)  # [B, M, H, D]
    got = mid_affinity_ref(q, mean_key, nc)
    expected = mid_affinity_literal(q, blocks)
    assert got.dtype == torch.float32 and got.shape == (m,)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_mid_affinity_only_first_half_of_heads():
    g = torch.Generator().manual_seed(610)
    b, h, d, nsq, nc, m = 2, 4, 32, 5, 4, 3
    q = torch.randn(b, nsq, h, d, generator=g)
    blocks = _blocks(g, b, m, nc, h, d)
    mean_key = torch.stack([blk.mean(dim=1) for blk in blocks], dim=1)
    s_ref = mid_affinity_ref(q, mean_key, nc)
    s_lit = mid_affinity_literal(q, blocks)
    q2, mk2 = q.clone(), mean_key.clone()
    q2[:, :, 2:] = torch.randn(b, nsq, 2, d, generator=g)
    mk2[:, :, 2:] = torch.randn(b, m, 2, d, generator=g)
    blocks2 = [blk.clone() for blk in blocks]
    for blk in blocks2:
        blk[:, :, 2:] = torch.randn(b, nc, 2, d, generator=g)
    assert torch.equal(mid_affinity_ref(q2, mk2, nc), s_ref)
    assert torch.equal(mid_affinity_literal(q2, blocks2), s_lit)
    q3 = q.clone()
    q3[:, :, 1] += 1.0  # head 1 does count
    assert not torch.equal(mid_affinity_ref(q3, mean_key, nc), s_ref)


# ---------------------------------------------------------------------------------------------- selection


@pytest.mark.parametrize(
    "b, k, seg_index, q_stride",
    [
        pytest.param(1, 2, 0, 1, id="k2-idx0-stride1"),
        pytest.param(2, 3, 2, 3, id="k3-idx2-B2-stride3"),
        pytest.param(2, 5, 1, 2, id="k-equals-M-all-selected"),
    ],
)
def test_mid_select_ref(b, k, seg_index, q_stride):
    g = torch.Generator().manual_seed(700 + 10 * k + seg_index)
    h, d, nq, nc, n_blocks = 4, 32, 10, 6, 7
    row0 = 1000
    q = torch.randn(b, nq, h, d, generator=g) + 0.5
    keys = _blocks(g, b, n_blocks, nc, h, d)  # archive slot i holds keys[i]
    mean_key = torch.stack([blk.mean(dim=1) for blk in keys], dim=1)
    mid_slots = torch.tensor([4, 6, 0, 1, 3])  # oldest first; ring-buffer wrap-around
    block_pos = torch.tensor([32, 36, 999, 40, 24, -999, 28])  # first frame of slots 0..6 (2, 5: unused)
    target_pos = torch.arange(k) * 4 + 8
    n_seg = seg_index + k + 2
    seg = torch.randint(-500, 500, (b, n_seg, 3), generator=g, dtype=torch.int32)
    seg_before = seg.clone()
    q0, mk0 = q.clone(), mean_key.clone()

    scores = mid_select_ref(q, mean_key, mid_slots, block_pos, seg, seg_index, target_pos, row0, nc, q_stride)

    q_sub = q[:, list(range(0, nq, q_stride))]
    expected = mid_affinity_literal(q_sub, [keys[int(s)] for s in mid_slots])
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-5)
    ranked = sorted(range(len(mid_slots)), key=lambda i: -float(expected[i]))
    if k < len(mid_slots):
        assert expected[ranked[k - 1]] - expected[ranked[k]] > 1e-3  # no near-tie at the cut
    picked = sorted(ranked[:k])  # time order = order in mid_slots
    for bb in range(b):
        for j, i in enumerate(picked):
            slot = int(mid_slots[i])
            assert seg[bb, seg_index + j].tolist() == [row0 + slot * nc, nc, int(target_pos[j] - block_pos[slot])]
    keep = torch.ones(n_seg, dtype=torch.bool)
    keep[seg_index : seg_index + k] = False
    assert torch.equal(seg[:, keep], seg_before[:, keep])
    assert torch.equal(q, q0) and torch.equal(mean_key, mk0)


def test_mid_select_ref_ties_to_older_block():
    g = torch.Generator().manual_seed(710)
    h, d, nc = 2, 16, 3
    q = torch.randn(1, 4, h, d, generator=g)
    qbar = q.mean(dim=1)  # [1, H, D]
    mean_key = torch.stack(
        [-qbar, qbar + 0.1 * torch.randn(1, h, d, generator=g), qbar, -2 * qbar], dim=1
    )  # slots 0 and 3 score negative, slots 1 and 2 positive
    mean_key[:, 2] = mean_key[:, 1]  # slots 1 and 2 tie
    mid_slots = torch.tensor([2, 1, 0, 3])  # slot 2 is older than slot 1
    seg = torch.zeros(1, 1, 3, dtype=torch.int32) + 7
    scores = mid_select_ref(q, mean_key, mid_slots, torch.tensor([8, 12, 4, 16]), seg, 0, torch.tensor([20]), 0, nc, 1)
    assert scores[0] == scores[1]
    assert seg[0, 0].tolist() == [2 * nc, nc, 20 - 4]


# ---------------------------------------------------------------------------------------------- compress into


@pytest.mark.parametrize(
    "slot, t0, row0",
    [pytest.param(0, 0, 0, id="slot0-row0"), pytest.param(2, 36, 50, id="slot2-row50")],
)
def test_compress_kv_into_ref_writes_only_its_rows(slot, t0, row0):
    g = torch.Generator().manual_seed(800 + slot)
    b, h, d, frames, height, width = 2, 2, 32, 4, 6, 9
    nc = 4
    n_blocks = 3
    n_rows = row0 + n_blocks * nc + 5
    k = torch.randn(b, frames * height * width, h, d, generator=g)
    v = torch.randn(b, frames * height * width, h, d, generator=g)
    k_pool = torch.randn(b, n_rows, h, d, generator=g)
    v_pool = torch.randn(b, n_rows, h, d, generator=g)
    mean_key = torch.randn(b, n_blocks, h, d, generator=g)
    kp0, vp0, mk0 = k_pool.clone(), v_pool.clone(), mean_key.clone()
    compress_kv_into_ref(
        k, v, k_pool, v_pool, mean_key, torch.tensor([slot]), torch.tensor([t0]), row0, frames, height, width
    )
    ck, cv, mk = compress_kv_ref(k, v, float(t0), frames, height, width)
    rows = torch.zeros(n_rows, dtype=torch.bool)
    rows[row0 + slot * nc : row0 + (slot + 1) * nc] = True
    assert torch.equal(k_pool[:, rows], ck) and torch.equal(v_pool[:, rows], cv)
    assert torch.equal(k_pool[:, ~rows], kp0[:, ~rows]) and torch.equal(v_pool[:, ~rows], vp0[:, ~rows])
    assert torch.equal(mean_key[:, slot], mk)
    others = [s for s in range(n_blocks) if s != slot]
    assert torch.equal(mean_key[:, others], mk0[:, others])
