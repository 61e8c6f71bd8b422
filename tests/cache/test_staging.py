"""The window mode's staging ahead of a layer's first call (``KVCache(staging="next_layer" | "all_layers")``).

- Every policy that selects per chunk or never (dense, sink with re-rotation, Relax, a user's chunk-level policy),
  pools in the compute dtype and FP8, on the device and in host memory, the reference backend and the Triton kernels
  (interpreter): outputs bitwise equal to ``staging="first_call"`` over 9 chunks, the pools' held rows too.
- What each staging enqueues at which layer's first call (4 layers), and that a re-planned chunk stages again.
- torch.compile (aot_eager) of a chunk step with the staging ahead equals eager (the staging runs eagerly).
- Named errors before anything is allocated: a mode with no once-per-chunk staging, a per-layer selection, a planner
  whose chunks are all pool prefixes on device pools, an unknown name.
- GPU (skipped without one): host pools staged on the side stream equal first_call, eager and in a captured
  chunk step's replays, at sizes where a missing wait would read a window the staging has not written yet.
"""
import pytest
import torch
from test_custom_policy import SinkNearest

import relaxkv_kernels as rk
from relaxkv_kernels.cache import cache as cache_module
from relaxkv_kernels.cache import modes

from helpers import FP8
from helpers import assert_graph_replays_chunk_steps
from helpers import held_rows

POLICIES = {
    "dense": lambda: rk.DenseWindow(window=9),
    "sink-rerotate": lambda: rk.DenseWindow(window=9, sink=3, rerotate=True),
    "relax": lambda: rk.RelaxMemory(reservoir=30),
    "custom": lambda: SinkNearest(),
}
L, B, H, D, HH, WW = 4, 2, 2, 16, 4, 4
AHEAD = ("next_layer", "all_layers")


def _caches(name, stagings, **kw):
    return [rk.KVCache(POLICIES[name](), L, B, H, D, HH, WW, attention="window", staging=s, **kw) for s in stagings]


def _run_side_by_side(caches, chunks: int = 9, passes: int = 2, dtype=torch.float32, device="cpu") -> None:
    """The caches fed the same inputs; every call's output bitwise equal to the first cache's."""
    gen = torch.Generator(device=device).manual_seed(7)
    shape = (B, caches[0].policy.chunk_frames * HH * WW, H, D)
    for chunk in range(chunks):
        for cache in caches:
            cache.begin_chunk()
        for _ in range(passes):
            for layer in range(L):
                q, k, v = (torch.randn(shape, generator=gen, device=device).to(dtype) for _ in range(3))
                want, *got = (cache.attend(layer, q, k, v) for cache in caches)
                for cache, out in zip(caches[1:], got):
                    assert torch.equal(out, want), (cache.attention_mode.ahead, chunk, layer)
        for cache in caches:
            cache.end_chunk()


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
    _run_side_by_side(caches)
    _assert_same_pools(caches)
    assert all(c.active_mode.name == "window" and c.active_mode.stages for c in caches)
    assert caches[0].last_plan.selects == (name in ("relax", "custom"))  # past the first selections


@pytest.mark.interpreter
@pytest.mark.parametrize("staging", AHEAD)
def test_staging_ahead_with_the_triton_kernels(staging):
    """fp16 (the interpreter's bf16 is broken), host FP8 pools of Relax, one pass per chunk, 6 chunks."""
    caches = _caches("relax", ("first_call", staging), dtype=torch.float16, backend="fused", kv_dtype=FP8,
                     pool_device="cpu")
    _run_side_by_side(caches, chunks=6, passes=1, dtype=torch.float16)
    _assert_same_pools(caches)


