"""relaxkv::relax_select: Relax Forcing scores r(h) = <p_h, p_sink> - lambda <p_h, p_tail>, top-H into the table.

The reference against literal scores from raw keys (relaxkv_kernels/memory/relax.py) and its selection rules (per
sample or batch 0, memory order, ties, deltas); the Triton kernel (interpreter on CPU) and the CUDA kernel
(``kernel_device``) against the reference, with the table rows they must write poisoned; registration and
bad inputs (public function and raw op alike). The planning rules (candidates, roles, target positions) are
in test_memory.py.
"""
import pytest
import torch

from relaxkv_kernels.memory import relax_roles
from relaxkv_kernels.ops.relax_select.cuda import relax_select_cuda
from relaxkv_kernels.ops.relax_select.reference import frame_means_literal
from relaxkv_kernels.ops.relax_select.reference import relax_scores_ref
from relaxkv_kernels.ops.relax_select.reference import relax_select_ref

from helpers import DEVICE
from helpers import INT_POISON
from helpers import assert_int32_indices_match_int64
from helpers import assert_public_op_matches_registered
from helpers import backend_device
from helpers import compare_with_triton
from helpers import gen
from helpers import need_triton
from helpers import on
from helpers import randn
from helpers import raw_op_tests
from helpers import run_on_fakes
from helpers import seg_storage
from helpers import seg_view
from helpers import spaced

B, D, F = 2, 16, 16


def _args(g: torch.Generator) -> list:
    """Small valid arguments: 8 slots, sink 0 1, tail 7, candidates 3 .. 6, one history row at index 2."""
    return [randn(g, B, 8, D), torch.arange(8) * 3, torch.tensor([0, 1]), torch.tensor([7]), torch.tensor([3, 4, 5, 6]),
            torch.zeros(B, 7, 3, dtype=torch.int32), 2, torch.tensor([20]), F, 2.0, False, False]


# ---------------------------------------------------------------------------------- reference vs literal


def _literal_set_prototype(keys: torch.Tensor, frames: list[int]) -> torch.Tensor:
    """Mean of raw keys [B, n_frames, F, H, D] over all tokens of ``frames``, then over heads, L2-normalised."""
    b, _, f, h, d = keys.shape
    p = keys[:, frames].float().reshape(b, len(frames) * f, h, d).mean(dim=1).mean(dim=1)  # [B, D]
    return p / p.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _literal_scores(keys, sink, tail, cands, lam):
    """r(h) = <p_h, p_sink> - lam <p_h, p_tail> per batch element, by explicit loops (float64 dots)."""
    out = torch.zeros(keys.shape[0], len(cands), dtype=torch.float64)
    p_sink = _literal_set_prototype(keys, sink).double() if sink else None
    p_tail = _literal_set_prototype(keys, tail).double() if tail else None
    for j, c in enumerate(cands):
        p_h = _literal_set_prototype(keys, [c]).double()
        for i in range(keys.shape[0]):
            r = 0.0
            if p_sink is not None:
                r += float(p_h[i] @ p_sink[i])
            if p_tail is not None:
                r -= lam * float(p_h[i] @ p_tail[i])
            out[i, j] = r
    return out


@pytest.mark.parametrize("s, t, lam", [
    pytest.param(2, 1, 2.0, id="S2-T1-lam2"),
    pytest.param(0, 1, 2.0, id="S0-drops-sink"),
    pytest.param(2, 0, 2.0, id="T0-drops-tail"),
    pytest.param(3, 2, 0.5, id="S3-T2-lam0.5"),
])
def test_relax_scores_ref_vs_raw_keys(s, t, lam):
    g = gen(100 + 10 * s + t)
    keys = randn(g, 2, 12, 6, 3, 32) + 0.3  # [B, frames, F, H, D]; a non-zero mean: prototypes matter
    roles = relax_roles(12, s, t, 4)
    assert not roles.warmup and roles.candidates
    proto = frame_means_literal(keys)
    proto_before = proto.clone()
    idx = lambda v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
    got = relax_scores_ref(proto, idx(roles.sink), idx(roles.tail), idx(roles.candidates), lam)
    assert got.dtype == torch.float32 and got.shape == (2, len(roles.candidates))
    torch.testing.assert_close(got.double(), _literal_scores(keys, roles.sink, roles.tail, roles.candidates, lam),
                               rtol=0, atol=1e-5)
    assert torch.equal(proto, proto_before)


