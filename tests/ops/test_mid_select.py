"""relaxkv::mid_select: PackForcing query-key affinity of the mid blocks, top-k written into the segment table.

The reference's bilinear affinity against the literal double sum and its selection (per sample, time order,
ties to the older block; the batch-averaged rule with ``batch_mean``); a sample selects in a batch what it
selects alone, on every backend; the Triton kernel (interpreter on CPU) and the CUDA kernel
(``kernel_device``) against the reference, with poisoned table rows and never-read queries / heads set to
NaN; registration (``checked``, defaults) and the bad inputs of the public and the registered op.
"""
import pytest
import torch

import relaxkv_kernels as rk
from relaxkv_kernels.ops import cuda_common
from relaxkv_kernels.ops.mid_select.cuda import mid_select_cuda
from relaxkv_kernels.ops.mid_select.reference import mid_affinity_literal
from relaxkv_kernels.ops.mid_select.reference import mid_affinity_ref
from relaxkv_kernels.ops.mid_select.reference import mid_select_ref
from relaxkv_kernels.ops.relax_select.reference import top_in_order

from helpers import DEVICE
from helpers import DTYPE_IDS
from helpers import DTYPES
from helpers import INT_POISON
from helpers import assert_checked_matches_default
from helpers import assert_int32_indices_match_int64
from helpers import assert_public_op_matches_registered
from helpers import assert_raw_op_raises_like_public
from helpers import assert_strided_inputs_match_reference
from helpers import backend_device
from helpers import compare_with_triton
from helpers import gen
from helpers import need_triton
from helpers import on
from helpers import randn
from helpers import replace
from helpers import run_on_fakes
from helpers import seg_storage
from helpers import seg_view
from helpers import spaced
from helpers import strided

B, H, D = 2, 4, 16
WAN_F, WAN_H, WAN_D = 1560, 12, 128


def _args(g: torch.Generator) -> list:
    """Small valid arguments: 64 queries, 6 archive slots, 5 mid blocks (a ring wrap), top 2 at table row 3."""
    return [randn(g, B, 64, H, D), randn(g, B, 6, H, D), torch.tensor([2, 3, 4, 5, 0]), torch.arange(6) * 4,
            torch.zeros(B, 10, 3, dtype=torch.int32), 3, torch.tensor([30, 34]), 100, 8, 3]


def _scores_close(got: torch.Tensor, want: torch.Tensor, what: str):
    """Same NaN entries; the finite ones within 1e-5 of the largest |score| (fp32 sums of ~D * Nsq products)."""
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN entries {got} vs {want}"
    fin = ~want.isnan()
    scale = want[fin].abs().max().clamp_min(1e-30) if fin.any() else 1.0
    torch.testing.assert_close(got[fin] / scale, want[fin] / scale, rtol=0, atol=1e-5, msg=what)


# ---------------------------------------------------------------------------------- reference vs literal


def _blocks(g, b, m, nc, h, d):
    """m compressed blocks [B, Nc, H, D] with a per-block mean offset (affinities differ)."""
    return [randn(g, b, nc, h, d) + 0.2 * randn(g, 1, 1, h, d) for _ in range(m)]


@pytest.mark.parametrize("b, h, d, nsq, nc, m", [
    pytest.param(2, 4, 32, 6, 5, 3, id="B2-H4-D32"),
    pytest.param(2, 4, 128, 9, 12, 5, id="B2-H4-D128"),
    pytest.param(1, 2, 64, 1, 1, 2, id="B1-H2-single-token"),
])
def test_mid_affinity_ref_equals_literal(b, h, d, nsq, nc, m):
    g = gen(600 + d + nc)
    q = randn(g, b, nsq, h, d) + 0.3
    blocks = _blocks(g, b, m, nc, h, d)
    mean_key = torch.stack([blk.mean(dim=1) for blk in blocks], dim=1)  # [B, M, H, D]
    got = mid_affinity_ref(q, mean_key, nc)
    assert got.dtype == torch.float32 and got.shape == (b, m)
    # float64 math rounded once to fp32 against a float64 double sum: fp32 rounding of values of ~1-100
    torch.testing.assert_close(got.double(), mid_affinity_literal(q, blocks), rtol=1e-5, atol=1e-5)


