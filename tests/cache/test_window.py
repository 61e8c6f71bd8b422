"""KVCache attention modes: the per-chunk window and the per-call window against the segment-table reference.

Whole tiny rollouts of every policy (CPU: reference ops, Triton under the interpreter, csrc kernels
emulated) give the same outputs, selections and pools in every mode; the window costs memory only where
keys must be gathered; a window chunk step compiles. On a GPU: a chunk step of every policy replays
bitwise equal to eager from a CUDA graph, and bf16 windows at Wan shapes meet the 2x rule.
"""
import pytest
import torch

import relaxkv_kernels as rk

from helpers import assert_graph_replays_chunk_steps
from helpers import cache_rollout
from helpers import held_rows

L, B, H, D, HH, WW = 2, 2, 2, 16, 4, 4  # frames of 16 tokens: the smallest grid Pack can pool (2x4x4)
POLICIES = {
    "dense": rk.DenseWindow(window=9),
    "sink": rk.DenseWindow(window=9, sink=3),
    "sink-rerotate": rk.DenseWindow(window=9, sink=3, rerotate=True),
    "relax": rk.RelaxMemory(reservoir=30),
    "relax-batch0": rk.RelaxMemory(reservoir=30, batch0_decides=True),
    "relax-h2-contiguous": rk.RelaxMemory(reservoir=30, history=2, contiguous_rope=True),
    "pack": rk.PackMemory(top_k=2, archive=3, q_stride=2),
}