def test_frame_means_literal():
    keys = randn(gen(5), 2, 3, 4, 5, 8, dtype=torch.float64)
    got = frame_means_literal(keys)
    assert got.dtype == torch.float32 and got.shape == (2, 3, 8)
    for i in range(2):
        for fr in range(3):
            ref = sum(keys[i, fr, tok, hh] for tok in range(4) for hh in range(5)) / 20
            torch.testing.assert_close(got[i, fr], ref.float(), rtol=0, atol=1e-6)


def test_relax_scores_scale_invariant_prototypes():
    """Per-frame means enter only through normalised prototypes: scaling one candidate's frame does not matter."""
    proto = randn(gen(6), 1, 8, 16)
    sink, tail, cand = torch.tensor([0, 1]), torch.tensor([7]), torch.tensor([3, 4, 5])
    base = relax_scores_ref(proto, sink, tail, cand, 2.0)
    proto[:, 4] *= 7.5
    torch.testing.assert_close(relax_scores_ref(proto, sink, tail, cand, 2.0), base, rtol=0, atol=1e-6)


def _random_table(g, b, n_seg):
    return torch.randint(-1000, 1000, (b, n_seg, 3), generator=g, dtype=torch.int32)


def _designed_proto(g, d, prefer):
    """proto [B, 8, D] with sink slots 0, 1, tail slot 2, candidate slots 5, 3, 6 (memory order).

    Batch element i's candidate ``prefer[i]`` (index into the candidate list) is aligned with the sink; the
    others are anti-aligned. Noise keeps every vector non-zero.
    """
    sink_dir, tail_dir = randn(g, d), randn(g, d)
    proto = randn(g, len(prefer), 8, d) * 0.01
    for i, best in enumerate(prefer):
        proto[i, 0] += sink_dir
        proto[i, 1] += sink_dir
        proto[i, 2] += tail_dir
        for j, slot in enumerate([5, 3, 6]):
            proto[i, slot] += sink_dir if j == best else -sink_dir
    return proto


SLOT_POS = torch.tensor([0, 1, 30, 12, 40, 9, 20, 55])  # write-time frame position of each slot


def _select_designed(proto, seg, seg_index, target_pos, f, batch0_decides, contiguous):
    return relax_select_ref(proto, SLOT_POS, torch.tensor([0, 1]), torch.tensor([2]), torch.tensor([5, 3, 6]), seg,
                            seg_index, target_pos, f, 2.0, batch0_decides, contiguous)


@pytest.mark.parametrize("batch0_decides, expected_slots", [
    pytest.param(False, [6, 3], id="per-sample"),
    pytest.param(True, [6, 6], id="batch0-decides"),
])
def test_relax_select_ref_per_sample_vs_batch0(batch0_decides, expected_slots):
    g = gen(200)
    f = 10
    proto = _designed_proto(g, 16, prefer=[2, 1])  # sample 0 prefers slot 6, sample 1 prefers slot 3
    seg = _random_table(g, 2, 5)
    scores = _select_designed(proto, seg, 2, torch.tensor([31]), f, batch0_decides, False)
    for i, slot in enumerate(expected_slots):
        assert seg[i, 2].tolist() == [slot * f, f, 31 - int(SLOT_POS[slot])]
    assert scores.argmax(dim=1).tolist() == [2, 1]  # both modes return the per-sample scores