def test_mid_affinity_uses_the_first_half_of_the_heads_only():
    g = gen(610)
    b, h, d, nsq, nc, m = 2, 4, 32, 5, 4, 3
    q = randn(g, b, nsq, h, d)
    blocks = _blocks(g, b, m, nc, h, d)
    mean_key = torch.stack([blk.mean(dim=1) for blk in blocks], dim=1)
    s_ref, s_lit = mid_affinity_ref(q, mean_key, nc), mid_affinity_literal(q, blocks)
    q2, mk2 = q.clone(), mean_key.clone()
    q2[:, :, 2:] = randn(g, b, nsq, 2, d)
    mk2[:, :, 2:] = randn(g, b, m, 2, d)
    blocks2 = [blk.clone() for blk in blocks]
    for blk in blocks2:
        blk[:, :, 2:] = randn(g, b, nc, 2, d)
    assert torch.equal(mid_affinity_ref(q2, mk2, nc), s_ref)
    assert torch.equal(mid_affinity_literal(q2, blocks2), s_lit)
    q3 = q.clone()
    q3[:, :, 1] += 1.0  # head 1 does count
    assert not torch.equal(mid_affinity_ref(q3, mean_key, nc), s_ref)


@pytest.mark.parametrize("b, k, seg_index, q_stride", [
    pytest.param(1, 2, 0, 1, id="k2-idx0-stride1"),
    pytest.param(2, 3, 2, 3, id="k3-idx2-B2-stride3"),
    pytest.param(2, 5, 1, 2, id="k-equals-M-all-selected"),
])
def test_mid_select_ref(b, k, seg_index, q_stride):
    g = gen(700 + 10 * k + seg_index)
    h, d, nq, nc, n_blocks, row0 = 4, 32, 10, 6, 7, 1000
    q = randn(g, b, nq, h, d) + 0.5
    keys = _blocks(g, b, n_blocks, nc, h, d)  # archive slot i holds keys[i]
    mean_key = torch.stack([blk.mean(dim=1) for blk in keys], dim=1)
    mid_slots = torch.tensor([4, 6, 0, 1, 3])  # oldest first; ring-buffer wrap-around
    block_pos = torch.tensor([32, 36, 999, 40, 24, -999, 28])  # first frame of slots 0..6 (2, 5: unused)
    target_pos = torch.arange(k) * 4 + 8
    n_seg = seg_index + k + 2
    seg = torch.randint(-500, 500, (b, n_seg, 3), generator=g, dtype=torch.int32)
    seg_before, q0, mk0 = seg.clone(), q.clone(), mean_key.clone()

    scores = mid_select_ref(q, mean_key, mid_slots, block_pos, seg, seg_index, target_pos, row0, nc, q_stride)

    expected = mid_affinity_literal(q[:, ::q_stride], [keys[int(s)] for s in mid_slots])  # [B, M]
    assert scores.shape == (b, len(mid_slots))
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-5)
    for bb in range(b):  # each sample on its own scores
        ranked = sorted(range(len(mid_slots)), key=lambda i: -float(expected[bb, i]))
        if k < len(mid_slots):
            assert expected[bb, ranked[k - 1]] - expected[bb, ranked[k]] > 1e-3  # no near-tie at the cut
        for j, i in enumerate(sorted(ranked[:k])):  # time order = order in mid_slots
            slot = int(mid_slots[i])
            assert seg[bb, seg_index + j].tolist() == [row0 + slot * nc, nc, int(target_pos[j] - block_pos[slot])]
    keep = torch.ones(n_seg, dtype=torch.bool)
    keep[seg_index:seg_index + k] = False
    assert torch.equal(seg[:, keep], seg_before[:, keep])
    assert torch.equal(q, q0) and torch.equal(mean_key, mk0)


def test_mid_select_ref_ties_go_to_the_older_block():
    g = gen(710)
    h, d, nc = 2, 16, 3
    q = randn(g, 1, 4, h, d)
    qbar = q.mean(dim=1)  # [1, H, D]
    mean_key = torch.stack([-qbar, qbar + 0.1 * randn(g, 1, h, d), qbar, -2 * qbar], dim=1)  # slots 1, 2 positive
    mean_key[:, 2] = mean_key[:, 1]  # slots 1 and 2 tie
    mid_slots = torch.tensor([2, 1, 0, 3])  # slot 2 is older than slot 1
    seg = torch.zeros(1, 1, 3, dtype=torch.int32) + 7
    scores = mid_select_ref(q, mean_key, mid_slots, torch.tensor([8, 12, 4, 16]), seg, 0, torch.tensor([20]), 0, nc, 1)
    assert scores[0, 0] == scores[0, 1]
    assert seg[0, 0].tolist() == [2 * nc, nc, 20 - 4]


