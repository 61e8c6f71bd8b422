"""Relax Forcing reference (candidates, roles, scores, selection, target positions) vs DESIGN.md 4.2."""
import pytest
import torch

from relaxkv_kernels.reference.relax import (
    frame_means_literal,
    relax_candidates,
    relax_roles,
    relax_scores_ref,
    relax_select_ref,
    relax_target_positions,
)


def literal_set_prototype(keys: torch.Tensor, frames: list[int]) -> torch.Tensor:
    """Mean of raw keys [B, n_frames, F, H, D] over all tokens of ``frames``, then over heads, L2-normalised."""
    b, _, f, h, d = keys.shape
    tokens = keys[:, frames].float().reshape(b, len(frames) * f, h, d)
    p = tokens.mean(dim=1).mean(dim=1)  # [B, D]
    return p / p.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def literal_scores(keys, sink, tail, cands, lam):
    """r(h) = <p_h, p_sink> - lam <p_h, p_tail> per batch element, by explicit loops (float64 dots)."""
    b = keys.shape[0]
    out = torch.zeros(b, len(cands), dtype=torch.float64)
    p_sink = literal_set_prototype(keys, sink).double() if sink else None
    p_tail = literal_set_prototype(keys, tail).double() if tail else None
    for j, c in enumerate(cands):
        p_h = literal_set_prototype(keys, [c]).double()
        for i in range(b):
            r = 0.0
            if p_sink is not None:
                r += float(p_h[i] @ p_sink[i])
            if p_tail is not None:
                r -= lam * float(p_h[i] @ p_tail[i])
            out[i, j] = r
    return out


# ---------------------------------------------------------------------------------------------- candidates


@pytest.mark.parametrize(
    "mn, expected",
    [
        pytest.param(2, [1], id="Mn2-C1"),
        pytest.param(3, [1], id="Mn3"),
        pytest.param(4, [2], id="Mn4"),
        pytest.param(6, [3, 4], id="Mn6"),
        pytest.param(9, [4, 5, 6, 7], id="Mn9"),
        pytest.param(15, [7, 8, 10, 12], id="Mn15"),
        pytest.param(18, [9, 11, 13, 15], id="Mn18"),
        pytest.param(114, [57, 71, 85, 99], id="Mn114-steady"),
    ],
)
def test_relax_candidates_design_examples(mn, expected):
    assert relax_candidates(mn, 4) == expected


@pytest.mark.parametrize("mn", [pytest.param(0, id="Mn0"), pytest.param(1, id="Mn1")])
def test_relax_candidates_none(mn):
    assert relax_candidates(mn, 4) is None


@pytest.mark.parametrize(
    "mn, c, expected",
    [
        pytest.param(2, 4, [1], id="Mn2-Cprime1"),
        pytest.param(9, 1, [4], id="C1-Mn9"),
        pytest.param(114, 1, [57], id="C1-Mn114"),
        pytest.param(9, 2, [4, 6], id="C2-Mn9"),
    ],
)
def test_relax_candidates_small_c(mn, c, expected):
    assert relax_candidates(mn, c) == expected


def test_relax_candidates_literal_rule():
    """The rule written out: a = Mn // 2, C' = min(C, Mn - a), linspace in float32, trunc, unique, drop last."""
    for mn in (5, 7, 10, 23, 57, 120):
        for c in (2, 3, 4, 6):
            a = mn // 2
            cp = min(c, mn - a)
            if cp == 1:
                expected = [a]
            else:
                pts = [int(a + (mn - 1 - a) * i / cp) for i in range(cp + 1)]  # float64 trunc
                expected = sorted(set(pts))[:-1]
            got = relax_candidates(mn, c)
            assert got == sorted(got)
            assert all(a <= i < mn - 1 for i in got)
            assert got == expected, (mn, c)


# ---------------------------------------------------------------------------------------------- roles


@pytest.mark.parametrize(
    "p, warmup",
    [
        pytest.param(0, True, id="P0"),
        pytest.param(3, True, id="P3"),
        pytest.param(4, True, id="P4-boundary"),
        pytest.param(5, False, id="P5"),
    ],
)
def test_relax_roles_warmup_boundary(p, warmup):
    roles = relax_roles(p, 2, 1, 4)
    assert roles.warmup is warmup
    if warmup:
        assert roles.sink == roles.middle == roles.tail == [] and roles.candidates is None


def test_relax_roles_p5_first_selection():
    """P = 5 (first chunk past warm-up): Mn = 2, C' = 1, the single candidate is middle index 1."""
    roles = relax_roles(5, 2, 1, 4)
    assert (roles.sink, roles.middle, roles.tail, roles.candidates) == ([0, 1], [2, 3], [4], [3])


def test_relax_roles_p6():
    roles = relax_roles(6, 2, 1, 4)
    assert (roles.sink, roles.middle, roles.tail, roles.candidates) == ([0, 1], [2, 3, 4], [5], [3])


def test_relax_roles_p11_candidates_are_memory_indices():
    roles = relax_roles(11, 2, 1, 4)  # Mn = 8: linspace(4, 7, 5) -> 4, 4, 5, 6, 7 -> [4, 5, 6]
    assert roles.candidates == [6, 7, 8]


