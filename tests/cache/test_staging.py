"""The window mode's staging ahead of a layer's first call (``KVCache(staging="next_layer" | "all_layers")``).

- Every policy (dense, sink with re-rotation, Relax, Pack, a user's policy selecting per chunk and one selecting per
  layer), pools in the compute dtype and FP8, on the device and in host memory: outputs bitwise equal to
  ``staging="first_call"`` over 9 chunks, the pools' held rows too; Relax and Pack through the Triton kernels
  (interpreter) alike.
- What each staging gathers at which layer's first call (4 layers): a whole memory, or for a per-layer selection
  the static parts ahead and the selected run at the first call; a re-planned chunk stages again; device rows that
  are not one run leave the whole memory to the first call.
- torch.compile (aot_eager) of a chunk step with the staging ahead equals eager (the staging runs eagerly).
- Named errors before anything is allocated: a mode with no once-per-chunk staging, a planner whose chunks are all
  pool prefixes on device pools, an unknown name.
- GPU (skipped without one): host pools staged on the side stream equal first_call, eager and in a captured
  chunk step's replays, at sizes where a missing wait would read a window the staging has not written yet.
"""
import dataclasses

import pytest
import torch
from test_custom_policy import SinkNearest

import relaxkv_kernels as rk
from relaxkv_kernels.cache import cache as cache_module
from relaxkv_kernels.cache import modes

from helpers import FP8
from helpers import assert_layer_steps_replay_eager
from helpers import held_rows
from helpers import run_side_by_side

POLICIES = {
    "dense": lambda: rk.DenseWindow(window=9),
    "sink-rerotate": lambda: rk.DenseWindow(window=9, sink=3, rerotate=True),
    "relax": lambda: rk.RelaxMemory(reservoir=30),
    "pack": lambda: rk.PackMemory(top_k=2, archive=3, q_stride=2),
    "custom": lambda: SinkNearest(),
    "custom-by-query": lambda: SinkNearest(by_query=True),
}
L, B, H, D, HH, WW = 4, 2, 2, 16, 4, 4
AHEAD = ("next_layer", "all_layers")


def _caches(name, stagings, **kw):
    return [rk.KVCache(POLICIES[name](), L, B, H, D, HH, WW, attention="window", staging=s, **kw) for s in stagings]


def _assert_same_pools(caches) -> None:
    rows = held_rows(caches[0])
    for cache in caches[1:]:
        for name in ("k", "v", "k_scale", "v_scale"):
            a, b = getattr(caches[0].storage, name), getattr(cache.storage, name)
            if a is not None:
                assert torch.equal(a[:, :, rows].view(torch.uint8), b[:, :, rows].view(torch.uint8)), name


CASES = [(name, kv, where) for name in POLICIES for kv in (None, FP8) for where in (None, "cpu")
         if (name, kv, where) != ("dense", None, None)]  # there every chunk is a pool prefix: a named error below


@pytest.mark.parametrize("name, kv_dtype, pool_device", CASES, ids=[
    f"{name}-{'fp8' if kv else 'same'}-{'host' if where else 'device'}-pools" for name, kv, where in CASES])
def test_staging_ahead_gives_the_outputs_of_the_first_call_staging(name, kv_dtype, pool_device):
    caches = _caches(name, ("first_call", *AHEAD), dtype=torch.float32, backend="reference", kv_dtype=kv_dtype,
                     pool_device=pool_device)
    run_side_by_side(caches, seed=7)
    _assert_same_pools(caches)
    assert all(c.active_mode.name == "window" and c.active_mode.stages for c in caches)
    assert caches[0].last_plan.selects == (name not in ("dense", "sink-rerotate"))  # past the first selections


@pytest.mark.interpreter
@pytest.mark.parametrize("name, kv_dtype", [("relax", FP8), ("pack", None)], ids=["relax-fp8", "pack"])
def test_staging_ahead_with_the_triton_kernels(name, kv_dtype):
    """fp16 (the interpreter's bf16 is broken), host pools, 2 layers (layer 1 staged ahead), one pass per chunk,
    6 chunks (past Relax's first selection, Pack's first two: its static parts ahead into window slices)."""
    caches = [rk.KVCache(POLICIES[name](), 2, B, H, D, HH, WW, dtype=torch.float16, backend="fused",
                         attention="window", kv_dtype=kv_dtype, pool_device="cpu", staging=staging)
              for staging in ("first_call", "all_layers")]
    run_side_by_side(caches, chunks=6, passes=1, dtype=torch.float16, seed=7)
    _assert_same_pools(caches)
    assert caches[0].last_plan.selects


