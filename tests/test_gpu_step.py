"""GPU tier: bf16 Triton attention at Wan2.1 shapes, and a 30-layer Relax chunk step under CUDA graphs and
torch.compile. Skipped without a CUDA device (see conftest)."""
import pytest
import torch

import relaxkv_kernels as rk
from relaxkv_kernels.reference import gather_segments_ref

pytestmark = pytest.mark.gpu
WAN = dict(num_heads=12, head_dim=128, height=30, width=52)  # F = 1560 tokens per latent frame
F = 1560


def _wan_attention_case(gen, kind):
    """Rotated bf16 queries of one chunk and a pool; tables of the relax (7 frames) or pack-like layout."""
    dev, h, d = "cuda", WAN["num_heads"], WAN["head_dim"]
    if kind == "relax":  # sink 2, history 1, tail 1, current 3 frames; hybrid deltas
        lengths, deltas, n_q = [F] * 7, [296, 296, 240, 0, 0, 0, 0], 3 * F
    else:  # pack: 8 sink frames, 16 compressed blocks of 182 tokens, 4 recent + 4 current frames
        lengths, deltas, n_q = [F] * 8 + [182] * 16 + [F] * 8, [40] * 8 + list(range(-30, 34, 4)) + [0] * 8, 4 * F
    starts = torch.randperm(len(lengths), generator=gen).tolist()  # segments scattered over the pool
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


def test_cuda_graph_of_a_30_layer_relax_chunk_step_replays_identically():
    """select + attention for 30 layers captured once, replayed over later chunks: equal to eager."""
    pytest.importorskip("triton")
    layers, batch, policy = 30, 1, rk.RelaxMemory(reservoir=30)
    make = lambda: rk.KVCache(policy, layers, batch, dtype=torch.bfloat16, device="cuda", backend="fused", **WAN)  # noqa: E731
    eager, graphed = make(), make()
    gen = torch.Generator(device="cuda").manual_seed(1)
    u = policy.chunk_frames

    def step(cache, qkv):
        return [cache.attend(layer, *qkv[layer]) for layer in range(layers)]

    for _ in range(5):  # past warm-up: from here on every table keeps its shape
        qkv = _relax_inputs(layers, batch, u, gen)
        for cache in (eager, graphed):
            cache.begin_chunk()
            step(cache, qkv)
            cache.end_chunk()
    static = _relax_inputs(layers, batch, u, gen)
    graphed.begin_chunk()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up run: autotuning and compilation happen outside the capture
        step(graphed, static)
    torch.cuda.current_stream().wait_stream(side)
    graphed.begin_chunk()  # same chunk planned again: pending selection restored for the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step(graphed, static)
    for chunk in range(4):
        qkv = _relax_inputs(layers, batch, u, gen)
        if chunk:
            graphed.begin_chunk()
        for dst, src in zip(static, qkv):
            for a, b in zip(dst, src):
                a.copy_(b)
        eager.begin_chunk()
        want = step(eager, qkv)
        graph.replay()
        torch.cuda.synchronize()
        for got, ref in zip(outs, want):
            assert torch.equal(got, ref)  # same kernels, same inputs: bitwise identical
        assert torch.equal(graphed.seg, eager.seg)
        eager.end_chunk()
        graphed.end_chunk()


def test_compiled_30_layer_relax_chunk_step_matches_eager():
    pytest.importorskip("triton")
    layers, batch, policy = 30, 1, rk.RelaxMemory(reservoir=30)
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