# ------------------------------------------------------------------------- per sample, and the batch mean

# Sample b's affinity of mid block m is ~ W[b, m] (times |Sq| * Nc / sqrt(D)): top 2 per sample are blocks
# {0, 1}, {4, 5}, {1, 4}; the batch mean (column means 3.67 4.33 1.67 2.67 4.67 4.0) picks {1, 4}.
_W = torch.tensor([[6.0, 5, 1, 2, 3, 4], [1, 2, 3, 4, 6, 5], [4, 6, 1, 2, 5, 3]])
_PICKS = [[0, 1], [4, 5], [1, 4]]
_MEAN_PICK = [1, 4]
_STRIDE, _ROW0, _NC = 3, 50, 7


def _diverging(g: torch.Generator, dtype=torch.float32, device="cpu", poison: bool = True) -> list:
    """Arguments of mid_select (B = 3, 40 queries, H = 4, D = 32, 8 archive slots, 6 mid blocks, k = 2) whose
    samples choose different blocks: mean_key[b, slot_m, h] = W[b, m] qbar_{b,h} / |qbar_{b,h}|^2 + noise, with
    qbar the sample's own subsampled query mean. ``poison``: what the op must never read (tokens outside the
    subsample, heads >= H/2, slots outside mid_slots) is NaN."""
    b, n_q, h, d, hh = 3, 40, 4, 32, 2
    q = (randn(g, b, n_q, h, d) + 0.3).to(dtype).float()
    qbar = q[:, ::_STRIDE, :hh].double().mean(1)  # [B, H/2, D]
    mid_slots = torch.tensor([5, 0, 3, 1, 6, 2])
    mean_key = 0.02 * randn(g, b, 8, h, d)
    for m, slot in enumerate(mid_slots.tolist()):
        mean_key[:, slot, :hh] += (_W[:, m, None, None] * qbar / qbar.square().sum(-1, keepdim=True)).float()
    if poison:
        sampled = torch.zeros(n_q, dtype=torch.bool)
        sampled[::_STRIDE] = True
        q[:, ~sampled] = float("nan")
        q[:, :, hh:] = float("nan")
        mean_key[:, :, hh:] = float("nan")
        mean_key[:, [4, 7]] = float("nan")  # archive slots that are not mid blocks
    block_pos = torch.arange(8) * 4 + 8
    seg = torch.full((b, 6, 3), INT_POISON, dtype=torch.int32)
    args = [q.to(dtype), mean_key, mid_slots, block_pos, seg, 1, torch.tensor([60, 64]), _ROW0, _NC, _STRIDE]
    return on(device, args)


def _rows(picks, mid_slots: torch.Tensor, block_pos: torch.Tensor) -> list:
    """The segment rows (start, length, delta) of the blocks ``picks`` (indices into mid_slots, time order)."""
    slots = [int(mid_slots[i]) for i in picks]
    return [[_ROW0 + sl * _NC, _NC, t - int(block_pos[sl])] for sl, t in zip(slots, (60, 64))]


def _check_backend(backend: str, device, dtype, batch_mean: bool) -> None:
    """``backend`` on the diverging inputs: the reference's scores and rows; per sample, each sample's own
    choice (the samples differ) and exactly what it selects alone; with the batch mean, one choice for all."""
    args = _diverging(gen(800), dtype, device)
    mid_slots, block_pos, seg = args[2:5]
    seg_ref = seg.clone()
    scores = rk.mid_select(*args, batch_mean=batch_mean, backend=backend)
    want = mid_select_ref(*replace(args, 4, seg_ref), batch_mean)
    assert scores.shape == (3, 6)
    _scores_close(scores, want, f"{backend} scores")
    assert torch.equal(seg, seg_ref), f"{backend} segment table differs:\n{seg}\nvs\n{seg_ref}"
    assert bool((seg[:, [0, 3, 4, 5]] == INT_POISON).all()), "rows outside seg_index .. seg_index + k written"
    rows = seg[:, 1:3].tolist()
    if batch_mean:
        assert rows == [_rows(_MEAN_PICK, mid_slots, block_pos)] * 3
        assert all(torch.equal(scores[0], scores[i]) for i in (1, 2))
        return
    assert rows == [_rows(p, mid_slots, block_pos) for p in _PICKS]  # three different choices
    for bb in range(3):  # a sample alone selects exactly what it selects in the batch
        alone = [a[bb:bb + 1] if i in (0, 1, 4) else a for i, a in enumerate(args)]
        alone[4] = torch.full_like(alone[4], INT_POISON)
        s1 = rk.mid_select(*alone, backend=backend)
        assert torch.equal(alone[4][0], seg[bb]), f"{backend}: sample {bb} alone selects differently"
        torch.testing.assert_close(s1[0], scores[bb], rtol=1e-6, atol=1e-6 * scores[bb].abs().max().item())


