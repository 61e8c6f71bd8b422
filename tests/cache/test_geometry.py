"""Wan 3D RoPE and the PackForcing compressed grid of relaxkv_kernels/geometry.py.

apply_rope, apply_delta_rope and token_positions against a literal restatement of Wan2.1's ``rope_params``
and ``causal_rope_apply`` (complex float64 multiply on adjacent-element pairs), independent of the
package; compressed_grid and compressed_positions against hand-computed windows.
"""
import math

import pytest
import torch

from relaxkv_kernels.geometry import apply_delta_rope
from relaxkv_kernels.geometry import apply_rope
from relaxkv_kernels.geometry import compressed_grid
from relaxkv_kernels.geometry import compressed_positions
from relaxkv_kernels.geometry import rope_pair_split
from relaxkv_kernels.geometry import token_positions

from helpers import literal_rope

F64_TOL = 1e-12
F32_TOL = 1e-6


def rope_params(max_seq_len: int, dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Wan2.1 ``rope_params``: complex128 [max_seq_len, dim / 2]."""
    assert dim % 2 == 0
    freqs = torch.outer(
        torch.arange(max_seq_len), 1.0 / torch.pow(theta, torch.arange(0, dim, 2).to(torch.float64).div(dim))
    )
    return torch.polar(torch.ones_like(freqs), freqs)


def wan_freqs(d: int) -> torch.Tensor:
    """Wan2.1 model ``freqs`` for head_dim d: complex128 [1024, d / 2]."""
    return torch.cat([rope_params(1024, d - 4 * (d // 6)), rope_params(1024, 2 * (d // 6)),
                      rope_params(1024, 2 * (d // 6))], dim=1)


def causal_rope_apply(x: torch.Tensor, grid_sizes: list[tuple[int, int, int]], freqs, start_frame: int = 0):
    """Wan2.1 / Self-Forcing ``causal_rope_apply``: x [B, L, n, D], one (f, h, w) grid per batch element."""
    n, c = x.size(2), x.size(3) // 2
    freqs = freqs.split([c - 2 * (c // 3), c // 3, c // 3], dim=1)
    output = []
    for i, (f, h, w) in enumerate(grid_sizes):
        seq_len = f * h * w
        x_i = torch.view_as_complex(x[i, :seq_len].to(torch.float64).reshape(seq_len, n, -1, 2))
        freqs_i = torch.cat(
            [
                freqs[0][start_frame : start_frame + f].view(f, 1, 1, -1).expand(f, h, w, -1),
                freqs[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
                freqs[2][:w].view(1, 1, w, -1).expand(f, h, w, -1),
            ],
            dim=-1,
        ).reshape(seq_len, 1, -1)
        x_i = torch.view_as_real(x_i * freqs_i).flatten(2)
        x_i = torch.cat([x_i, x[i, seq_len:]])
        output.append(x_i)
    return torch.stack(output).type_as(x)


def grid_positions(start_frame: int, f: int, h: int, w: int) -> torch.Tensor:
    """(t, y, x) per token, row-major, by explicit loops."""
    rows = [(start_frame + t, y, x) for t in range(f) for y in range(h) for x in range(w)]
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize(
    "d, start_frame, grid",
    [
        pytest.param(128, 0, (3, 4, 6), id="D128-start0-f3h4w6"),
        pytest.param(128, 17, (2, 5, 3), id="D128-start17-f2h5w3"),
        pytest.param(128, 1000, (1, 3, 7), id="D128-start1000-single-frame"),
        pytest.param(64, 5, (4, 2, 3), id="D64-start5-f4h2w3"),
        pytest.param(32, 9, (1, 6, 1), id="D32-start9-single-frame-w1"),
    ],
)
def test_apply_rope_matches_wan_causal_rope_apply_float64(d, start_frame, grid):
    g = torch.Generator().manual_seed(1000 + d + start_frame)
    f, h, w = grid
    b, n_heads, pad = 2, 3, 5
    x = torch.randn(b, f * h * w + pad, n_heads, d, dtype=torch.float64, generator=g)
    expected = causal_rope_apply(x, [grid] * b, wan_freqs(d), start_frame=start_frame)
    x_before = x.clone()
    got = apply_rope(x[:, : f * h * w], grid_positions(start_frame, f, h, w))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected[:, : f * h * w], rtol=0, atol=F64_TOL)
    assert torch.equal(x, x_before)  # not mutated


@pytest.mark.parametrize(
    "d, start_frame, grid",
    [
        pytest.param(128, 3, (3, 2, 5), id="D128-start3-f3h2w5"),
        pytest.param(64, 0, (1, 4, 4), id="D64-start0-single-frame"),
    ],
)
def test_apply_rope_fp32_inputs(d, start_frame, grid):
    g = torch.Generator().manual_seed(2000 + d)
    f, h, w = grid
    x = torch.randn(1, f * h * w, 2, d, generator=g)
    expected = causal_rope_apply(x, [grid], wan_freqs(d), start_frame=start_frame)  # type_as -> fp32
    got = apply_rope(x, grid_positions(start_frame, f, h, w))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=F32_TOL)


def test_apply_rope_matches_token_positions_grid():
    """apply_rope fed by token_positions equals Wan on a non-square grid."""
    g = torch.Generator().manual_seed(7)
    f, h, w, start = 2, 3, 5, 11
    x = torch.randn(1, f * h * w, 2, 128, dtype=torch.float64, generator=g)
    pos = token_positions(torch.arange(start, start + f), h, w)
    expected = causal_rope_apply(x, [(f, h, w)], wan_freqs(128), start_frame=start)
    torch.testing.assert_close(apply_rope(x, pos), expected, rtol=0, atol=F64_TOL)


@pytest.mark.parametrize(
    "d, split",
    [
        pytest.param(128, (22, 21, 21), id="D128"),
        pytest.param(64, (12, 10, 10), id="D64"),
        pytest.param(32, (6, 5, 5), id="D32"),
        pytest.param(2, (1, 0, 0), id="D2"),
    ],
)
def test_rope_pair_split(d, split):
    assert rope_pair_split(d) == split
    c = d // 2
    assert rope_pair_split(d) == (c - 2 * (c // 3), c // 3, c // 3)
    # the real-dim widths match Wan's rope_params dims: d - 4 (d // 6), 2 (d // 6), 2 (d // 6)
    assert tuple(2 * p for p in split) == (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))


def test_apply_rope_axis_dims_d128():
    """Temporal position moves dims 0..43 only, height 44..85 only, width 86..127 only."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 1, 128, dtype=torch.float64, generator=g)
    base = apply_rope(x, torch.tensor([[2.0, 3.0, 4.0]], dtype=torch.float64))
    for axis, (lo, hi) in enumerate([(0, 44), (44, 86), (86, 128)]):
        pos = torch.tensor([[2.0, 3.0, 4.0]], dtype=torch.float64)
        pos[0, axis] += 1.0
        moved = (apply_rope(x, pos) - base).abs()[0, 0]
        assert moved[lo:hi].min() > 0
        assert torch.equal(moved[:lo], torch.zeros(lo, dtype=torch.float64))
        assert torch.equal(moved[hi:], torch.zeros(128 - hi, dtype=torch.float64))


@pytest.mark.parametrize(
    "d",
    [pytest.param(128, id="D128"), pytest.param(32, id="D32")],
)
def test_apply_rope_fractional_positions(d):
    g = torch.Generator().manual_seed(40 + d)
    n = 9
    x = torch.randn(n, 2, d, dtype=torch.float64, generator=g)
    pos = torch.rand(n, 3, dtype=torch.float64, generator=g) * torch.tensor([50.0, 30.0, 52.0])
    pos[0] = torch.tensor([0.5, 1.5, 1.5])  # a 2x4x4 window centre
    got = apply_rope(x, pos)
    torch.testing.assert_close(got, literal_rope(x, pos), rtol=0, atol=F64_TOL)


def test_apply_rope_fractional_fp32_inputs():
    g = torch.Generator().manual_seed(41)
    x = torch.randn(6, 3, 128, generator=g)
    pos = torch.tensor(
        [[0.5, 1.5, 1.5], [2.5, 5.5, 9.5], [100.25, 0.0, 3.75], [7.5, 29.5, 51.5], [0.0, 0.0, 0.0], [1023.5, 1.5, 5.5]]
    )
    got = apply_rope(x, pos)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, literal_rope(x, pos.double()).float(), rtol=0, atol=F32_TOL)


