"""Memory policies' planners and planning rules, host side only (no tensors): slots, eviction, segment tables.

Relax Forcing's rules (candidates, roles, hybrid-RoPE target positions; memory/relax.py) against the design's
examples and a literal restatement; every planner's tables stay within its allocation and keep their
shape in steady state; Relax, Pack and the dense window at known chunks. The KV cache that runs the plans
is tested in test_cache.py.
"""
import pytest

import relaxkv_kernels as rk
from relaxkv_kernels.memory import relax_candidates
from relaxkv_kernels.memory import relax_roles
from relaxkv_kernels.memory import relax_target_positions

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


# ------------------------------------------------------------------------------------------------ planners


@pytest.mark.parametrize(
    "policy",
    [rk.DenseWindow(), rk.DenseWindow(sink=3), rk.DenseWindow(sink=3, rerotate=True), rk.RelaxMemory(),
     rk.RelaxMemory(history=2, contiguous_rope=True), rk.PackMemory()],
    ids=["dense", "sink", "sink-rerotate", "relax", "relax-h2-contiguous", "pack"],
)
def test_plans_are_bounded_and_steady(policy):
    """Slots stay within the allocation and every table keeps its shape once the memory is full."""
    planner = policy.planner(30, 52)
    shapes = []
    for n in range(400):
        plan = planner.plan(n)
        assert len(plan.segments) == planner.n_seg
        assert len(planner.slots.slot_of) <= planner.n_slots
        for start, length, _ in plan.segments:
            assert length == 0 or 0 <= start and start + length <= planner.n_rows
        index = plan.index
        shapes.append(None if index is None else tuple(len(x) for x in vars(index).values() if isinstance(x, list)))
    assert len(set(shapes[200:])) == 1


def test_relax_steady_state_plan():
    """R = 120: candidates 58, 44, 30, 16 frames before c; sink at c-4, c-3, history c-2, tail c-1."""
    planner = rk.RelaxMemory().planner(30, 52)
    n = 100
    for i in range(n + 1):
        plan = planner.plan(i)
    c = plan.start_frame
    assert [c - fr for fr in plan.index.candidates] == [58, 44, 30, 16]
    assert plan.index.target_pos == [c - 2]
    sink, tail = plan.segments[0:2], plan.segments[3]
    assert [s[2] for s in sink] == [c - 4, c - 4]  # stored at 0 and 1, read at c-4 and c-3
    assert tail[2] == 0 and plan.frames_attended[3] == c - 1
    assert plan.frames_attended[4:] == [c, c + 1, c + 2]


def test_pack_active_context_is_27872_tokens():
    """Sink 8 frames + 16 x 182 mid tokens + recent 4 frames + current 4 frames, whatever the length."""
    planner = rk.PackMemory().planner(30, 52)
    assert planner.block_tokens == 182
    for n in range(300):
        plan = planner.plan(n)
        if n >= 19:  # 16 mid blocks exist from block 19 on
            k = len(plan.index.mid_target_pos)
            assert sum(s[1] for s in plan.segments) + k * planner.block_tokens == 27872


def test_pack_repacks_sink_and_mid_before_recent():
    planner = rk.PackMemory(top_k=2, archive=3).planner(4, 4)
    for n in range(8):
        plan = planner.plan(n)
    assert plan.start_frame == 28
    assert plan.index.mid_blocks == [3, 4, 5]  # first frames 12, 16, 20; recent block 6 (frames 24..27)
    assert plan.index.mid_target_pos == [16, 20]  # two selected blocks packed right before recent (24)
    assert [s[2] for s in plan.segments[:8]] == [8] * 8  # sink frames 0..7 now at 8..15
    assert plan.frames_attended[10:14] == [24, 25, 26, 27] and [s[2] for s in plan.segments[10:]] == [0] * 8


def test_dense_window_self_forcing_and_rerotated():
    sf = rk.DenseWindow(window=9, sink=3).planner(2, 2)
    rr = rk.DenseWindow(window=9, sink=3, rerotate=True).planner(2, 2)
    for n in range(5):
        a, b = sf.plan(n), rr.plan(n)
    assert a.frames_attended == [0, 1, 2, 9, 10, 11, 12, 13, 14]
    assert [s[2] for s in a.segments] == [0] * 9
    assert [s[2] for s in b.segments] == [6, 6, 6, 0, 0, 0, 0, 0, 0]  # sink right before the window
    assert a.evicted == [6, 7, 8]


@pytest.mark.parametrize("policy, prefix", [
    (rk.DenseWindow(window=9), True),  # true positions, the pool holds exactly the window: read it in place
    (rk.DenseWindow(window=9, sink=3, rerotate=True), False),  # deltas: must be gathered
    (rk.RelaxMemory(), False),  # a device-side selection
    (rk.PackMemory(top_k=2, archive=3), False),
], ids=["dense", "sink-rerotate", "relax", "pack"])
def test_chunk_plan_key_counts(policy, prefix):
    """memory_keys + the chunk's own rows = total_keys (selected keys included); pool_prefix only where the
    chunk's keys are exactly the pool's first rows at delta 0."""
    planner = policy.planner(4, 4)
    for n in range(12):
        plan = planner.plan(n)
    own = len(plan.frame_slot) * planner.frame_tokens
    static = sum(length for _, length, _ in plan.segments)
    assert plan.total_keys() == static + plan.selected_keys <= planner.max_keys
    assert plan.memory_keys() == plan.total_keys() - own
    assert plan.selects == (plan.selected_keys > 0)
    assert plan.pool_prefix() == (plan.total_keys() if prefix else None)