@pytest.mark.parametrize("batch_mean", [False, True], ids=["per_sample", "batch_mean"])
@pytest.mark.parametrize("backend, dtype", [
    pytest.param("reference", torch.float32, id="reference"),
    pytest.param("triton", torch.float32, id="triton-fp32"),
    pytest.param("triton", torch.float16, id="triton-fp16"),
])
def test_per_sample_selection(backend, dtype, batch_mean):
    _check_backend(backend, backend_device(backend), dtype, batch_mean)


@pytest.mark.parametrize("batch_mean", [False, True], ids=["per_sample", "batch_mean"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_per_sample_selection_cuda(kernel_device, dtype, batch_mean):
    _check_backend("cuda", kernel_device, dtype, batch_mean)


def test_batch_mean_is_the_batch_averaged_rule():
    """batch_mean=True: s_m = sum_j sum_{i in Sq} mean_{b, h<H/2} q_{b,h,i} . k_{m,b,h,j} / sqrt(D) (the paper's
    rule, stated here in float64 on the compressed keys themselves), one top-k written for every sample."""
    g = gen(820)
    args = _diverging(g, poison=False)
    q, mean_key, mid_slots, block_pos = args[:4]
    b, _, h, d = q.shape
    noise = randn(g, b, 8, _NC, h, d)
    keys = mean_key[:, :, None] + noise - noise.mean(2, keepdim=True)  # [B, slot, Nc, H, D]: blocks of these means
    args[1] = keys.mean(2)
    qs = q[:, ::_STRIDE, : h // 2].double()
    expected = torch.stack([
        torch.einsum("bihd,bjhd->ijbh", qs, keys[:, slot, :, : h // 2].double()).mean(dim=(2, 3)).sum() / d**0.5
        for slot in mid_slots.tolist()
    ])  # [M]
    pick = sorted(expected.argsort(descending=True)[:2].tolist())
    assert pick == _MEAN_PICK

    seg_mean = args[4].clone()
    scores = rk.mid_select(*replace(args, 4, seg_mean), batch_mean=True)
    for bb in range(b):
        torch.testing.assert_close(scores[bb].double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
        assert seg_mean[bb, 1:3].tolist() == _rows(pick, mid_slots, block_pos)
    seg_own = args[4].clone()
    rk.mid_select(*replace(args, 4, seg_own))  # per sample (the default) differs for samples 0 and 1
    assert seg_own[:, 1:3].tolist() == [_rows(p, mid_slots, block_pos) for p in _PICKS]


# ------------------------------------------------------------------------------- Triton vs reference


@pytest.mark.parametrize("batch_mean", [False, True], ids=["per_sample", "batch_mean"])
@pytest.mark.parametrize("dtype, n_q, heads, q_stride, mid, target, layout, tie", [
    pytest.param(torch.float32, 37, 2, 4, [7, 2, 5, 9, 0, 3], [20, 24, 28], "contiguous", False, id="fp32-stride4"),
    pytest.param(torch.float16, 45, 4, 3, [1, 4, 6, 8, 9], [30, 34], "fused_qkv", False, id="fp16-noncontig-q"),
    pytest.param(torch.float32, 16, 2, 1, [3, 0, 8], [10, 14, 18], "contiguous", False, id="fp32-select-all"),
    pytest.param(torch.float16, 20, 2, 5, [2, 3, 5, 6, 7, 9, 1], [40], "contiguous", True, id="fp16-tie"),
])
def test_mid_select_triton_matches_reference(dtype, n_q, heads, q_stride, mid, target, layout, tie, batch_mean):
    need_triton()
    from relaxkv_kernels.ops.mid_select.triton import mid_select_triton

    g = gen(n_q + heads + q_stride)
    if layout == "fused_qkv":  # queries as one head-interleaved slice of a fused qkv buffer
        q = randn(g, 2, n_q, 3, heads, 32, dtype=dtype, device=DEVICE)[:, :, 0]
        assert not q.is_contiguous()
    else:
        q = randn(g, 2, n_q, heads, 32, dtype=dtype, device=DEVICE)
    mean_key = randn(g, 2, 10, heads, 32)
    if tie:  # best-aligned key copied into a second slot: equal best scores, the earlier block must win
        qbar = q.float().cpu()[:, ::q_stride, : heads // 2].mean(1)  # [B, H/2, D]
        mean_key[:, mid[1], : heads // 2] = mean_key[:, mid[4], : heads // 2] = qbar * 5.0
    mean_key = mean_key.to(DEVICE)
    mid_slots, target_pos = (torch.tensor(x, dtype=torch.int64, device=DEVICE) for x in (mid, target))
    block_pos = torch.randint(0, 40, (10,), generator=g).to(DEVICE)
    seg = torch.randint(-1000, 1000, (2, 8, 3), generator=g, dtype=torch.int32).to(DEVICE)
    seg_ref = seg.clone()
    inputs = (q, mean_key, mid_slots, block_pos, target_pos)
    before = [t.clone() for t in inputs]

    scores = mid_select_triton(q, mean_key, mid_slots, block_pos, seg, 3, target_pos, 100, 6, q_stride, batch_mean)
    expected = mid_select_ref(q, mean_key, mid_slots, block_pos, seg_ref, 3, target_pos, 100, 6, q_stride, batch_mean)

    for t, t0 in zip(inputs, before):
        assert torch.equal(t, t0), "inputs changed"
    # the queries enter as exact fp32 values in both (fp16 upcast); fp32 sums of a few hundred products vs
    # float64: relative 1e-5 of the largest score covers the cancellation in near-zero scores
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    assert torch.equal(seg, seg_ref), f"segment table differs:\n{seg}\nvs\n{seg_ref}"
    if tie:
        assert torch.equal(scores[:, 1], scores[:, 4]) and bool((seg[:, 3, 0] == 100 + mid[1] * 6).all())


# --------------------------------------------------------------------------------- CUDA vs reference


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout, n_q, q_stride, batch_mean", [
    ("contiguous", 200, 3, False), ("strided", 97, 1, False), ("unaligned", 130, 130, False),
    ("contiguous", 200, 3, True),
], ids=["contiguous-stride3", "strided-odd_nq", "unaligned-one_query", "batch_mean"])
def test_mid_select_cuda_matches_reference(kernel_device, dtype, layout, n_q, q_stride, batch_mean):
    dev, b, h, d, n_blocks = kernel_device, 2, 4, 128, 9
    g = gen(21)
    q = strided(randn(g, b, n_q, h, d, dtype=dtype, device=dev), layout)
    mean_key = randn(g, b, n_blocks, h, d, device=dev)
    mid_slots = torch.tensor([4, 5, 6, 7, 8, 0, 1], device=dev)
    block_pos = torch.arange(n_blocks, device=dev) * 4 + 8
    target = torch.tensor([40, 44, 48], device=dev)
    seg0 = torch.full((b, 10, 3), INT_POISON, dtype=torch.int32, device=dev)
    seg_cuda, seg_ref = seg0.clone(), seg0.clone()
    q0 = q.clone()
    args, tail_args = (q, mean_key, mid_slots, block_pos), (5, target, 1000, 12, q_stride, batch_mean)
    scores = mid_select_cuda(*args, seg_cuda, *tail_args)
    want = mid_select_ref(*args, seg_ref, *tail_args)
    _scores_close(scores, want, "scores")
    assert torch.equal(seg_cuda, seg_ref)
    assert torch.equal(q, q0)
    if compare_with_triton(dev, dtype):
        from relaxkv_kernels.ops.mid_select.triton import mid_select_triton

        seg_tri = seg0.clone()
        _scores_close(scores, mid_select_triton(*args, seg_tri, *tail_args), "scores vs triton")
        assert torch.equal(seg_cuda, seg_tri)


# defaults: batch 2, H 4, D 64, fp32 contiguous, 12 archive slots, M 7 mid blocks, k 3
_EDGES = {
    "many_blocks-odd_half_heads": dict(heads=6, n_blocks=24, n_mid=20, n_sel=5),  # M > 8 warps, H/2 = 3
    "32_splits-odd_heads-fp16": dict(batch=1, heads=5, head_dim=16, n_q=6145, q_stride=3, dtype=torch.float16),
    "ties": dict(n_sel=2, special="ties"),  # mid blocks 1, 3, 4 identical and best: k 2 takes 1 and 3
    "nan_block": dict(special="nan"),  # a non-finite score is never chosen over a finite one
    "300_blocks-views-bf16": dict(batch=3, heads=2, head_dim=8, n_blocks=310, n_mid=300, n_sel=100, views=True,
                                  dtype=torch.bfloat16),  # M and B * k > 256 threads
    "d512-scalar-bf16": dict(heads=2, head_dim=512, n_q=10, q_stride=4, layout="unaligned", dtype=torch.bfloat16),
}


@pytest.mark.parametrize("case", list(_EDGES))
def test_mid_select_cuda_edge_cases(kernel_device, case):
    """Several qsum splits, odd H/2, more mid blocks than warps and threads, ties, NaN, index and table views."""
    cfg = dict(batch=2, heads=4, head_dim=64, n_q=50, q_stride=2, n_blocks=12, n_mid=7, n_sel=3, views=False,
               layout="contiguous", dtype=torch.float32, special=None) | _EDGES[case]
    dev, b, h, d, n_q, stride = kernel_device, cfg["batch"], cfg["heads"], cfg["head_dim"], cfg["n_q"], cfg["q_stride"]
    g = gen(41)
    q = randn(g, b, n_q, h, d, device=dev)
    n_sub = -(-n_q // stride)
    if case == "32_splits-odd_heads-fp16":  # the cap, and a short last split (the extension the wrapper calls)
        assert cuda_common.runtime.extension("mid_select_cuda").mid_select_splits(n_sub) == 32 and n_sub % 32
    sampled = torch.zeros(n_q, dtype=torch.bool, device=dev)
    sampled[::stride] = True
    q[:, ~sampled] = float("nan")  # tokens outside the subsample, and heads >= H/2, are never read
    q[:, :, h // 2:] = float("nan")
    q = strided(q.to(cfg["dtype"]), cfg["layout"])
    n_blocks, n_mid, n_sel = cfg["n_blocks"], cfg["n_mid"], cfg["n_sel"]
    if cfg["views"]:  # [B, H, n_blocks, 2D] storage: k_sn = 2D, k_sh = n_blocks * 2D, k_sd = 2
        mean_key = randn(g, b, h, n_blocks, 2 * d, device=dev).transpose(1, 2)[..., ::2]
    else:
        mean_key = randn(g, b, n_blocks, h, d, device=dev)
    mean_key[:, :, h // 2:] = float("nan")
    mid_slots = torch.randperm(n_blocks, generator=g)[:n_mid].to(dev)
    if cfg["special"] == "ties":  # 10 x the subsampled query mean: far above any random block's score
        qbar = q[:, ::stride, : h // 2].float().mean(1)
        for m in (1, 3, 4):
            mean_key[:, mid_slots[m], : h // 2] = 10 * qbar
    elif cfg["special"] == "nan":
        mean_key[1, mid_slots[5], 0, 3] = float("nan")
    block_pos = torch.randperm(4 * n_blocks, generator=g)[:n_blocks].to(dev)
    target = torch.arange(n_sel, device=dev) * 4 + 100
    row0, nc, seg_index = 11, 5, 2
    n_seg = seg_index + n_sel + (0 if cfg["views"] else 3)
    layout = "view" if cfg["views"] else "contiguous"
    base0 = seg_storage(b, n_seg, layout, g, dev)
    seg_view(base0, layout)[:, seg_index:seg_index + n_sel] = INT_POISON
    if cfg["views"]:
        mid_slots, block_pos, target = map(spaced, (mid_slots, block_pos, target))
    base_cuda, base_ref = base0.clone(), base0.clone()
    q0, mk0 = q.clone(), mean_key.clone()
    args, tail_args = (q, mean_key, mid_slots, block_pos), (seg_index, target, row0, nc, stride)
    scores = mid_select_cuda(*args, seg_view(base_cuda, layout), *tail_args)
    want = mid_select_ref(*args, seg_view(base_ref, layout), *tail_args)
    assert scores.shape == (b, n_mid)
    _scores_close(scores, want, case)
    assert torch.equal(base_cuda, base_ref)
    assert torch.equal(q.nan_to_num(), q0.nan_to_num()) and torch.equal(mean_key.nan_to_num(), mk0.nan_to_num())
    rows = seg_view(base_cuda, layout)[:, seg_index:seg_index + n_sel]
    if case == "ties":
        assert torch.equal(rows[..., 0], (row0 + mid_slots[[1, 3]] * nc).int().expand(b, -1))
    if case == "nan_block":  # sample 1's score of block 5 is NaN
        assert not bool((rows[1, :, 0] == row0 + int(mid_slots[5]) * nc).any())


def test_mid_select_cuda_out_of_range_slot_scores_zero_and_gets_an_empty_segment(kernel_device):
    """Wrapper contract, which the reference does not cover: a slot outside [0, n_blocks) scores exactly 0 and,
    when selected, gets the empty segment (row0, 0, 0); the valid blocks score and rank as in the reference."""
    dev, b, h, d, n_blocks, row0, nc = kernel_device, 2, 4, 32, 6, 3, 7
    g = gen(42)
    q, mean_key = randn(g, b, 20, h, d, device=dev), randn(g, b, n_blocks, h, d, device=dev)
    mid_slots = torch.tensor([4, n_blocks, 0, -1, 2], device=dev)  # two invalid of five, k = 4: one is picked
    block_pos = torch.arange(n_blocks, device=dev) * 4
    target = torch.tensor([30, 34, 38, 42], device=dev)
    seg = torch.full((b, 5, 3), INT_POISON, dtype=torch.int32, device=dev)
    scores = mid_select_cuda(q, mean_key, mid_slots, block_pos, seg, 1, target, row0, nc, 3)
    valid = (mid_slots >= 0) & (mid_slots < n_blocks)
    padded = torch.cat([mean_key, torch.zeros_like(mean_key[:, :1])], 1)  # invalid -> a zero mean key
    remapped = torch.where(valid, mid_slots, n_blocks)
    seg_ref = torch.zeros_like(seg)
    want = mid_select_ref(q, padded, remapped, torch.cat([block_pos, block_pos[:1]]), seg_ref, 1, target, row0, nc, 3)
    assert torch.equal(scores[:, ~valid], torch.zeros(b, 2, device=dev))
    _scores_close(scores, want, "scores")
    pick = top_in_order(want, 4)  # [B, 4]
    assert not bool(valid[pick].all())
    expect = seg_ref[:, 1:5].clone()
    for bb in range(b):
        expect[bb, ~valid[pick[bb]]] = torch.tensor([row0, 0, 0], dtype=torch.int32, device=dev)
    assert torch.equal(seg[:, 1:5], expect)
    assert bool((seg[:, 0] == INT_POISON).all())


def test_mid_select_cuda_at_wan_shapes(kernel_device):
    """6240 queries subsampled every 8 (780: 13 splits), 6 half-heads, top 16 of 40 archived blocks (Nc = 182)."""
    dev, n_slots, nc = kernel_device, 66, 182
    g = gen(52)
    q = randn(g, 2, 4 * WAN_F, WAN_H, WAN_D, dtype=torch.bfloat16, device=dev)
    mean_key = randn(g, 2, n_slots, WAN_H, WAN_D, device=dev)
    mid_slots = torch.randperm(n_slots, generator=g)[:40].sort().values.to(dev)
    block_pos = (torch.arange(n_slots) * 4 + 8).to(dev)
    target = (torch.arange(16) * 4 + 8).to(dev)
    seg0 = torch.full((2, 20, 3), INT_POISON, dtype=torch.int32, device=dev)
    seg_cuda, seg_ref = seg0.clone(), seg0.clone()
    args = (q, mean_key, mid_slots, block_pos)
    scores = mid_select_cuda(*args, seg_cuda, 2, target, 16 * WAN_F, nc, 8)
    want = mid_select_ref(*args, seg_ref, 2, target, 16 * WAN_F, nc, 8)
    _scores_close(scores, want, "scores")
    assert torch.equal(seg_cuda, seg_ref)


# ----------------------------------------------------------------------------- every backend, same result


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_int32_indices_match_int64(backend):
    assert_int32_indices_match_int64("mid_select", on(backend_device(backend), _args(gen(9))), backend)


def test_int32_indices_match_int64_cuda(kernel_device):
    assert_int32_indices_match_int64("mid_select", on(kernel_device, _args(gen(9))), "cuda")


def test_last_dim_strided_inputs_cuda(kernel_device):
    """q and mean_key with stride(-1) == 2 (accepted by the public op)."""
    assert_strided_inputs_match_reference("mid_select", on(kernel_device, _args(gen(10))), (0, 1), "cuda")


# ------------------------------------------------------------------------------------------ registration


@pytest.mark.parametrize("extra", [(False, "reference"), (True, "reference"), (False, "reference", True)],
                         ids=["per_sample", "batch_mean", "checked"])
def test_opcheck(extra):
    torch.library.opcheck(torch.ops.relaxkv.mid_select.default, (*_args(gen(0)), *extra))


def test_raw_op_spells_out_the_public_defaults_and_checked_defaults_to_false():
    args = torch.ops.relaxkv.mid_select.default._schema.arguments
    assert [a.name for a in args[-3:]] == ["batch_mean", "backend", "checked"]
    assert args[-1].default_value is False and not args[-2].has_default_value() and not args[-3].has_default_value()


@pytest.mark.parametrize("batch_mean", [False, True], ids=["per_sample", "batch_mean"])
def test_checked_true_matches_default(batch_mean):
    assert_checked_matches_default("mid_select", [*_args(gen(2)), batch_mean, "reference"])


def test_public_op_matches_registered_op():
    assert_public_op_matches_registered("mid_select", _args(gen(1)), False)


def test_fake_shape():
    out, _ = run_on_fakes("mid_select", _args(gen(3)), False)
    assert out.shape == (B, 5) and out.dtype == torch.float32


# ------------------------------------------------------------------------------------------- bad input

BAD = [  # (argument index, replacement, error type, message fragment)
    pytest.param(0, torch.randn(B, 64, 1, D), ValueError, "at least 2 heads", id="one_head"),
    pytest.param(0, torch.randn(B, 0, H, D), ValueError, "at least one query token", id="no_queries"),
    pytest.param(1, torch.randn(B, 6, H - 1, D), ValueError, "mean_key: expected shape", id="mean_key_heads"),
    pytest.param(1, torch.randn(B, 6, H, D).half(), TypeError, "mean_key: expected dtype", id="mean_key_fp16"),
    pytest.param(2, torch.tensor([2, 7]), ValueError, "mid_slots: expected values in \\[0, 5\\]", id="mid_range"),
    pytest.param(2, torch.tensor([], dtype=torch.int64), ValueError, "mid_slots: expected at least one", id="no_mid"),
    pytest.param(3, torch.arange(5), ValueError, "block_pos: expected shape \\[6\\]", id="block_pos_length"),
    pytest.param(6, torch.arange(6), ValueError, "target_pos: expected 1 .. 5", id="too_many_targets"),
    pytest.param(5, 9, ValueError, "seg_index: expected an int in \\[0, 8\\]", id="seg_index_past_table"),
    pytest.param(7, -1, ValueError, "row0", id="row0_negative"),
    pytest.param(8, 0, ValueError, "block_tokens", id="block_tokens_zero"),
    pytest.param(9, 0, ValueError, "q_stride", id="q_stride_zero"),
    pytest.param(9, 65, ValueError, "q_stride: expected an int in \\[1, 64\\], got 65", id="q_stride_past_queries"),
    pytest.param(3, torch.arange(6, device="meta"), ValueError, "block_pos: expected tensors on cpu",
                 id="block_pos_meta"),
    pytest.param(11, "fastest", ValueError, "backend: expected one of", id="backend_name"),
]


@pytest.mark.parametrize("index, value, exc, match", BAD)
def test_bad_input_raises_before_any_kernel(index, value, exc, match):
    """The public function and the raw op (torch.ops.relaxkv.mid_select) raise the same error."""
    assert_raw_op_raises_like_public("mid_select", replace([*_args(gen(4)), False, "auto"], index, value), exc, match)