def _assert_same_rollout(got, want, tol):
    (out, cache), (ref, ref_cache) = got, want
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    assert torch.equal(cache.plan_buffers.seg, ref_cache.plan_buffers.seg)  # same selections
    rows = held_rows(ref_cache).to(ref_cache.storage.k.device)
    # end_chunk committed the chunk rows
    for a, b in ((cache.storage.k, ref_cache.storage.k), (cache.storage.v, ref_cache.storage.v)):
        torch.testing.assert_close(a[:, :, rows].float(), b[:, :, rows].float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("attention", ["window", "per_call"])
@pytest.mark.parametrize("name", list(POLICIES))
def test_window_modes_match_the_segment_reference(name, attention):
    """fp32, reference ops: only the key order of the softmax differs (chunk rows first in the window)."""
    policy = POLICIES[name]
    want = cache_rollout(policy, backend="reference", attention="segments")
    got = cache_rollout(policy, backend="reference", attention=attention)
    _assert_same_rollout(got, want, 1e-5)


@pytest.mark.interpreter
@pytest.mark.parametrize("name", ["sink-rerotate", "relax-batch0", "pack"])
def test_window_with_triton_kernels_matches_the_reference(name):
    """backend="fused" on CPU: rope_append, selections and compression in Triton (interpreter), engine sdpa."""
    pytest.importorskip("triton")
    policy = POLICIES[name]
    want = cache_rollout(policy, chunks=6, passes=1, backend="reference", attention="segments")
    got = cache_rollout(policy, chunks=6, passes=1, backend="fused", attention="window")
    assert got[1].engine == "auto" and got[1].chunk_engine == "sdpa"
    _assert_same_rollout(got, want, 1e-5)


@pytest.mark.parametrize("attention", ["window", "per_call"])
@pytest.mark.parametrize("name", ["relax-batch0", "pack"])
def test_window_with_cuda_kernels_matches_the_reference(name, attention, kernel_device, backend_env):
    """Every csrc kernel (rope_append, gather_kv_rope_into, relax_select / mid_select, compress_kv) in the window."""
    if kernel_device == "cuda":
        pytest.skip("the GPU variant runs in test_cuda_graph_replays_a_window_chunk_step")
    for op in ("ROPE_APPEND", "GATHER_KV_ROPE", "RELAX_SELECT", "MID_SELECT", "COMPRESS_KV"):
        backend_env(f"RELAXKV_BACKEND_{op}", "cuda")
    policy = POLICIES[name]
    want = cache_rollout(policy, chunks=6, passes=1, backend="reference", attention="segments")
    got = cache_rollout(policy, chunks=6, passes=1, backend="auto", attention=attention, engine="sdpa")
    _assert_same_rollout(got, want, 1e-5)


def test_fp16_window_within_fp16_rounding():
    """fp16 storage: the window and the segment reference round the same K/V; outputs agree to fp16 precision."""
    policy = POLICIES["pack"]
    want = cache_rollout(policy, dtype=torch.float16, backend="reference", attention="segments")
    got = cache_rollout(policy, dtype=torch.float16, backend="reference", attention="window")
    _assert_same_rollout(got, want, 2e-3)


def test_window_memory_is_counted_and_only_where_keys_are_gathered():
    """memory_bytes includes the windows: one per layer (window), one shared (per_call), none for a dense
    window without re-rotation (its chunks are pool prefixes: attention reads the pool)."""
    def size(policy, attention):
        return rk.KVCache(policy, L, B, H, D, HH, WW, dtype=torch.float32, device="meta",
                          attention=attention).memory_bytes()

    relax = POLICIES["relax"]
    context = B * relax.planner(HH, WW).max_keys * H * D * 4 * 2  # K and V of one window, fp32
    assert size(relax, "window") - size(relax, "segments") == L * context + B * relax.chunk_frames * D * 4
    assert size(relax, "per_call") - size(relax, "segments") == context
    for name in ("dense", "sink"):
        assert size(POLICIES[name], "window") == size(POLICIES[name], "segments")


def test_dense_chunks_attend_to_the_pool_prefix():
    """Slots freed by eviction are reused (a ring) and keys keep their positions: every chunk is a pool prefix."""
    planner = POLICIES["sink"].planner(HH, WW)
    for n in range(12):
        plan = planner.plan(n)
        assert plan.pool_prefix() == plan.total_keys() == min(3 * n + 3, 9) * HH * WW
    rerotated = POLICIES["sink-rerotate"].planner(HH, WW)
    assert [rerotated.plan(n).pool_prefix() for n in range(4)][-1] is None  # deltas: gathered into a window


@pytest.mark.parametrize("kv_dtype", [None, torch.float8_e4m3fn], ids=["fp32-pools", "fp8-pools"])
@pytest.mark.parametrize("name", ["relax", "pack"])
def test_compiled_window_chunk_step_matches_eager(name, kv_dtype):
    """torch.compile(fullgraph=True) of every layer's attend in window mode (staging, selection included), pools
    in the compute dtype or FP8 (the window commit's quantize_frames runs eagerly at end_chunk), over chunks whose
    key counts change until automatic dynamic shapes recompile the step (a view kept across graphs went stale
    there: Pack's outputs were wrong from chunk 6 on)."""
    policy = POLICIES[name]
    caches = [rk.KVCache(policy, L, B, H, D, HH, WW, dtype=torch.float32, backend="reference", attention="window",
                         kv_dtype=kv_dtype) for _ in range(2)]
    gen = torch.Generator().manual_seed(3)
    shape = (B, policy.chunk_frames * HH * WW, H, D)

    def step(cache, qkv):
        return [cache.attend(layer, *qkv[layer]) for layer in range(L)]

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    for _ in range(9):  # warm-up, then selections (Relax: chunk 2 on, Pack: 4 on) and eviction
        qkv = [tuple(torch.randn(shape, generator=gen) for _ in range(3)) for _ in range(L)]
        for cache in caches:
            cache.begin_chunk()
        for got, want in zip(compiled(caches[0], qkv), step(caches[1], qkv)):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        for cache in caches:
            cache.end_chunk()


def test_cache_mode_arguments_and_chunk_order_are_checked():
    with pytest.raises(ValueError, match="attention"):
        rk.KVCache(POLICIES["relax"], L, B, H, D, HH, WW, attention="paged")
    with pytest.raises(ValueError, match="engine"):
        rk.KVCache(POLICIES["relax"], L, B, H, D, HH, WW, engine="fastest")
    cache = rk.KVCache(POLICIES["relax"], L, B, H, D, HH, WW, dtype=torch.float32, attention="window",
                       engine="flash_attn")
    with pytest.raises(RuntimeError, match="flash_attn"):  # no flash-attn (and no GPU) here
        cache.begin_chunk()
    cache = rk.KVCache(POLICIES["relax"], L, B, H, D, HH, WW, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="end_chunk"):
        cache.end_chunk()
    cache.begin_chunk()
    with pytest.raises(RuntimeError, match="no layer attended"):
        cache.end_chunk()
    q = torch.randn(B, cache.policy.chunk_frames * HH * WW, H, D)
    for layer in range(L):
        cache.attend(layer, q, q, q)
    cache.end_chunk()
    with pytest.raises(RuntimeError, match="no chunk in progress"):
        cache.end_chunk()


def test_default_modes():
    cache = rk.KVCache(POLICIES["relax"], L, B, H, D, HH, WW, dtype=torch.float32)
    assert (cache.attention, cache.engine) == ("segments", "auto")  # off CUDA: the segment table
    cache = rk.KVCache(POLICIES["relax"], L, B, H, D, HH, WW, dtype=torch.float32, backend="reference",
                       attention="window")
    assert cache.engine == "reference"  # the reference backend attends with the reference engine


# ---------------------------------------------------------------------------------------------------- GPU

WAN = dict(num_heads=12, head_dim=128, height=30, width=52)


@pytest.mark.gpu
@pytest.mark.csrc
@pytest.mark.cuda_graph
@pytest.mark.parametrize("kv_dtype", [None, torch.float8_e4m3fn], ids=["bf16-pools", "fp8-pools"])
@pytest.mark.parametrize("attention", ["window", "per_call", "segments"])
@pytest.mark.parametrize("name", ["dense", "sink-rerotate", "relax", "pack"])
def test_cuda_graph_replays_a_window_chunk_step(name, attention, kv_dtype):
    """Every pass of a chunk (cache write, selection, staging, attention) captured once, replayed over
    later chunks: bitwise equal to eager with the same kernels (the staged windows included), with bf16 and
    with FP8 pools."""
    policy, layers, dev = POLICIES[name], 2, torch.device("cuda")
    make = lambda: rk.KVCache(policy, layers, B, H, 64, HH, WW, dtype=torch.bfloat16, device="cuda",  # noqa: E731
                              backend="fused", attention=attention, kv_dtype=kv_dtype)
    eager, graphed = make(), make()
    gen = torch.Generator(device=dev).manual_seed(1)
    shape = (B, policy.chunk_frames * HH * WW, H, 64)

    def inputs():
        return [tuple(torch.randn(shape, generator=gen, device=dev, dtype=torch.bfloat16) for _ in range(3))
                for _ in range(layers)]

    def step(cache, qkv):
        return [cache.attend(layer, *qkv[layer]) for _ in range(2) for layer in range(layers)]

    assert_graph_replays_chunk_steps(eager, graphed, step, inputs, warmup=8, chunks=3)


@pytest.mark.gpu
@pytest.mark.csrc
@pytest.mark.parametrize("attention", ["window", "per_call"])
@pytest.mark.parametrize("name", ["sink-rerotate", "relax-batch0", "pack"])
def test_window_modes_on_the_gpu_match_the_reference(name, attention):
    """bf16, B = 2 (window slices strided in the batch dim), the default engine (cuDNN first on sm_90a, the
    measured target; torch's dispatch on other GPUs) and the csrc / Triton kernels against the reference ops over
    the segment table: outputs within bf16 rounding, same selections, same pools."""
    policy = POLICIES[name]
    want = cache_rollout(policy, dtype=torch.bfloat16, device="cuda", head_dim=64, backend="reference",
                    attention="segments")
    got = cache_rollout(policy, dtype=torch.bfloat16, device="cuda", head_dim=64, backend="fused", attention=attention)
    _assert_same_rollout(got, want, 3e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["relax", "pack"])
def test_bf16_window_at_wan_shapes_meets_the_2x_rule(name):
    """One layer at Wan shapes in bf16: the window path's error against an fp32 segment reference is at most
    2x that of the same keys through torch's bf16 SDPA (gathered by the reference)."""
    policy = {"relax": rk.RelaxMemory(reservoir=30), "pack": rk.PackMemory(top_k=4, archive=8)}[name]
    gen = torch.Generator(device="cuda").manual_seed(4)
    caches = {mode: rk.KVCache(policy, 1, 1, dtype=torch.bfloat16, device="cuda", backend=be, attention=mode, **WAN)
              for mode, be in (("window", "fused"), ("segments", "reference"))}
    shape = (1, policy.chunk_frames * 1560, 12, 128)
    for _ in range(8):
        q, k, v = (torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        outs = {}
        for mode, cache in caches.items():
            cache.begin_chunk()
            outs[mode] = cache.attend(0, q, k, v)
            cache.end_chunk()
    ref_cache = caches["segments"]
    plan_buffers = ref_cache.plan_buffers
    q_rot = rk.rope_append(q, k, v, ref_cache.storage.k[0].clone(), ref_cache.storage.v[0].clone(), None,
                           plan_buffers.frame_slot, plan_buffers.frame_pos, 30, 52, backend="reference")
    seg = plan_buffers.seg[0]
    total = ref_cache.last_plan.total_keys()
    want = rk.sparse_kv_attention(q_rot.float(), ref_cache.storage.k[0].float(), ref_cache.storage.v[0].float(), seg,
                                  backend="reference", impl="fused")
    kg, vg = rk.gather_kv_rope(ref_cache.storage.k[0], ref_cache.storage.v[0], seg, total, backend="reference")
    same_dtype = rk.dense_attention(q_rot, kg, vg, engine="sdpa").float()
    err = (outs["window"].float() - want).abs().max().item()
    base = (same_dtype - want).abs().max().item()
    assert err <= 2 * base + 1e-3, f"window error {err:.3e} vs torch bf16 error {base:.3e}"