@pytest.mark.parametrize(
    "d, t, delta",
    [
        pytest.param(128, 20.0, 5.0, id="D128-forward"),
        pytest.param(128, 57.0, -41.0, id="D128-negative"),
        pytest.param(128, 3.5, -7.25, id="D128-fractional-to-negative"),
        pytest.param(64, 10.0, 0.0, id="D64-zero"),
        pytest.param(32, 0.0, 913.0, id="D32-large"),
    ],
)
def test_apply_delta_rope_composes(d, t, delta):
    g = torch.Generator().manual_seed(int(50 + d + t))
    n = 8
    x = torch.randn(n, 2, d, dtype=torch.float64, generator=g)
    pos = torch.rand(n, 3, dtype=torch.float64, generator=g) * 20
    pos[:, 0] = t
    rotated = apply_rope(x, pos)
    shifted = pos.clone()
    shifted[:, 0] += delta
    got = apply_delta_rope(rotated, torch.full((n,), delta, dtype=torch.float64))
    torch.testing.assert_close(got, apply_rope(x, shifted), rtol=0, atol=F64_TOL)


def test_apply_delta_rope_per_token_deltas():
    g = torch.Generator().manual_seed(60)
    n = 5
    x = torch.randn(2, n, 3, 64, dtype=torch.float64, generator=g)
    pos = torch.rand(n, 3, dtype=torch.float64, generator=g) * 10
    delta = torch.tensor([-3, 0, 4, 17, -12])
    shifted = pos.clone()
    shifted[:, 0] += delta.double()
    got = apply_delta_rope(apply_rope(x, pos), delta)
    torch.testing.assert_close(got, apply_rope(x, shifted), rtol=0, atol=F64_TOL)