def _gathers_per_first_call(monkeypatch, name: str, staging: str, chunks: int):
    """Per chunk of a host-pool cache of ``name``: its memory rows, and per call of its 2 passes the (layer, rows) of
    every gather it ran (a chunk planned again before its end: the last chunk, twice)."""
    calls = []
    gather = modes.GatherMode.gather
    monkeypatch.setattr(modes.GatherMode, "gather", lambda self, layer, seg, k, *a: (
        calls[-1].append((layer, k.shape[1])), gather(self, layer, seg, k, *a)))
    cache = _caches(name, [staging], dtype=torch.float32, backend="reference", pool_device="cpu")[0]
    x = torch.randn(B, cache.policy.chunk_frames * HH * WW, H, D)
    out = []
    for chunk in range(chunks):
        for _ in range(1 + (chunk == chunks - 1)):
            cache.begin_chunk()
            calls.clear()
            for _ in range(2):
                for layer in range(L):
                    calls.append([])
                    cache.attend(layer, x, x, x)
            out.append((cache.active_mode.total - cache.active_mode.u_rows, list(calls)))
        cache.end_chunk()
    return cache, out


@pytest.mark.parametrize("staging, expected", [
    ("first_call", [[0], [1], [2], [3]]),
    ("next_layer", [[0, 1], [2], [3], []]),
    ("all_layers", [[0, 1, 2, 3], [], [], []]),
])
def test_what_each_staging_gathers_at_each_first_call(monkeypatch, staging, expected):
    """Relax (one table, complete at begin_chunk): each layer's whole memory in one gather, once per chunk and layer
    (later passes stage nothing), again for a chunk planned again; chunk 0 has no memory to stage."""
    _, chunks = _gathers_per_first_call(monkeypatch, "relax", staging, 4)
    assert chunks[0] == (0, [[]] * (2 * L))
    for memory, calls in chunks[1:]:
        assert [[layer for layer, _ in call] for call in calls] == expected + [[]] * L
        assert all(rows == memory for call in calls for _, rows in call)


@pytest.mark.parametrize("staging", AHEAD)
def test_a_per_layer_selection_stages_its_static_parts_ahead_and_its_selection_at_the_first_call(monkeypatch,
                                                                                                 staging):
    """Pack at a chunk with 2 selected mid blocks: ahead, its sink and recent frames (two gathers per layer, around
    the run of mid rows, ``selected_keys``); at each layer's first call, after its selection, the mid blocks (layer 0:
    its whole memory, nothing staged it ahead)."""
    cache, chunks = _gathers_per_first_call(monkeypatch, "pack", staging, 7)
    plan = cache.last_plan
    assert plan.selects and plan.selected_keys == 2 * cache.planner.block_tokens
    memory, mid = chunks[-1][0], plan.selected_keys
    sink = plan.index.seg_index * cache.frame_tokens  # the sink frames' rows, before the mid blocks
    ahead = lambda i: [(i, sink), (i, memory - sink - mid)]  # noqa: E731
    want = {"next_layer": [[(0, memory), *ahead(1)], [(1, mid), *ahead(2)], [(2, mid), *ahead(3)], [(3, mid)]],
            "all_layers": [[(0, memory), *ahead(1), *ahead(2), *ahead(3)], [(1, mid)], [(2, mid)], [(3, mid)]]}
    for _, calls in chunks[-2:]:
        assert calls == want[staging] + [[]] * L


def test_device_rows_that_are_not_one_run_leave_the_whole_memory_to_the_first_call():
    cache = _caches("pack", ["all_layers"], dtype=torch.float32, backend="reference", pool_device="cpu")[0]
    x = torch.randn(B, cache.policy.chunk_frames * HH * WW, H, D)
    for _ in range(6):
        plan = cache.begin_chunk()
        for layer in range(L):
            cache.attend(layer, x, x, x)
        cache.end_chunk()
    mode = cache.active_mode
    attended = list(plan.frames_attended)
    i = attended.index(-1)
    attended[i], attended[i - 1] = attended[i - 1], attended[i]  # a static segment inside the run
    everything = (slice(0, plan.n_memory_seg), slice(0, mode.total - mode.u_rows))
    assert mode.ahead_parts(dataclasses.replace(plan, frames_attended=attended)) == ([], everything)
    assert mode.ahead_parts(plan)[1] == (slice(i, i + 2), slice(i * cache.frame_tokens, mode.total - mode.u_rows
                                                                  - cache.frame_tokens * (plan.n_memory_seg - i - 2)))


