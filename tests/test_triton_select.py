"""Triton selection kernels (Relax Forcing history, PackForcing mid blocks) vs the PyTorch references."""
import os
import zlib

import pytest
import torch

pytest.importorskip("triton")
if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
    pytest.skip("Triton needs a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)

from relaxkv_kernels.reference import mid_select_ref, relax_select_ref  # noqa: E402
from relaxkv_kernels.triton import mid_select_triton, relax_select_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N_SEG = 8


def _gen(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def _seg(gen):
    """A segment table full of random entries, so rows the op must not touch are checked too."""
    return torch.randint(-1000, 1000, (2, N_SEG, 3), generator=gen, dtype=torch.int32).to(DEVICE)


def _long(values):
    return torch.tensor(values, dtype=torch.int64, device=DEVICE)


# (id, sink slots, tail slots, candidate slots, target positions, batch0_decides, contiguous, tie)
RELAX_CASES = [
    ("steady-state", [0, 1], [9], [3, 5, 6, 8], [7], False, False, False),
    ("batch0-decides", [0, 1], [9], [3, 5, 6, 8], [7], True, False, False),
    ("two-picks-contiguous", [0, 1], [9], [2, 3, 5, 6], [6, 7], False, True, False),
    ("no-sink", [], [10], [4, 5, 7], [8], False, False, False),
    ("no-tail-tie", [0, 1], [], [4, 6, 7], [5], False, False, True),
    ("single-candidate", [2], [11], [6], [9], True, False, False),
]


@pytest.mark.parametrize("case", RELAX_CASES, ids=[c[0] for c in RELAX_CASES])
def test_relax_select_matches_reference(case):
    name, sink, tail, cand, target, batch0, contiguous, tie = case
    gen = _gen(name)
    proto = torch.randn(2, 12, 32, generator=gen)
    if tie:  # two candidates with the sink's direction: equal best scores, the lower candidate index must win
        proto[:, cand[1]] = proto[:, cand[2]] = proto[:, sink].mean(1) * 3.0
    if batch0 and len(cand) > 1:  # steer the two batch elements to different best candidates (sink minus tail)
        best = proto[:, sink].mean(1) / proto[:, sink].mean(1).norm(dim=-1, keepdim=True)
        best = best - proto[:, tail].mean(1) / proto[:, tail].mean(1).norm(dim=-1, keepdim=True)
        proto[0, cand[-1]], proto[1, cand[0]] = best[0], best[1]
    proto = proto.to(DEVICE)
    slot_pos = torch.randperm(12, generator=gen).to(DEVICE) * 2 + 5
    sink_slots, tail_slots, cand_slots, target_pos = _long(sink), _long(tail), _long(cand), _long(target)
    seg = _seg(gen)
    seg_ref = seg.clone()
    inputs = (proto, slot_pos, sink_slots, tail_slots, cand_slots, target_pos)
    before = [t.clone() for t in inputs]

    scores = relax_select_triton(proto, slot_pos, sink_slots, tail_slots, cand_slots, seg, 2, target_pos, 16, 2.0,
                                 batch0, contiguous)
    expected = relax_select_ref(proto, slot_pos, sink_slots, tail_slots, cand_slots, seg_ref, 2, target_pos, 16, 2.0,
                                batch0, contiguous)

    for t, t0 in zip(inputs, before):
        assert torch.equal(t, t0), "inputs changed"
    # fp32 normalisation and dot products of D = 32 unit vectors vs the float64 reference: a few fp32 ulps
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(seg, seg_ref), f"segment table differs:\n{seg}\nvs\n{seg_ref}"
    if name == "batch0-decides":  # only meaningful if batch element 1 would have chosen otherwise
        assert expected[0].argmax() != expected[1].argmax() and seg[1, 2, 0] == cand[-1] * 16
    if tie:
        assert scores[0, 1] == scores[0, 2] and seg[0, 2, 0] == cand[1] * 16


# (id, dtype, n_q, heads, q_stride, mid slots (time order), targets, non-contiguous q, tie)
MID_CASES = [
    ("fp32-stride4", torch.float32, 37, 2, 4, [7, 2, 5, 9, 0, 3], [20, 24, 28], False, False),
    ("fp16-noncontig-q", torch.float16, 45, 4, 3, [1, 4, 6, 8, 9], [30, 34], True, False),
    ("fp32-select-all", torch.float32, 16, 2, 1, [3, 0, 8], [10, 14, 18], False, False),
    ("fp16-tie", torch.float16, 20, 2, 5, [2, 3, 5, 6, 7, 9, 1], [40], False, True),
]


@pytest.mark.parametrize("case", MID_CASES, ids=[c[0] for c in MID_CASES])
def test_mid_select_matches_reference(case):
    name, dtype, n_q, heads, q_stride, mid, target, noncontig, tie = case
    gen = _gen(name)
    if noncontig:  # queries as one head-interleaved slice of a fused qkv buffer
        q = torch.randn(2, n_q, 3, heads, 32, generator=gen).to(DEVICE, dtype)[:, :, 0]
        assert not q.is_contiguous()
    else:
        q = torch.randn(2, n_q, heads, 32, generator=gen).to(DEVICE, dtype)
    mean_key = torch.randn(2, 10, heads, 32, generator=gen)
    if tie:  # best-aligned key copied into a second slot: equal best scores, the earlier block must win
        qbar = q.float().cpu()[:, ::q_stride, : heads // 2].mean(1)  # [B, H/2, D]
        mean_key[:, mid[1], : heads // 2] = mean_key[:, mid[4], : heads // 2] = qbar * 5.0
    mean_key = mean_key.to(DEVICE)
    mid_slots, target_pos = _long(mid), _long(target)
    block_pos = torch.randint(0, 40, (10,), generator=gen).to(DEVICE)
    seg = _seg(gen)
    seg_ref = seg.clone()
    inputs = (q, mean_key, mid_slots, block_pos, target_pos)
    before = [t.clone() for t in inputs]

    scores = mid_select_triton(q, mean_key, mid_slots, block_pos, seg, 3, target_pos, 100, 6, q_stride)
    expected = mid_select_ref(q, mean_key, mid_slots, block_pos, seg_ref, 3, target_pos, 100, 6, q_stride)

    for t, t0 in zip(inputs, before):
        assert torch.equal(t, t0), "inputs changed"
    # the queries enter as exact fp32 values in both (fp16 upcast); fp32 sums of a few hundred products vs
    # float64: relative 1e-5 of the largest score covers the cancellation in near-zero scores
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    assert torch.equal(seg, seg_ref), f"segment table differs:\n{seg}\nvs\n{seg_ref}"
    if tie:
        assert scores[1] == scores[4] and seg[0, 3, 0] == 100 + mid[1] * 6


def test_select_rejects_too_many_targets():
    proto = torch.randn(2, 4, 16, device=DEVICE)
    seg = torch.zeros(2, N_SEG, 3, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="target_pos: expected at most 1"):
        relax_select_triton(proto, _long([0, 1, 2, 3]), _long([0]), _long([3]), _long([1]), seg, 0, _long([5, 6]),
                            4, 2.0, False, False)
