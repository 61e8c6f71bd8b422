"""torch.compile of models that call ``KVCache.attend``, and the cache's explicit CUDA-graph mode (``capture``).

A compiled model (relaxkv_gen's CausalWanModel with the cache as an argument, diffusers' WanTransformer3DModel with
the cache attached) keeps a handful of graphs, counted by dynamo: one for a chunk's first pass and one for its later
passes per plan shape, none new once the plans are steady, whatever the number of passes; its outputs equal eager,
call by call (aot_eager runs the same ops: bitwise; inductor fuses the model's float32 elementwise work, which
reorders roundings: within 1e-5). Several caches through one compiled chunk step in one process, every order,
against eager: under inductor a view made inside the graph and written by an op lost its offset once automatic
dynamic shapes made the offset symbolic (Pack after Relax, relative errors up to 1.6, silently). CPU, reference ops.
"""
import itertools

import pytest
import torch
from diffusers import WanTransformer3DModel
from torch._dynamo.utils import counters

import relaxkv_kernels as rk
from relaxkv_gen import build_model
from relaxkv_gen import get_preset
from relaxkv_gen import random_text
from relaxkv_gen.diffusers import diffusers_config
from relaxkv_gen.diffusers import wan_to_diffusers
from relaxkv_kernels.integrations.diffusers import attach
from relaxkv_kernels.integrations.diffusers import detach

CFG = get_preset("tiny")
POLICIES = {
    "dense": lambda: rk.DenseWindow(window=9),
    "relax": lambda: rk.RelaxMemory(),
    "pack": lambda: rk.PackMemory(top_k=2, archive=3, q_stride=2),
}
TIMESTEPS = (937.5, 625.0, 0.0)  # two denoising passes, then the refresh pass
CHUNKS = 8  # Pack: sink blocks (0, 1), compression (2, 3), selection of 1 then 2 mid blocks (4, 5), steady after
STEADY = 6  # no new graph from this chunk on
MOST_GRAPHS = 6  # measured: dense 1-2, relax 1-4, pack 5-6 (warm-up shapes x first / later pass)
TOL = {"aot_eager": 0.0, "inductor": 1e-5}


@pytest.fixture(scope="module")
def model():
    return build_model(CFG, seed=0)


def _transformer(model):
    transformer = WanTransformer3DModel(**diffusers_config(CFG)).eval().requires_grad_(False)
    transformer.load_state_dict(wan_to_diffusers(model.state_dict()), strict=True)
    return transformer


def _graphs_over_chunks(eager, compiled, caches, backend: str) -> list[int]:
    """``CHUNKS`` chunks of ``len(TIMESTEPS)`` passes through ``compiled(cache 0)`` and ``eager(cache 1)``, every
    flow compared; returns dynamo's unique graphs after each chunk."""
    torch._dynamo.reset()
    counters.clear()
    u = caches[0].policy.chunk_frames
    gen = torch.Generator().manual_seed(4)
    graphs = []
    with torch.no_grad():
        for _ in range(CHUNKS):
            for cache in caches:
                cache.begin_chunk()
            for t in TIMESTEPS:
                x = torch.randn(1, CFG.in_dim, u, CFG.latent_height, CFG.latent_width, generator=gen)
                torch.testing.assert_close(compiled(x, t), eager(x, t), rtol=TOL[backend], atol=TOL[backend])
            for cache in caches:
                cache.end_chunk()
            graphs.append(counters["stats"]["unique_graphs"])
    assert caches[0].selected_frames() == caches[1].selected_frames()
    return graphs


def _assert_steady(graphs: list[int]) -> None:
    """At most two graphs for the first chunk's passes (its first pass, the others), a few in all, none late."""
    assert graphs[0] <= 2 and graphs[-1] <= MOST_GRAPHS, graphs
    assert graphs[STEADY - 1:] == [graphs[-1]] * (CHUNKS - STEADY + 1), graphs


@pytest.mark.parametrize("attention", ["segments", "window", "per_call"])
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_compiled_relaxkv_gen_model_keeps_a_few_graphs(model, name, attention):
    cfg = model.cfg
    caches = [rk.KVCache(POLICIES[name](), cfg.num_layers, 1, cfg.num_heads, cfg.head_dim, cfg.grid_height,
                         cfg.grid_width, dtype=torch.float32, backend="reference", attention=attention)
              for _ in range(2)]
    context = model.embed_text(random_text(CFG, 1, 3))
    compiled = torch.compile(model, backend="aot_eager")
    u = caches[0].policy.chunk_frames

    def run(fn, cache):
        return lambda x, t: fn(x, torch.full((1, u), t), context, cache)

    _assert_steady(_graphs_over_chunks(run(model, caches[1]), run(compiled, caches[0]), caches, "aot_eager"))


@pytest.mark.parametrize("name,backend", [(name, "aot_eager") for name in sorted(POLICIES)] + [("pack", "inductor")])
def test_compiled_attached_diffusers_transformer_keeps_a_few_graphs(model, name, backend):
    """``transformer.compile()``, what diffusers users do, with the cache attached (window mode, the default on CUDA):
    before, dynamo guarded on the cache's per-layer call counter and made a graph per pass; Pack hit the recompile
    limit in its second chunk and fell back to eager."""
    eager, compiled = _transformer(model), _transformer(model)
    caches = [attach(t, POLICIES[name](), batch=1, height=CFG.grid_height, width=CFG.grid_width,
                     backend="reference", attention="window") for t in (compiled, eager)]
    compiled.compile(backend=backend)
    text = random_text(CFG, 1, 3)

    def run(transformer):
        return lambda x, t: transformer(hidden_states=x, timestep=torch.tensor([t]), encoder_hidden_states=text).sample

    try:
        _assert_steady(_graphs_over_chunks(run(eager), run(compiled), caches, backend))
    finally:
        detach(eager)
        detach(compiled)


