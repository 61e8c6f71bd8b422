"""GPU tier: bf16 Triton attention at Wan2.1 shapes, and Relax chunk steps (30 layers, and one with the csrc/
kernels) under CUDA graphs and torch.compile. Skipped without a CUDA device (see conftest)."""
import pytest
import torch

import relaxkv_kernels as rk
from relaxkv_kernels.ops.gather_kv_rope.reference import gather_segments_ref

from helpers import assert_graph_replays_chunk_steps
from helpers import assert_layer_steps_replay_eager
from helpers import run_side_by_side

pytestmark = pytest.mark.gpu
WAN = dict(num_heads=12, head_dim=128, height=30, width=52)  # F = 1560 tokens per latent frame
F = 1560


def _wan_attention_case(gen, kind):
    """Rotated bf16 queries of one chunk and a pool; tables of the relax (7 frames) or pack-like layout.

    ``gen`` is a CUDA generator (the tensors); the segment order comes from a CPU one (torch.randperm refuses
    a CUDA generator)."""
    dev, h, d = "cuda", WAN["num_heads"], WAN["head_dim"]
    if kind == "relax":  # sink 2, history 1, tail 1, current 3 frames; hybrid deltas
        lengths, deltas, n_q = [F] * 7, [296, 296, 240, 0, 0, 0, 0], 3 * F
    else:  # pack: 8 sink frames, 16 compressed blocks of 182 tokens, 4 recent + 4 current frames
        lengths, deltas, n_q = [F] * 8 + [182] * 16 + [F] * 8, [40] * 8 + list(range(-30, 34, 4)) + [0] * 8, 4 * F
    starts = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(gen.initial_seed())).tolist()
    seg = []
    for i, (length, delta) in enumerate(zip(lengths, deltas)):
        seg.append([starts[i] * F, length, delta])
    seg = torch.tensor([seg], dtype=torch.int32, device=dev)
    n_rows = len(lengths) * F
    q = torch.randn(1, n_q, h, d, generator=gen, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, n_rows, h, d, generator=gen, device=dev, dtype=torch.bfloat16)
    v = torch.randn(1, n_rows, h, d, generator=gen, device=dev, dtype=torch.bfloat16)
    return q, k, v, seg


@pytest.mark.parametrize("kind", ["relax", "pack"])
def test_triton_attention_bf16_at_wan_shapes(kind):
    """Error vs the fp32 reference at most ~2x that of torch's own bf16 SDPA on the gathered keys."""
    pytest.importorskip("triton")
    q, k, v, seg = _wan_attention_case(torch.Generator(device="cuda").manual_seed(0), kind)
    got = rk.sparse_kv_attention(q, k, v, seg, backend="triton", impl="fused").float()
    want = rk.sparse_kv_attention(q.float(), k.float(), v.float(), seg, backend="reference", impl="fused")
    kg, vg = gather_segments_ref(k[0], v[0], seg[0].cpu())  # delta-rotated, rounded to bf16 like the pool
    same_dtype = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), kg[None].transpose(1, 2), vg[None].transpose(1, 2)).transpose(1, 2).float()
    err, base = (got - want).abs().max().item(), (same_dtype - want).abs().max().item()
    assert err <= 2 * base + 1e-3, f"kernel error {err:.3e} vs torch bf16 error {base:.3e}"