def test_relax_roles_steady_state_p117():
    p = 117
    roles = relax_roles(p, 2, 1, 4)
    assert not roles.warmup
    assert roles.sink == [0, 1] and roles.tail == [116] and roles.middle == list(range(2, 116))
    assert roles.candidates == [59, 73, 87, 101]
    assert [p - i for i in roles.candidates] == [58, 44, 30, 16]  # frames before c


@pytest.mark.parametrize(
    "p, s, t, warmup",
    [
        pytest.param(2, 0, 1, True, id="S0-T1-P2"),
        pytest.param(3, 0, 1, False, id="S0-T1-P3"),
        pytest.param(3, 2, 0, True, id="S2-T0-P3"),
        pytest.param(4, 2, 0, False, id="S2-T0-P4"),
    ],
)
def test_relax_roles_other_s_t(p, s, t, warmup):
    roles = relax_roles(p, s, t, 4)
    assert roles.warmup is warmup
    if not warmup:
        assert roles.sink == list(range(s))
        assert roles.tail == list(range(p - t, p))
        assert roles.middle == list(range(s, p - t))


# ---------------------------------------------------------------------------------------------- scores


@pytest.mark.parametrize(
    "s, t, lam",
    [
        pytest.param(2, 1, 2.0, id="S2-T1-lam2"),
        pytest.param(0, 1, 2.0, id="S0-drops-sink"),
        pytest.param(2, 0, 2.0, id="T0-drops-tail"),
        pytest.param(3, 2, 0.5, id="S3-T2-lam0.5"),
    ],
)
def test_relax_scores_ref_vs_raw_keys(s, t, lam):
    g = torch.Generator().manual_seed(100 + 10 * s + t)
    b, n_frames, f, h, d = 2, 12, 6, 3, 32
    keys = torch.randn(b, n_frames, f, h, d, generator=g) + 0.3  # non-zero mean: prototypes matter
    roles = relax_roles(n_frames, s, t, 4)
    assert not roles.warmup and roles.candidates
    proto = frame_means_literal(keys)
    proto_before = proto.clone()
    got = relax_scores_ref(
        proto,
        torch.tensor(roles.sink, dtype=torch.int64),
        torch.tensor(roles.tail, dtype=torch.int64),
        torch.tensor(roles.candidates, dtype=torch.int64),
        lam,
    )
    assert got.dtype == torch.float32 and got.shape == (b, len(roles.candidates))
    expected = literal_scores(keys, roles.sink, roles.tail, roles.candidates, lam)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5)
    assert torch.equal(proto, proto_before)


def test_frame_means_literal():
    g = torch.Generator().manual_seed(5)
    keys = torch.randn(2, 3, 4, 5, 8, generator=g, dtype=torch.float64)
    got = frame_means_literal(keys)
    assert got.dtype == torch.float32 and got.shape == (2, 3, 8)
    for i in range(2):
        for fr in range(3):
            ref = sum(keys[i, fr, tok, hh] for tok in range(4) for hh in range(5)) / 20
            torch.testing.assert_close(got[i, fr], ref.float(), rtol=0, atol=1e-6)