@pytest.mark.parametrize("staging, expected", [
    ("first_call", [[0], [1], [2], [3]]),
    ("next_layer", [[0, 1], [2], [3], []]),
    ("all_layers", [[0, 1, 2, 3], [], [], []]),
])
def test_what_each_staging_enqueues_at_each_first_call(monkeypatch, staging, expected):
    """The layers whose staging each layer's first call enqueues, every chunk with memory, once per chunk and layer
    (later passes stage nothing), and again for a chunk planned again before its end (a capture after a warm-up)."""
    staged = []  # per call: the layers whose staging it enqueued
    gather = modes.GatherMode.gather
    monkeypatch.setattr(modes.GatherMode, "gather", lambda self, layer, *a: (staged[-1].append(layer),
                                                                             gather(self, layer, *a)))
    cache = _caches("relax", [staging], dtype=torch.float32, backend="reference", pool_device="cpu")[0]
    x = torch.randn(B, cache.policy.chunk_frames * HH * WW, H, D)
    for chunk in range(4):
        for replan in range(1 + (chunk == 3)):
            cache.begin_chunk()
            staged.clear()
            for _ in range(2):
                for layer in range(L):
                    staged.append([])
                    cache.attend(layer, x, x, x)
            want = expected + [[]] * L if chunk else [[]] * (2 * L)  # chunk 0 has no memory to stage
            assert staged == want, (chunk, replan)
        cache.end_chunk()


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
    (dict(attention="window", policy=rk.PackMemory(top_k=1, archive=3, q_stride=2)),
     "PackPlanner selects per layer at the layer's first call"),
    (dict(attention="window", policy=SinkNearest(by_query=True)), "SinkNearestQueryPlanner selects per layer"),
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


@pytest.mark.gpu
@pytest.mark.parametrize("staging", AHEAD)
@pytest.mark.parametrize("kv_dtype", [None, FP8], ids=["bf16", "fp8"])
def test_host_pools_staged_on_the_side_stream_equal_the_first_call_staging(staging, kv_dtype):
    """Pinned host pools, 6 layers of 8 frames of 64 tokens (a staging long enough that a missing wait reads a
    window row of the previous chunk): every call bitwise equal to device pools staged at the first call."""
    pytest.importorskip("triton")
    layers, b, h, d, hh, ww = 6, 1, 4, 64, 8, 8
    caches = [rk.KVCache(rk.RelaxMemory(reservoir=30), layers, b, h, d, hh, ww, dtype=torch.bfloat16,
                         device="cuda", backend="fused", attention="window", kv_dtype=kv_dtype, pool_device=where,
                         staging=s) for where, s in ((None, "first_call"), ("cpu", staging))]
    gen = torch.Generator(device="cuda").manual_seed(13)
    shape = (b, caches[0].policy.chunk_frames * hh * ww, h, d)
    for chunk in range(9):
        for cache in caches:
            cache.begin_chunk()
        for _ in range(2):
            for layer in range(layers):
                qkv = [torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
                want, got = (cache.attend(layer, *qkv) for cache in caches)
                assert torch.equal(got, want), (chunk, layer)
        for cache in caches:
            cache.end_chunk()
    assert caches[1].attention_mode.side is not None and caches[0].last_plan.selects


@pytest.mark.gpu
@pytest.mark.cuda_graph
@pytest.mark.parametrize("staging", AHEAD)
def test_a_captured_chunk_step_with_the_staging_ahead_replays_eager(staging):
    """The fork to the side stream and its join are captured with the chunk step: replays over 4 chunks bitwise
    equal to eager first_call steps with device pools."""
    pytest.importorskip("triton")
    layers, b, h, d, hh, ww = 4, 1, 2, 64, 4, 4
    eager, graphed = (rk.KVCache(rk.RelaxMemory(reservoir=30), layers, b, h, d, hh, ww, dtype=torch.bfloat16,
                                 device="cuda", backend="fused", attention="window", pool_device=where, staging=s)
                      for where, s in ((None, "first_call"), ("cpu", staging)))
    gen = torch.Generator(device="cuda").manual_seed(14)
    shape = (b, eager.policy.chunk_frames * hh * ww, h, d)

    def inputs():
        return [tuple(torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(3))
                for _ in range(layers)]

    def step(cache, qkv):
        return [cache.attend(layer, *qkv[layer]) for layer in range(layers)]

    assert_graph_replays_chunk_steps(eager, graphed, step, inputs, warmup=6, chunks=4)