def test_relax_select_ref_writes_h2_in_memory_order():
    g = gen(201)
    f = 7
    proto = _designed_proto(g, 16, prefer=[2])
    proto[0, 5] = proto[0, 0] * 0.5 + randn(g, 16) * 0.5  # candidate 0 (slot 5): between aligned and anti-aligned
    want = relax_scores_ref(proto, torch.tensor([0, 1]), torch.tensor([2]), torch.tensor([5, 3, 6]), 2.0)
    assert want[0].argsort(descending=True).tolist()[:2] == [2, 0]  # best: slot 6, second: slot 5
    seg = _random_table(g, 1, 6)
    seg_before = seg.clone()
    _select_designed(proto, seg, 1, torch.tensor([30, 31]), f, False, False)
    assert seg[0, 1].tolist() == [5 * f, f, 30 - 9]  # memory order: slot 5 first, then slot 6
    assert seg[0, 2].tolist() == [6 * f, f, 31 - 20]
    keep = torch.ones(6, dtype=torch.bool)
    keep[1:3] = False
    assert torch.equal(seg[:, keep], seg_before[:, keep])


def test_relax_select_ref_ties_go_to_lower_index():
    g = gen(202)
    f = 4
    proto = _designed_proto(g, 8, prefer=[1])
    proto[0, 6] = proto[0, 3]  # candidates 1 (slot 3) and 2 (slot 6) tie exactly
    seg = _random_table(g, 1, 3)
    scores = _select_designed(proto, seg, 0, torch.tensor([50]), f, False, False)
    assert scores[0, 1] == scores[0, 2]
    assert seg[0, 0].tolist() == [3 * f, f, 50 - 12]


@pytest.mark.parametrize("contiguous, seg_index", [
    pytest.param(False, 3, id="hybrid-idx3"),
    pytest.param(True, 0, id="contiguous-idx0"),
])
def test_relax_select_ref_deltas_and_untouched_entries(contiguous, seg_index):
    g = gen(203)
    f = 9
    proto = randn(g, 2, 8, 16)
    proto_before = proto.clone()
    seg = _random_table(g, 2, 5)
    seg_before = seg.clone()
    scores = _select_designed(proto, seg, seg_index, torch.tensor([17]), f, False, contiguous)
    for i in range(2):
        slot = [5, 3, 6][int(scores[i].argmax())]
        assert seg[i, seg_index].tolist() == [slot * f, f, 0 if contiguous else 17 - int(SLOT_POS[slot])]
    keep = torch.ones(5, dtype=torch.bool)
    keep[seg_index] = False
    assert torch.equal(seg[:, keep], seg_before[:, keep])
    assert torch.equal(proto, proto_before)


# ------------------------------------------------------------------------------- Triton vs reference


@pytest.mark.parametrize("sink, tail, cand, target, batch0, contiguous, special", [
    pytest.param([0, 1], [9], [3, 5, 6, 8], [7], False, False, None, id="steady-state"),
    pytest.param([0, 1], [9], [3, 5, 6, 8], [7], True, False, None, id="batch0-decides"),
    pytest.param([0, 1], [9], [2, 3, 5, 6], [6, 7], False, True, None, id="two-picks-contiguous"),
    pytest.param([], [10], [4, 5, 7], [8], False, False, None, id="no-sink"),
    pytest.param([0, 1], [], [4, 6, 7], [5], False, False, "tie", id="no-tail-tie"),
    pytest.param([2], [11], [6], [9], True, False, None, id="single-candidate"),
    pytest.param([0, 1], [9], [3, 5, 6, 8], [7], False, False, "huge", id="huge-prototypes"),
])
def test_relax_select_triton_matches_reference(sink, tail, cand, target, batch0, contiguous, special):
    need_triton()
    from relaxkv_kernels.ops.relax_select.triton import relax_select_triton

    g = gen(len(cand) * 10 + len(sink) + 2 * batch0)
    proto = randn(g, 2, 12, 32)
    if special == "tie":  # two candidates with the sink's direction: equal best scores, the lower index must win
        proto[:, cand[1]] = proto[:, cand[2]] = proto[:, sink].mean(1) * 3.0
    if special == "huge":  # 1e20 frame means: scaled before the fp32 norms, the scores of 1e0 means
        proto *= 1e20
    if batch0 and len(cand) > 1:  # steer the two batch elements to different best candidates (sink minus tail)
        unit = lambda x: x / x.norm(dim=-1, keepdim=True)  # noqa: E731
        best = unit(proto[:, sink].mean(1)) - unit(proto[:, tail].mean(1))
        proto[0, cand[-1]], proto[1, cand[0]] = best[0], best[1]
    proto = proto.to(DEVICE)
    slot_pos = (torch.randperm(12, generator=g) * 2 + 5).to(DEVICE)
    sink_slots, tail_slots, cand_slots, target_pos = (torch.tensor(x, dtype=torch.int64, device=DEVICE)
                                                      for x in (sink, tail, cand, target))
    seg = _random_table(g, 2, 8).to(DEVICE)
    seg_ref = seg.clone()
    inputs = (proto, slot_pos, sink_slots, tail_slots, cand_slots, target_pos)
    before = [t.clone() for t in inputs]
    args = (proto, slot_pos, sink_slots, tail_slots, cand_slots)

    scores = relax_select_triton(*args, seg, 2, target_pos, 16, 2.0, batch0, contiguous)
    expected = relax_select_ref(*args, seg_ref, 2, target_pos, 16, 2.0, batch0, contiguous)

    for t, t0 in zip(inputs, before):
        assert torch.equal(t, t0), "inputs changed"
    # fp32 normalisation and dot products of D = 32 unit vectors vs the float64 reference: a few fp32 ulps
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(seg, seg_ref), f"segment table differs:\n{seg}\nvs\n{seg_ref}"
    if batch0 and len(cand) > 1:  # only meaningful if batch element 1 would have chosen otherwise
        assert expected[0].argmax() != expected[1].argmax() and seg[1, 2, 0] == cand[-1] * 16
    if special == "tie":
        assert scores[0, 1] == scores[0, 2] and seg[0, 2, 0] == cand[1] * 16


