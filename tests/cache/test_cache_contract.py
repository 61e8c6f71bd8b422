"""The KVCache contract is checked, or made unnecessary (no silent wrong answer).

- Outputs do not depend on the order in which layers are called within a pass (every policy, every mode):
  Relax selects once per chunk from stored prototypes, Pack per layer from that layer's queries.
- ``end_chunk`` raises, naming the layers, when a layer did not run every pass.
- Policy fields are type- and range-checked at construction; a policy whose geometry does not fit the grid
  raises at ``KVCache(...)``; ``engine=`` with the segments mode and a CUDA device without one raise.
- Pack selects per sample by default (a sample in a batch chooses as it does alone); ``batch_mean=True``
  is the paper's batch-averaged rule.
"""
import pytest
import torch

import relaxkv_kernels as rk

L, B, H, D, HH, WW = 3, 2, 2, 16, 4, 4
POLICIES = {
    "dense": rk.DenseWindow(window=9),
    "sink-rerotate": rk.DenseWindow(window=9, sink=3, rerotate=True),
    "relax": rk.RelaxMemory(reservoir=30),
    "pack": rk.PackMemory(top_k=2, archive=3, q_stride=2),
}


def _inputs(policy, chunks, passes, batch=B, seed=0):
    """q, k, v per (chunk, pass, layer): [B, U*F, H, D] fp32, fresh random."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, policy.chunk_frames * HH * WW, H, D)
    return [[[tuple(torch.randn(shape, generator=gen) for _ in range(3)) for _ in range(L)] for _ in range(passes)]
            for _ in range(chunks)]


def _rollout(policy, inputs, order: list[int], batch=B, **cache_kw):
    """Outputs indexed [chunk][pass][layer] when each pass calls the layers in ``order``, and the cache."""
    cache = rk.KVCache(policy, L, batch, H, D, HH, WW, dtype=torch.float32, **cache_kw)
    outs = []
    for chunk in inputs:
        cache.begin_chunk()
        per_pass = []
        for qkv in chunk:
            got = {layer: cache.attend(layer, *qkv[layer]) for layer in order}
            per_pass.append([got[layer] for layer in range(L)])
        outs.append(per_pass)
        cache.end_chunk()
    return outs, cache


@pytest.mark.parametrize("attention", ["segments", "window", "per_call"])
@pytest.mark.parametrize("name", list(POLICIES))
def test_layer_order_within_a_pass_does_not_change_the_outputs(name, attention):
    policy = POLICIES[name]
    inputs = _inputs(policy, chunks=9, passes=2)
    forward, _ = _rollout(policy, inputs, list(range(L)), backend="reference", attention=attention)
    backward, _ = _rollout(policy, inputs, list(reversed(range(L))), backend="reference", attention=attention)
    for c, (a, b) in enumerate(zip(forward, backward)):
        for p, (x, y) in enumerate(zip(a, b)):
            for layer in range(L):
                assert torch.equal(x[layer], y[layer]), f"chunk {c} pass {p} layer {layer}"


def test_end_chunk_names_the_layers_that_missed_a_pass():
    policy = POLICIES["relax"]
    (chunk,) = _inputs(policy, chunks=1, passes=2)
    cache = rk.KVCache(policy, L, B, H, D, HH, WW, dtype=torch.float32, backend="reference", attention="window")
    cache.begin_chunk()
    for layer in range(L):
        cache.attend(layer, *chunk[0][layer])
    for layer in (0, 2):  # layer 1 skips the refresh pass
        cache.attend(layer, *chunk[1][layer])
    with pytest.raises(RuntimeError, match=r"layers \[1\] attended \[1\] times in chunk 0, the others 2"):
        cache.end_chunk()
    cache.attend(1, *chunk[1][1])  # the chunk is still open: complete it
    cache.end_chunk()
    cache.begin_chunk()
    with pytest.raises(RuntimeError, match="no layer attended in chunk 1"):
        cache.end_chunk()
    cache.attend(0, *chunk[0][0])
    with pytest.raises(RuntimeError, match=r"layers \[1, 2\] attended \[0\] times"):
        cache.end_chunk()


@pytest.mark.parametrize("make,error,match", [
    (lambda: rk.DenseWindow(window=7.5), TypeError, "DenseWindow: window: expected an int, got 7.5"),
    (lambda: rk.DenseWindow(window="21"), TypeError, "DenseWindow: window: expected an int"),
    (lambda: rk.DenseWindow(window=4, sink=2), ValueError, "DenseWindow: window: expected an int in \\[5"),
    (lambda: rk.DenseWindow(rerotate=1), TypeError, "DenseWindow: rerotate: expected a bool"),
    (lambda: rk.RelaxMemory(lam="2"), TypeError, "RelaxMemory: lam: expected a number"),
    (lambda: rk.RelaxMemory(lam=float("inf")), ValueError, "RelaxMemory: lam: expected a finite number"),
    (lambda: rk.RelaxMemory(history=0), ValueError, "RelaxMemory: history"),
    (lambda: rk.RelaxMemory(trim=None), TypeError, "RelaxMemory: trim: expected a bool"),
    (lambda: rk.RelaxMemory(reservoir=5), ValueError, "RelaxMemory: reservoir"),
    (lambda: rk.PackMemory(q_stride=0), ValueError, "PackMemory: q_stride: expected an int in \\[1"),
    (lambda: rk.PackMemory(top_k=2.0), TypeError, "PackMemory: top_k: expected an int"),
    (lambda: rk.PackMemory(sink_frames=6), ValueError, "PackMemory: sink_frames: expected a multiple"),
    (lambda: rk.PackMemory(archive=4, top_k=8), ValueError, "PackMemory: archive"),
    (lambda: rk.PackMemory(block_frames=1, recent_frames=1, sink_frames=2), ValueError, "PackMemory: block_frames"),
    (lambda: rk.PackMemory(batch_mean="yes"), TypeError, "PackMemory: batch_mean: expected a bool"),
], ids=lambda x: None)
def test_policy_fields_are_checked_at_construction(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_cache_arguments_that_used_to_fail_late():
    with pytest.raises(ValueError, match="a 2x3 token grid is smaller than the 4x4 pooling window"):
        rk.KVCache(rk.PackMemory(), 1, 1, 2, 16, 2, 3)
    with pytest.raises(ValueError, match="engine: the segments attention mode .* has no engine"):
        rk.KVCache(rk.RelaxMemory(), 1, 1, 2, 16, 4, 4, attention="segments", engine="sdpa")
    with pytest.raises(ValueError, match="device: expected a torch device"):
        rk.KVCache(rk.RelaxMemory(), 1, 1, 2, 16, 4, 4, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device: 'cuda' asked for, but torch sees no CUDA device"):
            rk.KVCache(rk.RelaxMemory(), 1, 1, 2, 16, 4, 4, device="cuda")


class _OldSelection(rk.Planner):
    selection = "layer0"


def test_a_planner_with_an_unknown_selection_kind_is_refused():
    class Policy(rk.MemoryPolicy):
        chunk_frames = 1

        def planner(self, height, width):
            return _OldSelection(height * width, 2, 2 * height * width, 2, 2 * height * width)

    with pytest.raises(ValueError, match="_OldSelection.selection: expected one of"):
        rk.KVCache(Policy(), 1, 1, 2, 16, 4, 4)


def _pack_picks(cache, layer=0):
    """Mid blocks chosen at ``layer`` in the last chunk, per sample."""
    plan = cache.last_plan
    return [row[plan.index.seg_index: plan.index.seg_index + 2] for row in cache.selected_frames(layer)]


def test_pack_selects_per_sample_by_default_and_batch_mean_couples_the_batch():
    policy = POLICIES["pack"]
    inputs = _inputs(policy, chunks=8, passes=1, batch=2, seed=3)
    picks = {}
    for batch_mean in (False, True):
        p = rk.PackMemory(top_k=2, archive=3, q_stride=2, batch_mean=batch_mean)
        _, cache = _rollout(p, inputs, list(range(L)), batch=2, backend="reference")
        picks[batch_mean] = _pack_picks(cache)
        for sample in range(2):
            alone = [[[tuple(t[sample: sample + 1] for t in qkv) for qkv in pass_] for pass_ in chunk]
                     for chunk in inputs]
            _, single = _rollout(p, alone, list(range(L)), batch=1, backend="reference")
            if not batch_mean:
                assert _pack_picks(single)[0] == picks[False][sample]
                assert [_pack_picks(single, layer)[0] for layer in range(L)] == [
                    _pack_picks(cache, layer)[sample] for layer in range(L)]  # every layer's own choice
    per_sample, averaged = picks[False], picks[True]
    assert averaged[0] == averaged[1]  # one choice for the batch
    assert per_sample[0] != per_sample[1]  # these inputs make the samples choose differently


def test_inconsistent_plans_are_refused_at_begin_chunk(monkeypatch):
    cache = rk.KVCache(rk.DenseWindow(window=9), 1, 1, 2, 16, 4, 4, dtype=torch.float32)
    plan_of = cache.planner.plan

    def selects_without_device_rows(n):
        plan = plan_of(n)
        plan.selects, plan.selected_keys = True, 16
        return plan

    def more_keys_than_the_windows_hold(n):
        plan = plan_of(n)
        plan.segments[-1] = (0, 144, 0)  # a padding row made to attend the whole pool
        return plan

    monkeypatch.setattr(cache.planner, "plan", selects_without_device_rows)
    with pytest.raises(RuntimeError, match=r"DensePlanner.plan\(0\): expected selects=True with selected_keys > 0"):
        cache.begin_chunk()
    monkeypatch.setattr(cache.planner, "plan", more_keys_than_the_windows_hold)
    with pytest.raises(RuntimeError, match="expected at most max_keys = 144 keys, got 192"):
        cache.begin_chunk()


def _edited_plan(cache, n: int, edit):
    plan = type(cache.planner).plan(cache.planner, n)
    edit(plan)
    return plan


@pytest.mark.parametrize("edit, match", [
    (lambda p: (p.segments.pop(), p.frames_attended.pop()),
     r"expected segments and frames_attended of n_seg = 9 rows \(pad the table"),
    (lambda p: p.segments.__setitem__(8, (140, 16, 0)), r"segment 8 \(start 140, length 16\) is not inside the pool"),
    (lambda p: p.segments.__setitem__(8, (0, -16, 0)), r"segment 8 \(start 0, length -16\) is not inside the pool"),
    (lambda p: p.segments.__setitem__(8, (-16, 16, 0)), r"segment 8 \(start -16, length 16\) is not inside"),
    (lambda p: (p.frame_slot.__setitem__(0, 9), p.segments.__setitem__(p.n_memory_seg, (144, 16, 0))),
     r"frame slot 9 is not one of the n_slots = 9 slots"),
], ids=["unpadded", "past-the-pool", "negative-length", "negative-start", "slot-out-of-range"])
def test_a_custom_planners_bad_table_is_named_at_begin_chunk(monkeypatch, edit, match):
    """Host-side, before anything is uploaded or launched (it used to fail inside torch or a kernel, or read rows
    past the pool)."""
    cache = rk.KVCache(rk.DenseWindow(window=9), 1, 1, 2, 16, 4, 4, dtype=torch.float32)
    monkeypatch.setattr(cache.planner, "plan", lambda n: _edited_plan(cache, n, edit))
    with pytest.raises(RuntimeError, match=r"KVCache.begin_chunk: DensePlanner.plan\(0\): " + match):
        cache.begin_chunk()


def test_a_chunk_frame_written_into_a_slot_its_memory_reads_is_named(monkeypatch):
    """A planner that reuses the slot of a frame it still attends (segments mode: 97% off, silently) is refused."""
    cache = rk.KVCache(rk.DenseWindow(window=9), 1, 1, 2, 16, 4, 4, dtype=torch.float32, attention="segments")
    x = torch.randn(1, 48, 2, 16)
    cache.begin_chunk()
    cache.attend(0, x, x, x)
    cache.end_chunk()  # chunk 1 reads frames 0-2 in slots 0-2

    def reuse_slot_0(plan):
        plan.frame_slot[0] = 0
        plan.segments[plan.n_memory_seg] = (0, 16, 0)

    monkeypatch.setattr(cache.planner, "plan", lambda n: _edited_plan(cache, n, reuse_slot_0))
    with pytest.raises(RuntimeError, match=r"the chunk writes a frame into slot 0 \(rows 0 to 15\), which memory "
                                           r"segment 0 \(rows 0 to 15\) still reads: evict that frame"):
        cache.begin_chunk()


def test_policy_and_planner_contract_errors():
    class NoPlanner(rk.MemoryPolicy):
        chunk_frames = 3

    with pytest.raises(NotImplementedError, match=r"NoPlanner: a MemoryPolicy must implement planner\(height, "):
        rk.KVCache(NoPlanner(), 1, 1, 2, 16, 4, 4)

    class SmallPool(rk.MemoryPolicy):
        chunk_frames = 3

        def planner(self, height, width):
            return type(rk.DenseWindow().planner(height, width))(rk.DenseWindow(window=9), height * width)

    class TinyPlanner(rk.Planner):
        def plan(self, n):
            raise AssertionError("never planned")

    class TooSmall(rk.MemoryPolicy):
        chunk_frames = 3

        def planner(self, height, width):
            return TinyPlanner(height * width, n_slots=4, n_rows=3 * height * width, n_seg=4, max_keys=100)

    with pytest.raises(ValueError, match=r"TinyPlanner: expected n_rows >= n_slots x F = 4 x 16 .* got n_rows = 48"):
        rk.KVCache(TooSmall(), 1, 1, 2, 16, 4, 4)
    with pytest.raises(RuntimeError, match=r"KVCache.selected_frames: no chunk planned yet: call begin_chunk\(\)"):
        rk.KVCache(rk.RelaxMemory(), 1, 1, 2, 16, 4, 4).selected_frames()
    with pytest.raises(ValueError, match=r"RelaxMemory: candidates: expected an int in \[3, None\], got 2"):
        rk.RelaxMemory(history=3, candidates=2)