def test_apply_delta_rope_changes_only_temporal_dims_d128():
    g = torch.Generator().manual_seed(61)
    x = torch.randn(4, 2, 128, generator=g)
    x_before = x.clone()
    out = apply_delta_rope(x, torch.tensor([1.0, -2.0, 3.5, -40.0]))
    assert torch.equal(out[..., 44:], x[..., 44:])
    assert (out[..., :44] - x[..., :44]).abs().amax(dim=-1).min() > 0
    assert torch.equal(x, x_before)


def test_apply_delta_rope_fp32_composes():
    g = torch.Generator().manual_seed(62)
    x = torch.randn(6, 2, 128, generator=g)
    pos = token_positions(torch.tensor([4, 5]), 1, 3)
    shifted = pos.clone()
    shifted[:, 0] -= 3
    got = apply_delta_rope(apply_rope(x, pos), torch.full((6,), -3))
    torch.testing.assert_close(got, apply_rope(x, shifted), rtol=0, atol=F32_TOL)


@pytest.mark.parametrize(
    "d, shift",
    [pytest.param(128, 37.0, id="D128-int"), pytest.param(64, -2.75, id="D64-fractional-negative")],
)
def test_relative_position_invariance(d, shift):
    g = torch.Generator().manual_seed(70 + d)
    nq, nk, h = 5, 7, 2
    q = torch.randn(nq, h, d, dtype=torch.float64, generator=g)
    k = torch.randn(nk, h, d, dtype=torch.float64, generator=g)
    pq = torch.rand(nq, 3, dtype=torch.float64, generator=g) * 30
    pk = torch.rand(nk, 3, dtype=torch.float64, generator=g) * 30
    logits = torch.einsum("ihd,jhd->hij", apply_rope(q, pq), apply_rope(k, pk))
    pq2, pk2 = pq.clone(), pk.clone()
    pq2[:, 0] += shift
    pk2[:, 0] += shift
    logits2 = torch.einsum("ihd,jhd->hij", apply_rope(q, pq2), apply_rope(k, pk2))
    torch.testing.assert_close(logits2, logits, rtol=0, atol=1e-10)
    # sanity: shifting only the keys does change the logits
    logits3 = torch.einsum("ihd,jhd->hij", apply_rope(q, pq), apply_rope(k, pk2))
    assert (logits3 - logits).abs().max() > 1e-3


