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
    return [row[plan.job.seg_index: plan.job.seg_index + 2] for row in cache.selected_frames(layer)]


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
        plan.segments[-1] = (0, 1000, 0)  # a padding row made to attend 1000 rows
        return plan

    monkeypatch.setattr(cache.planner, "plan", selects_without_device_rows)
    with pytest.raises(RuntimeError, match=r"DensePlanner.plan\(0\): expected selects=True with selected_keys > 0"):
        cache.begin_chunk()
    monkeypatch.setattr(cache.planner, "plan", more_keys_than_the_windows_hold)
    with pytest.raises(RuntimeError, match="expected at most max_keys = 144 keys, got 1048"):
        cache.begin_chunk()