def test_a_compiled_chunk_step_with_the_staging_ahead_equals_eager():
    """aot_eager (the same ops): bitwise; the staging ahead runs eagerly between the graphs."""
    caches = _caches("relax", ("all_layers", "next_layer"), dtype=torch.float32, backend="reference",
                     pool_device="cpu")

    def step(cache, qkv):
        return [cache.attend(layer, *qkv[layer]) for layer in range(L)]

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager")
    reference = _caches("relax", ["first_call"], dtype=torch.float32, backend="reference", pool_device="cpu")[0]
    gen = torch.Generator().manual_seed(9)
    shape = (B, reference.policy.chunk_frames * HH * WW, H, D)
    with torch._dynamo.config.patch(recompile_limit=64):
        for chunk in range(7):
            for cache in (*caches, reference):
                cache.begin_chunk()
            for _ in range(2):
                qkv = [tuple(torch.randn(shape, generator=gen) for _ in range(3)) for _ in range(L)]
                want = step(reference, qkv)
                for cache in caches:
                    for got, w in zip(compiled(cache, qkv), want):
                        assert torch.equal(got, w), chunk
            for cache in (*caches, reference):
                cache.end_chunk()


@pytest.mark.parametrize("kw, match", [
    (dict(attention="per_call"), "the per_call attention mode has no once-per-chunk staging"),
    (dict(attention="segments"), "the segments attention mode has no once-per-chunk staging"),
    (dict(attention="window", policy=rk.DenseWindow(window=9)), "DensePlanner never gathers: with pools on the device"),
])
def test_a_staging_ahead_where_nothing_can_be_staged_ahead_is_a_named_error(monkeypatch, kw, match):
    """Raised before anything is allocated (the pools would be the first)."""
    monkeypatch.setattr(cache_module, "KVStorage", None)
    kw = dict(kw)
    policy = kw.pop("policy", rk.RelaxMemory())
    with pytest.raises(ValueError, match=f"KVCache: staging='next_layer': {match}.*use staging='first_call'"):
        rk.KVCache(policy, L, B, H, D, HH, WW, staging="next_layer", **kw)
    with pytest.raises(ValueError, match=r"KVCache: staging: expected one of \('first_call', 'next_layer', "):
        rk.KVCache(policy, L, B, H, D, HH, WW, staging="early", **kw)


GPU_POLICIES = {"relax": lambda: rk.RelaxMemory(reservoir=30),
                "pack": lambda: rk.PackMemory(top_k=2, archive=3, q_stride=2)}


@pytest.mark.gpu
@pytest.mark.parametrize("staging", AHEAD)
@pytest.mark.parametrize("name, kv_dtype", [("relax", None), ("relax", FP8), ("pack", FP8)],
                         ids=["relax-bf16", "relax-fp8", "pack-fp8"])
def test_host_pools_staged_on_the_side_stream_equal_the_first_call_staging(name, kv_dtype, staging):
    """Pinned host pools, 6 layers of 64-token frames (a staging long enough that a missing wait reads a window row
    of the previous chunk): every call bitwise equal to device pools staged at the first call; Pack's selected
    blocks staged at the first call after its static parts were staged ahead."""
    pytest.importorskip("triton")
    layers, b, h, d, hh, ww = 6, 1, 4, 64, 8, 8
    caches = [rk.KVCache(GPU_POLICIES[name](), layers, b, h, d, hh, ww, dtype=torch.bfloat16,
                         device="cuda", backend="fused", attention="window", kv_dtype=kv_dtype, pool_device=where,
                         staging=s) for where, s in ((None, "first_call"), ("cpu", staging))]
    run_side_by_side(caches, dtype=torch.bfloat16, seed=13)
    assert caches[1].attention_mode.side is not None and caches[0].last_plan.selects


@pytest.mark.gpu
@pytest.mark.cuda_graph
@pytest.mark.parametrize("staging", AHEAD)
@pytest.mark.parametrize("name", list(GPU_POLICIES))
def test_a_captured_chunk_step_with_the_staging_ahead_replays_eager(name, staging):
    """The fork to the side stream and its join are captured with the chunk step: replays over 4 chunks bitwise
    equal to eager first_call steps with device pools."""
    pytest.importorskip("triton")
    layers, b, h, d, hh, ww = 4, 1, 2, 64, 4, 4
    eager, graphed = (rk.KVCache(GPU_POLICIES[name](), layers, b, h, d, hh, ww, dtype=torch.bfloat16,
                                 device="cuda", backend="fused", attention="window", pool_device=where, staging=s)
                      for where, s in ((None, "first_call"), ("cpu", staging)))
    assert_layer_steps_replay_eager(eager, graphed, seed=14, warmup=6, chunks=4)