# --------------------------------------------------------------------------------- CUDA vs reference


@pytest.mark.parametrize("batch0, contiguous, index_dtype", [
    (False, False, torch.int64), (True, False, torch.int64), (False, True, torch.int32),
], ids=["per_sample", "batch0_decides", "contiguous_rope-int32"])
@pytest.mark.parametrize("head_dim", [128, 62], ids=["d128", "d62"])
def test_relax_select_cuda_matches_reference(kernel_device, batch0, contiguous, index_dtype, head_dim):
    dev, b, n_slots = kernel_device, 3, 12
    g = gen(20)
    proto = randn(g, 2, b, n_slots, head_dim, device=dev)[1]  # a layer of [L, B, S, D]
    proto = proto.transpose(0, 1).contiguous().transpose(0, 1)  # batch stride != S * D
    idx = lambda *v: torch.tensor(v, dtype=index_dtype, device=dev)  # noqa: E731
    slot_pos = torch.randperm(40, generator=g)[:n_slots].to(dev, index_dtype)
    args = (proto, slot_pos, idx(0, 1), idx(11), idx(3, 5, 6, 8, 9))
    tail_args = (2, idx(20, 21), 16, 2.0, batch0, contiguous)
    seg0 = torch.randint(-5, 5, (b, 7, 3), dtype=torch.int32, generator=g).to(dev)
    seg0[:, 2:4] = INT_POISON  # rows the kernel must write
    seg_cuda, seg_ref = seg0.clone(), seg0.clone()
    proto0 = proto.clone()
    scores = relax_select_cuda(*args, seg_cuda, *tail_args)
    want = relax_select_ref(*args, seg_ref, *tail_args)
    torch.testing.assert_close(scores, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(seg_cuda, seg_ref)
    assert torch.equal(proto, proto0)
    if compare_with_triton(dev, torch.float32):
        from relaxkv_kernels.ops.relax_select.triton import relax_select_triton

        seg_tri = seg0.clone()
        torch.testing.assert_close(scores, relax_select_triton(*args, seg_tri, *tail_args), rtol=1e-5, atol=1e-5)
        assert torch.equal(seg_cuda, seg_tri)


# defaults: batch 3, 12 slots (sink 0, 1; tail 11), candidates 3 5 6 8 9, H_sel 2, D 64
_EDGES = {
    "no_sink": dict(n_sink=0),
    "no_tail-contiguous_rope": dict(n_tail=0, contiguous=True),
    "no_sink_no_tail": dict(n_sink=0, n_tail=0, n_sel=3),  # every score 0: the first H_sel candidates
    "all_picked": dict(n_sel=5),
    "ties": dict(special="ties"),  # candidates 1, 3, 4 identical and best: H_sel 2 takes 1 and 3
    "nan_candidate": dict(special="nan_cand"),  # a non-finite score is never chosen over a finite one
    "nan_tail": dict(special="nan_tail"),  # every score NaN: the first H_sel candidates
    "huge_prototypes": dict(special="huge"),  # 1e20 means: normalised without overflow, the same scores
    "many_candidates-d200": dict(n_slots=160, n_cand=150, n_sel=70, head_dim=200, batch=2, lam=0.5),
    "views-batch0_decides": dict(views=True, batch0=True),  # strided proto, index tensors and seg
}


@pytest.mark.parametrize("case", list(_EDGES))
def test_relax_select_cuda_edge_cases(kernel_device, case):
    """Empty score terms, ties and NaN in the top-k, more candidates than warps, index and table views."""
    cfg = dict(batch=3, n_slots=12, head_dim=64, n_sink=2, n_tail=1, n_cand=5, n_sel=2, lam=2.0,
               batch0=False, contiguous=False, views=False, special=None) | _EDGES[case]
    dev, b, n_slots, d = kernel_device, cfg["batch"], cfg["n_slots"], cfg["head_dim"]
    g = gen(40)
    if cfg["views"]:  # a layer of [L, B, S, 2D], every other dim: p_sd = 2, p_ss = 2D
        proto = randn(g, 2, b, n_slots, 2 * d, device=dev)[1, :, :, 1::2]
    else:
        proto = randn(g, b, n_slots, d, device=dev)
    sink = torch.arange(cfg["n_sink"], device=dev)
    tail = torch.arange(n_slots - cfg["n_tail"], n_slots, device=dev)
    if cfg["n_cand"] == 5:
        cand = torch.tensor([3, 5, 6, 8, 9], device=dev)
    else:  # a sorted random subset of the middle slots
        cand = (torch.randperm(n_slots - 3, generator=g)[:cfg["n_cand"]] + 2).sort().values.to(dev)
    if cfg["special"] == "ties":  # the best possible direction p_sink - lam p_tail, three times
        unit = lambda x: torch.nn.functional.normalize(x, dim=-1)  # noqa: E731
        best = unit(proto[:, sink].mean(1)) - cfg["lam"] * unit(proto[:, tail].mean(1))
        for c in (1, 3, 4):
            proto[:, cand[c]] = best
    elif cfg["special"] == "nan_cand":
        proto[:, cand[2], 5] = float("nan")
    elif cfg["special"] == "nan_tail":
        proto[:, tail[0], 0] = float("nan")
    elif cfg["special"] == "huge":
        proto *= 1e20
    slot_pos = torch.randperm(n_slots + 30, generator=g)[:n_slots].to(dev)
    n_sel, seg_index = cfg["n_sel"], 3
    target = torch.arange(20, 20 + n_sel, device=dev)
    n_seg = seg_index + n_sel + (0 if cfg["views"] else 2)  # views: the rows end at the table's end
    layout = "view" if cfg["views"] else "contiguous"
    base0 = seg_storage(b, n_seg, layout, g, dev)
    seg_view(base0, layout)[:, seg_index:seg_index + n_sel] = INT_POISON  # the rows the kernel must write
    if cfg["views"]:
        slot_pos, sink, tail, cand, target = map(spaced, (slot_pos, sink, tail, cand, target))
    base_cuda, base_ref = base0.clone(), base0.clone()
    proto0 = proto.clone()
    args = (proto, slot_pos, sink, tail, cand)
    tail_args = (seg_index, target, 16, cfg["lam"], cfg["batch0"], cfg["contiguous"])
    scores = relax_select_cuda(*args, seg_view(base_cuda, layout), *tail_args)
    want = relax_select_ref(*args, seg_view(base_ref, layout), *tail_args)
    assert scores.shape == (b, cand.numel())
    torch.testing.assert_close(scores, want, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert torch.equal(base_cuda, base_ref)  # written rows, untouched rows and the gaps of the view
    assert torch.equal(proto.nan_to_num(), proto0.nan_to_num())
    rows = seg_view(base_cuda, layout)[:, seg_index:seg_index + n_sel]
    picked = {  # the rule the case is about, spelled out (candidate indices of the H_sel rows)
        "no_sink_no_tail": [0, 1, 2], "ties": [1, 3], "nan_tail": [0, 1], "all_picked": [0, 1, 2, 3, 4],
    }.get(case)
    if picked is not None:
        assert torch.equal(rows[..., 0], (cand[picked] * 16).int().expand(b, -1))
    if case == "nan_candidate":
        assert not bool((rows[..., 0] == int(cand[2]) * 16).any())
    if case == "huge_prototypes":
        unscaled = relax_scores_ref(proto / 1e20, sink, tail, cand, cfg["lam"])
        torch.testing.assert_close(scores, unscaled, rtol=1e-5, atol=1e-5)
    if case == "no_sink_no_tail":
        assert torch.equal(scores, torch.zeros_like(scores))


# ----------------------------------------------------------------------------- every backend, same result


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_int32_indices_match_int64(backend):
    assert_int32_indices_match_int64("relax_select", on(backend_device(backend), _args(gen(9))), backend)


def test_int32_indices_match_int64_cuda(kernel_device):
    assert_int32_indices_match_int64("relax_select", on(kernel_device, _args(gen(9))), "cuda")


# ------------------------------------------------------------------------------------------ registration


def test_opcheck():
    torch.library.opcheck(torch.ops.relaxkv.relax_select.default, (*_args(gen(0)), "reference"))


def test_public_op_matches_registered_op():
    assert_public_op_matches_registered("relax_select", _args(gen(1)))  # the table too: the same rows written


def test_fake_shape():
    out, _ = run_on_fakes("relax_select", _args(gen(3)))
    assert out.shape == (B, 4) and out.dtype == torch.float32


# ------------------------------------------------------------------------------------------- bad input

BAD = [  # (argument index, replacement, error type, message fragment)
    pytest.param(0, randn(gen(4), B, 8, D).double(), TypeError, "proto: expected dtype", id="proto_float64"),
    pytest.param(0, randn(gen(4), B, 8), ValueError, "proto: expected rank 3", id="proto_rank"),
    pytest.param(1, torch.arange(7), ValueError, "slot_pos: expected shape \\[8\\]", id="slot_pos_length"),
    pytest.param(2, torch.tensor([0, 8]), ValueError, "sink_slots: expected values in \\[0, 7\\]", id="sink_range"),
    pytest.param(4, torch.tensor([3, 9]), ValueError, "cand_slots: expected values in \\[0, 7\\]", id="cand_range"),
    pytest.param(4, torch.tensor([-2, 4]), ValueError, "cand_slots: expected values in \\[0, 7\\]", id="cand_negative"),
    pytest.param(4, torch.tensor([3.0, 4.0]), TypeError, "cand_slots: expected dtype", id="cand_float"),
    pytest.param(4, torch.tensor([], dtype=torch.int64), ValueError, "cand_slots: expected at least one", id="no_cand"),
    pytest.param(5, torch.ones(B, 7, 3, dtype=torch.int64), TypeError, "seg: expected dtype", id="seg_int64"),
    pytest.param(5, torch.ones(B, 0, 3, dtype=torch.int32), ValueError, "seg: expected at least one segment row",
                 id="seg_no_rows"),
    pytest.param(6, 7, ValueError, "seg_index: expected an int in \\[0, 6\\]", id="seg_index_past_table"),
    pytest.param(7, torch.tensor([1, 2, 3, 4, 5]), ValueError, "target_pos: expected 1 .. 4", id="too_many_targets"),
    pytest.param(8, 0, ValueError, "frame_tokens", id="frame_tokens_zero"),
    pytest.param(9, float("inf"), ValueError, "lam: expected a finite number", id="lam_inf"),
    pytest.param(3, torch.tensor([7], device="meta"), ValueError, "tail_slots: expected tensors on cpu",
                 id="tail_device"),
    pytest.param(12, "fused", ValueError, "backend: expected one of", id="backend_name"),
]


test_bad_input_raises_before_any_kernel, _, test_checked_true_matches_default = raw_op_tests("relax_select", _args,
                                                                                           BAD)