def test_token_positions_row_major():
    frame_pos = torch.tensor([7, 3, 12])
    h, w = 2, 3
    pos = token_positions(frame_pos, h, w)
    assert pos.dtype == torch.float64
    assert pos.shape == (3 * h * w, 3)
    expected = [[float(t), float(y), float(x)] for t in (7, 3, 12) for y in range(h) for x in range(w)]
    assert pos.tolist() == expected


def test_token_positions_fractional_frames():
    pos = token_positions(torch.tensor([0.5, 2.5]), 1, 2)
    assert pos.tolist() == [[0.5, 0.0, 0.0], [0.5, 0.0, 1.0], [2.5, 0.0, 0.0], [2.5, 0.0, 1.0]]


@pytest.mark.parametrize("d", [pytest.param(127, id="D127"), pytest.param(3, id="D3")])
def test_odd_head_dim_raises(d):
    x = torch.randn(2, 1, d, generator=torch.Generator().manual_seed(d))
    with pytest.raises(ValueError, match="head_dim"):
        apply_rope(x, torch.zeros(2, 3, dtype=torch.float64) + 1.0)
    with pytest.raises(ValueError, match="head_dim"):
        apply_delta_rope(x, torch.ones(2))
    with pytest.raises(ValueError, match="head_dim"):
        rope_pair_split(d)


def test_wan_angles_sanity():
    """The literal Wan table itself: pair 1 of the temporal axis at t = 2 has angle 2 * 10000^(-2/44)."""
    freqs = wan_freqs(128)
    assert freqs.shape == (1024, 64)
    torch.testing.assert_close(freqs[2, 1].angle().item(), 2 * 10000 ** (-2 / 44), rtol=0, atol=1e-12)
    assert math.isclose(freqs[3, 22].angle().item(), 3.0, abs_tol=1e-12)  # height pair 0 has inv freq 1


def test_apply_rope_non_contiguous_input():
    """A strided view (every other head, transposed batch/token) gives the same result as its contiguous copy."""
    g = torch.Generator().manual_seed(80)
    big = torch.randn(6, 2, 4, 64, dtype=torch.float64, generator=g)  # [N, B, H, D]
    x = big.transpose(0, 1)[:, :, ::2]  # [B, N, 2, D], non-contiguous
    assert not x.is_contiguous()
    pos = token_positions(torch.tensor([3, 4]), 1, 3)
    torch.testing.assert_close(apply_rope(x, pos), apply_rope(x.contiguous(), pos), rtol=0, atol=0)
    torch.testing.assert_close(
        apply_delta_rope(x, torch.full((6,), -2.0)),
        apply_delta_rope(x.contiguous(), torch.full((6,), -2.0)),
        rtol=0,
        atol=0,
    )


# ------------------------------------------------------------------------------------- compressed grid


@pytest.mark.parametrize("frames, height, width, expected", [
    pytest.param(4, 30, 52, (2, 7, 13), id="wan-832x480"),
    pytest.param(4, 6, 9, (2, 1, 2), id="floors-4x6x9"),
    pytest.param(3, 4, 4, (1, 1, 1), id="odd-frames"),
    pytest.param(1, 8, 8, (0, 2, 2), id="single-frame-empty"),
])
def test_compressed_grid(frames, height, width, expected):
    assert compressed_grid(frames, height, width) == expected


def test_wan_block_tokens():
    nt, ny, nx = compressed_grid(4, 30, 52)
    assert nt * ny * nx == 182
    assert compressed_positions(8.0, 4, 30, 52).shape == (182, 3)


def test_compressed_positions_are_window_centres_4x6x9():
    pos = compressed_positions(8.0, 4, 6, 9)
    assert pos.tolist() == [[8.5, 1.5, 1.5], [8.5, 1.5, 5.5], [10.5, 1.5, 1.5], [10.5, 1.5, 5.5]]