def _relax_inputs(layers, batch, u, gen):
    shape = (batch, u * F, WAN["num_heads"], WAN["head_dim"])
    return [tuple(torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            for _ in range(layers)]


@pytest.mark.csrc  # window attention: gather_kv_rope's CUDA kernel stages the memory
@pytest.mark.cuda_graph
def test_cuda_graph_of_a_30_layer_relax_chunk_step_replays_identically():
    """append, staging and attention for 30 layers captured once (the selection runs at begin_chunk), replayed
    over later chunks: equal to eager."""
    pytest.importorskip("triton")
    layers, batch, policy = 30, 1, rk.RelaxMemory(reservoir=30)
    make = lambda: rk.KVCache(policy, layers, batch, dtype=torch.bfloat16, device="cuda", backend="fused", **WAN)  # noqa: E731
    eager, graphed = make(), make()
    gen = torch.Generator(device="cuda").manual_seed(1)
    u = policy.chunk_frames

    def step(cache, qkv):
        return [cache.attend(layer, *qkv[layer]) for layer in range(layers)]

    assert_graph_replays_chunk_steps(eager, graphed, step, lambda: _relax_inputs(layers, batch, u, gen), warmup=5,
                                     chunks=4)  # past Relax's warm-up: from here on every table keeps its shape


@pytest.mark.csrc
def test_compiled_relax_chunk_step_matches_eager():
    """torch.compile(fullgraph=True) of every layer's attend at Wan shapes (4 layers: each warm-up chunk with new
    plan shapes recompiles), bitwise equal to eager."""
    pytest.importorskip("triton")
    layers, batch, policy = 4, 1, rk.RelaxMemory(reservoir=30)
    make = lambda: rk.KVCache(policy, layers, batch, dtype=torch.bfloat16, device="cuda", backend="fused", **WAN)  # noqa: E731
    eager, compiled = make(), make()
    gen = torch.Generator(device="cuda").manual_seed(2)

    def step(cache, qkv):
        return [cache.attend(layer, *qkv[layer]) for layer in range(layers)]

    torch._dynamo.reset()
    step_c = torch.compile(step, fullgraph=True)
    for _ in range(6):
        qkv = _relax_inputs(layers, batch, policy.chunk_frames, gen)
        eager.begin_chunk()
        compiled.begin_chunk()
        for got, want in zip(step_c(compiled, qkv), step(eager, qkv)):
            assert torch.equal(got, want)
        eager.end_chunk()
        compiled.end_chunk()


@pytest.mark.csrc
@pytest.mark.cuda_graph
def test_cuda_graph_replays_a_relax_chunk_step_with_the_cuda_kernels(backend_env):
    """A whole first pass of a Relax chunk (rope_append, staging, attention; relax_select at begin_chunk) with the
    csrc/ kernels in one graph: replays identical, equal to eager within bf16 rounding."""
    pytest.importorskip("triton")
    dev, layers, b, h, d, hh, ww = torch.device("cuda"), 2, 2, 2, 64, 4, 4
    policy = rk.RelaxMemory()
    u, f = policy.chunk_frames, hh * ww
    gen = torch.Generator(device=dev).manual_seed(25)
    caches = [rk.KVCache(policy, layers, b, h, d, hh, ww, dtype=torch.bfloat16, device=dev, backend="auto")
              for _ in range(2)]
    for op in ("RELAX_SELECT", "ROPE_APPEND"):  # the CUDA kernels (auto would pick Triton)
        backend_env(f"RELAXKV_BACKEND_{op}", "cuda")
    eager, graphed = caches

    def inputs():
        return [tuple(torch.randn(b, u * f, h, d, device=dev, generator=gen, dtype=torch.bfloat16) for _ in range(3))
                for _ in range(layers)]

    for _ in range(4):  # past the warm-up (selection from chunk 2 on); compiles every Triton kernel
        qkv = inputs()
        for cache in caches:
            cache.begin_chunk()
            for layer in range(layers):
                cache.attend(layer, *qkv[layer])
            cache.end_chunk()

    qkv = inputs()
    eager.begin_chunk()
    assert eager.last_plan.index is not None
    want = [eager.attend(layer, *qkv[layer]) for layer in range(layers)]
    static = [tuple(t.clone() for t in x) for x in qkv]
    graphed.begin_chunk()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), graphed.capture():
        outs = [graphed.attend(layer, *static[layer]) for layer in range(layers)]
    graph.replay()
    torch.cuda.synchronize()
    first = [o.clone() for o in outs]
    graph.replay()
    torch.cuda.synchronize()
    for got, again, ref in zip(first, outs, want):
        assert torch.equal(got, again)  # replays are identical
        torch.testing.assert_close(got, ref, rtol=1.6e-2, atol=1.6e-2)  # bf16: ~2 ulps
    assert torch.equal(graphed.plan_buffers.seg, eager.plan_buffers.seg)  # selected at begin_chunk, read by the graph
    eager.end_chunk()
    graphed.end_chunk()