L, B, H, D, HH, WW = 2, 2, 2, 16, 4, 4  # frames of 16 tokens: the smallest grid Pack can pool (2x4x4)
ORDERED = {
    "relax": lambda: rk.RelaxMemory(reservoir=30),
    "pack": lambda: rk.PackMemory(top_k=2, archive=3, q_stride=2),
    "sink-rerotate": lambda: rk.DenseWindow(window=9, sink=3, rerotate=True),
}


@pytest.mark.parametrize("order", list(itertools.permutations(ORDERED)), ids="-then-".join)
def test_caches_compiled_through_one_chunk_step_match_eager_in_every_order(order):
    """Three window caches, one after the other, through one inductor-compiled chunk step (the cache an argument, as
    a user's step function takes it), 6 chunks x 2 passes each, against the same steps run eagerly; the first two of
    each order are the two-cache case."""
    def step(cache, qkv):
        return [cache.attend(layer, *qkv[layer]) for layer in range(L)]

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    for name in order:
        caches = [rk.KVCache(ORDERED[name](), L, B, H, D, HH, WW, dtype=torch.float32, backend="reference",
                             attention="window") for _ in range(2)]
        shape = (B, caches[0].policy.chunk_frames * HH * WW, H, D)
        gen = torch.Generator().manual_seed(3)
        with torch._dynamo.config.patch(recompile_limit=64):  # three caches' warm-ups in one code object
            for chunk in range(6):
                for cache in caches:
                    cache.begin_chunk()
                for _ in range(2):
                    qkv = [tuple(torch.randn(shape, generator=gen) for _ in range(3)) for _ in range(L)]
                    for got, want in zip(compiled(caches[0], qkv), step(caches[1], qkv)):
                        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5,
                                                   msg=lambda m: f"{name}, chunk {chunk}: {m}")
                for cache in caches:
                    cache.end_chunk()


def test_a_compiled_step_that_skips_a_layer_is_named_at_end_chunk():
    """The traced calls are counted too (in a tensor, so that counting adds no guard): a pass without layer 1 is
    caught at end_chunk as in eager."""
    cache = rk.KVCache(ORDERED["relax"](), L, B, H, D, HH, WW, dtype=torch.float32, backend="reference")
    shape = (B, cache.policy.chunk_frames * HH * WW, H, D)

    def step(cache, qkv, layers):
        return [cache.attend(layer, *qkv) for layer in layers]

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    qkv = tuple(torch.randn(shape) for _ in range(3))
    cache.begin_chunk()
    compiled(cache, qkv, (0, 1))
    compiled(cache, qkv, (0,))
    with pytest.raises(RuntimeError, match=r"layers \[1\] attended \[1\] times in chunk 0, the others 2"):
        cache.end_chunk()


# ----------------------------------------------------------------------------- the explicit CUDA-graph mode


def _run_chunk(cache, qkv) -> None:
    cache.begin_chunk()
    for layer in range(L):
        cache.attend(layer, *qkv)
    cache.end_chunk()


def test_a_chunk_without_calls_is_a_replay_only_after_capture():
    """Without ``capture()`` a chunk with no attend call is an error, on any device and stream; after it, such a chunk
    is the captured step's replay, and a plan whose shapes differ from the captured chunk's is refused before it
    runs. (On the CPU the "capture" runs eagerly: the cache's side of the mode is the same.)"""
    cache = rk.KVCache(ORDERED["relax"](), L, B, H, D, HH, WW, dtype=torch.float32, backend="reference")
    qkv = tuple(torch.randn(B, cache.policy.chunk_frames * HH * WW, H, D) for _ in range(3))
    with pytest.raises(RuntimeError, match=r"KVCache.capture: no chunk in progress"):
        with cache.capture():
            pass
    cache.begin_chunk()
    with pytest.raises(RuntimeError, match=r"no layer attended in chunk 0.*captured inside cache.capture\(\)"):
        cache.end_chunk()
    cache.begin_chunk()
    with cache.capture():
        for layer in range(L):
            cache.attend(layer, *qkv)
    cache.end_chunk()
    with pytest.raises(RuntimeError, match=r"chunk 1 changes the plan's shapes since a CUDA graph captured"):
        cache.begin_chunk()  # Relax's warm-up: chunk 1 attends to more frames than chunk 0

    steady = rk.KVCache(ORDERED["relax"](), L, B, H, D, HH, WW, dtype=torch.float32, backend="reference")
    for _ in range(4):  # past the warm-up: every later plan keeps its shapes
        _run_chunk(steady, qkv)
    steady.begin_chunk()
    with steady.capture():
        for layer in range(L):
            steady.attend(layer, *qkv)
    steady.end_chunk()
    for chunk in (5, 6):
        steady.begin_chunk()
        steady.end_chunk()  # a replay
        assert steady.chunk == chunk + 1