def test_relax_scores_scale_invariant_prototypes():
    """Per-frame means enter only through normalised set prototypes: scaling one candidate's frame does not matter."""
    g = torch.Generator().manual_seed(6)
    proto = torch.randn(1, 8, 16, generator=g)
    sink, tail, cand = torch.tensor([0, 1]), torch.tensor([7]), torch.tensor([3, 4, 5])
    base = relax_scores_ref(proto, sink, tail, cand, 2.0)
    proto2 = proto.clone()
    proto2[:, 4] *= 7.5
    torch.testing.assert_close(relax_scores_ref(proto2, sink, tail, cand, 2.0), base, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- selection


def _seg_table(g, b, n_seg):
    return torch.randint(-1000, 1000, (b, n_seg, 3), generator=g, dtype=torch.int32)


def _designed_proto(g, d, prefer):
    """proto [B, 8, D] with sink slots 0, 1, tail slot 2, candidate slots 5, 3, 6 (memory order).

    Batch element i's candidate ``prefer[i]`` (index into the candidate list) is aligned with the sink; the
    others are anti-aligned. Noise keeps every vector non-zero.
    """
    b = len(prefer)
    sink_dir = torch.randn(d, generator=g)
    tail_dir = torch.randn(d, generator=g)
    proto = torch.randn(b, 8, d, generator=g) * 0.01
    cand_slots = [5, 3, 6]
    for i in range(b):
        proto[i, 0] += sink_dir
        proto[i, 1] += sink_dir
        proto[i, 2] += tail_dir
        for j, slot in enumerate(cand_slots):
            proto[i, slot] += sink_dir if j == prefer[i] else -sink_dir
    return proto


def _call_select(proto, slot_pos, seg, seg_index, target_pos, f, batch0_decides, contiguous, lam=2.0):
    return relax_select_ref(
        proto,
        slot_pos,
        torch.tensor([0, 1]),
        torch.tensor([2]),
        torch.tensor([5, 3, 6]),
        seg,
        seg_index,
        target_pos,
        f,
        lam,
        batch0_decides,
        contiguous,
    )


SLOT_POS = torch.tensor([0, 1, 30, 12, 40, 9, 20, 55])  # write-time frame position of each slot


@pytest.mark.parametrize(
    "batch0_decides, expected_slots",
    [
        pytest.param(False, [6, 3], id="per-sample"),
        pytest.param(True, [6, 6], id="batch0-decides"),
    ],
)
def test_relax_select_per_sample_vs_batch0(batch0_decides, expected_slots):
    g = torch.Generator().manual_seed(200)
    f, d = 10, 16
    proto = _designed_proto(g, d, prefer=[2, 1])  # sample 0 prefers slot 6, sample 1 prefers slot 3
    seg = _seg_table(g, 2, 5)
    target = torch.tensor([31])
    scores = _call_select(proto, SLOT_POS, seg, 2, target, f, batch0_decides, False)
    for i, slot in enumerate(expected_slots):
        assert seg[i, 2].tolist() == [slot * f, f, 31 - int(SLOT_POS[slot])]
    # both modes return the per-sample scores
    assert scores.argmax(dim=1).tolist() == [2, 1]


def test_relax_select_h2_written_in_memory_order():
    g = torch.Generator().manual_seed(201)
    f, d = 7, 16
    proto = _designed_proto(g, d, prefer=[2])
    # make candidate 0 (slot 5) the second best: between aligned and anti-aligned
    proto[0, 5] = proto[0, 0] * 0.5 + torch.randn(d, generator=g) * 0.5
    scores_expected = relax_scores_ref(proto, torch.tensor([0, 1]), torch.tensor([2]), torch.tensor([5, 3, 6]), 2.0)
    order = scores_expected[0].argsort(descending=True).tolist()
    assert order[:2] == [2, 0]  # best is candidate 2 (slot 6), second candidate 0 (slot 5)
    seg = _seg_table(g, 1, 6)
    seg_before = seg.clone()
    target = torch.tensor([30, 31])
    _call_select(proto, SLOT_POS, seg, 1, target, f, False, False)
    # memory order: candidate 0 (slot 5) first, then candidate 2 (slot 6)
    assert seg[0, 1].tolist() == [5 * f, f, 30 - 9]
    assert seg[0, 2].tolist() == [6 * f, f, 31 - 20]
    keep = torch.ones(6, dtype=torch.bool)
    keep[1:3] = False
    assert torch.equal(seg[:, keep], seg_before[:, keep])


def test_relax_select_ties_go_to_lower_index():
    g = torch.Generator().manual_seed(202)
    f, d = 4, 8
    proto = _designed_proto(g, d, prefer=[1])
    proto[0, 6] = proto[0, 3]  # candidates 1 (slot 3) and 2 (slot 6) tie exactly
    seg = _seg_table(g, 1, 3)
    scores = _call_select(proto, SLOT_POS, seg, 0, torch.tensor([50]), f, False, False)
    assert scores[0, 1] == scores[0, 2]
    assert seg[0, 0].tolist() == [3 * f, f, 50 - 12]


@pytest.mark.parametrize(
    "contiguous, seg_index",
    [pytest.param(False, 3, id="hybrid-idx3"), pytest.param(True, 0, id="contiguous-idx0")],
)
def test_relax_select_deltas_and_untouched_entries(contiguous, seg_index):
    g = torch.Generator().manual_seed(203)
    b, f, d = 2, 9, 16
    proto = torch.randn(b, 8, d, generator=g)
    proto_before = proto.clone()
    seg = _seg_table(g, b, 5)
    seg_before = seg.clone()
    target = torch.tensor([17])
    scores = _call_select(proto, SLOT_POS, seg, seg_index, target, f, False, contiguous)
    cand = [5, 3, 6]
    for i in range(b):
        slot = cand[int(scores[i].argmax())]
        delta = 0 if contiguous else 17 - int(SLOT_POS[slot])
        assert seg[i, seg_index].tolist() == [slot * f, f, delta]
    keep = torch.ones(5, dtype=torch.bool)
    keep[seg_index] = False
    assert torch.equal(seg[:, keep], seg_before[:, keep])
    assert torch.equal(proto, proto_before)


# ---------------------------------------------------------------------------------------------- positions


@pytest.mark.parametrize("c", [pytest.param(5, id="c5"), pytest.param(117, id="c117")])
def test_relax_target_positions_hybrid(c):
    sink, hist, tail = relax_target_positions(c, 2, 1, 1, False)
    assert (sink, hist, tail) == ([c - 4, c - 3], [c - 2], [c - 1])


def test_relax_target_positions_contiguous():
    assert relax_target_positions(40, 2, 1, 1, True) == ([0, 1], [], [39])


def test_relax_target_positions_h2_t2():
    sink, hist, tail = relax_target_positions(30, 2, 2, 2, False)
    assert (sink, hist, tail) == ([24, 25], [26, 27], [28, 29])