HOST_CASES = [("relax", None), ("pack", torch.float8_e4m3fn)]  # Pack on FP8 pools: compress_kv and quantize_frames


def _host_policy(name):
    return rk.RelaxMemory(reservoir=30) if name == "relax" else rk.PackMemory(top_k=1, archive=3, q_stride=2)


@pytest.mark.csrc
@pytest.mark.parametrize("ops", ["triton", "cuda"])
@pytest.mark.parametrize("name, kv_dtype", HOST_CASES, ids=["relax", "pack-fp8"])
def test_host_pools_are_page_locked_and_read_in_place_by_the_kernels(name, kv_dtype, ops, backend_env):
    """pool_device="cpu" on CUDA: the pools are page-locked host memory, the ops get CUDA tensors over the same
    bytes, and the Triton kernels (auto) or the CUDA extension's (``RELAXKV_BACKEND_<OP>=cuda``) read and write them
    in place: every call bitwise equal to the same cache with device pools over 9 chunks (window mode, bf16)."""
    pytest.importorskip("triton")
    if ops == "cuda":
        for op in ("ROPE_APPEND", "GATHER_KV_ROPE", "COMPRESS_KV", "QUANTIZE_FRAMES", "RELAX_SELECT"):
            backend_env(f"RELAXKV_BACKEND_{op}", "cuda")
    layers, b, h, d, hh, ww = 2, 1, 2, 64, 4, 4
    caches = [rk.KVCache(_host_policy(name), layers, b, h, d, hh, ww, dtype=torch.bfloat16, device="cuda",
                         backend="fused", attention="window", kv_dtype=kv_dtype, pool_device=where)
              for where in (None, "cpu")]
    device, host = caches
    st = host.storage
    assert st.k.device.type == "cuda" and st.pinned and all(t.is_pinned() for t in st.pinned)
    assert st.k.data_ptr() == st.pinned[0].data_ptr() and device.storage.pinned == []
    assert host.host_bytes() == host.pool_bytes() and host.device_bytes() == host.memory_bytes() - host.pool_bytes()
    run_side_by_side(caches, dtype=torch.bfloat16, seed=11)
    assert device.last_plan.selects
    rows = torch.tensor([s * hh * ww + i for s, p in enumerate(device.last_plan.slot_pos) if p >= 0
                         for i in range(hh * ww)], device="cuda")
    for a, c in ((device.storage.k, st.pinned[0]), (device.storage.v, st.pinned[1])):
        assert torch.equal(a[:, :, rows].view(torch.uint8).cpu(), c[:, :, rows.cpu()].view(torch.uint8))


@pytest.mark.csrc
@pytest.mark.cuda_graph
@pytest.mark.parametrize("name, kv_dtype", HOST_CASES, ids=["relax", "pack-fp8"])
def test_cuda_graph_of_a_chunk_step_with_host_pools_replays_device_pools(name, kv_dtype):
    """A chunk step with host pools captured once in steady state and replayed over 4 chunks: bitwise equal to the
    eager chunk steps of the same cache with device pools (the kernels read host memory inside the graph)."""
    pytest.importorskip("triton")
    layers, b, h, d, hh, ww = 2, 1, 2, 64, 4, 4
    eager, graphed = (rk.KVCache(_host_policy(name), layers, b, h, d, hh, ww, dtype=torch.bfloat16, device="cuda",
                                 backend="fused", attention="window", kv_dtype=kv_dtype, pool_device=where)
                      for where in (None, "cpu"))
    assert_layer_steps_replay_eager(eager, graphed, seed=12, warmup=6, chunks=4)
