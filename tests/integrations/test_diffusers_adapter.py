"""relaxkv memory inside diffusers' WanTransformer3DModel (relaxkv_kernels.integrations.diffusers) and the weight
conversion (relaxkv_gen.diffusers): tiny random models built from configs, real diffusers classes.

Tolerances (fp32). Both models compute the same network with different but equally exact operation orders
(diffusers' FP32LayerNorm and torch's RMSNorm against Wan's, the modulation added in another order), so a call's
outputs differ by float32 rounding of the activations: measured at most 2.2e-6 on outputs of magnitude ~5, asserted
at 2e-5 (about 30 ulps of the largest output). The one difference in what is computed is the timestep sinusoid:
diffusers computes it in fp32, Wan in fp64. Its angles reach t * omega = 1000 rad, where fp32's spacing is 6e-5,
so the sinusoid's entries move by up to ~6e-5 for t > 0 (exactly 0 at t = 0); through a tiny model's time MLP
(weights of std 0.02) that is below the rounding above, and the same 2e-5 is asserted. That it is the only
difference is shown on the embeddings themselves: with diffusers' sinusoid replaced by Wan's (a forward hook on
the real module), the time and text embeddings are bitwise Wan's.
"""
import dataclasses
import subprocess
import sys

import pytest
import torch
from diffusers import WanTransformer3DModel

import relaxkv_kernels as rk
from relaxkv_gen import FlowMatchSampler
from relaxkv_gen import build_model
from relaxkv_gen import denoise_chunk
from relaxkv_gen import get_preset
from relaxkv_gen import make_cache
from relaxkv_gen import random_text
from relaxkv_gen import sinusoidal_embedding_1d
from relaxkv_gen.diffusers import check_diffusers_config
from relaxkv_gen.diffusers import diffusers_config
from relaxkv_gen.diffusers import diffusers_to_wan
from relaxkv_gen.diffusers import wan_to_diffusers
from relaxkv_kernels.integrations.diffusers import KVCacheAttnProcessor
from relaxkv_kernels.integrations.diffusers import attach
from relaxkv_kernels.integrations.diffusers import attached_cache
from relaxkv_kernels.integrations.diffusers import detach

from helpers import assert_graph_replays_chunk_steps

CFG = get_preset("tiny")
ATOL = 2e-5  # see the module docstring
POLICIES = {
    "dense": lambda: rk.DenseWindow(window=9),
    "relax": lambda: rk.RelaxMemory(),
    "pack": lambda: rk.PackMemory(top_k=2, archive=3, q_stride=2),
}


@pytest.fixture(scope="module")
def models():
    """(relaxkv_gen's CausalWanModel, a WanTransformer3DModel with its weights through wan_to_diffusers)."""
    model = build_model(CFG, seed=0)
    transformer = WanTransformer3DModel(**diffusers_config(CFG)).eval().requires_grad_(False)
    transformer.load_state_dict(wan_to_diffusers(model.state_dict()), strict=True)
    return model, transformer


def _flow(transformer, x, t, text):
    return transformer(hidden_states=x, timestep=t, encoder_hidden_states=text).sample


def _attach(transformer, policy, batch=1):
    return attach(transformer, policy, batch=batch, height=CFG.grid_height, width=CFG.grid_width, backend="reference")


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_attached_transformer_matches_relaxkv_gen_over_8_chunks(models, name):
    """Both models on the same inputs, call by call, over 8 chunks of the Self-Forcing schedule (the inputs follow
    relaxkv_gen's trajectory): every call's flow within ATOL, the same frames selected after every chunk."""
    model, transformer = models
    ours = make_cache(model, POLICIES[name](), 2)
    theirs = _attach(transformer, POLICIES[name](), batch=2)
    text = random_text(CFG, 2, 3)
    context = model.embed_text(text)
    u = ours.policy.chunk_frames
    gen = torch.Generator().manual_seed(1)
    worst = {"t > 0": 0.0, "t = 0": 0.0}

    def forward(x, t, _pass):
        want = model(x, t, context, ours)
        got = _flow(transformer, x, t[:, 0], text)
        key = "t > 0" if t[0, 0] > 0 else "t = 0"
        worst[key] = max(worst[key], (got - want).abs().max().item())
        return want

    try:
        with torch.no_grad():
            for _ in range(8):
                ours.begin_chunk()
                theirs.begin_chunk()
                denoise_chunk(forward, FlowMatchSampler.create(), lambda: torch.randn(2, 16, u, 8, 8, generator=gen),
                              2, u, "cpu")
                ours.end_chunk()
                theirs.end_chunk()
                for layer in range(CFG.num_layers):
                    assert theirs.selected_frames(layer) == ours.selected_frames(layer)
    finally:
        detach(transformer)
    assert max(worst.values()) <= ATOL, worst


def test_timestep_sinusoid_is_the_only_difference_in_the_embeddings(models):
    """Time and text embeddings: diffusers' condition_embedder against Wan's time_embed / embed_text. With Wan's
    fp64 sinusoid swapped in (a hook on diffusers' own Timesteps module) they are bitwise equal at every t; with
    diffusers' fp32 sinusoid they are bitwise equal at t = 0 and differ for t > 0."""
    model, transformer = models
    t = torch.tensor([0.0, 250.0, 937.5, 1000.0])
    text = random_text(CFG, 4, 5)
    embedder = transformer.condition_embedder
    with torch.no_grad():
        e, e0 = model.time_embed(t[:, None], torch.float32)  # [4, 1, 1, dim], [4, 1, 6, dim]
        context = model.embed_text(text)
        temb, proj, ctx, _ = embedder(t, text)
        assert torch.equal(ctx, context)
        assert torch.equal(temb[0], e[0, 0, 0]) and torch.equal(proj[0], e0[0, 0].flatten())
        assert not torch.equal(temb[1:], e[1:, 0, 0])
        hook = embedder.timesteps_proj.register_forward_hook(
            lambda module, args, out: sinusoidal_embedding_1d(CFG.freq_dim, args[0]).to(out.dtype))
        try:
            temb, proj, _, _ = embedder(t, text)
        finally:
            hook.remove()
    assert torch.equal(temb, e[:, 0, 0]) and torch.equal(proj, e0[:, 0].flatten(1))


def test_cache_rope_agrees_with_diffusers_rotary_emb_on_a_first_chunk(models):
    """On a first chunk the cache's frames are at positions 0..U-1, where diffusers' own rotary_emb is right: the
    untouched transformer (its processor, its RoPE, SDPA over the chunk) and the attached one agree."""
    _, transformer = models
    gen = torch.Generator().manual_seed(2)
    x, text = torch.randn(1, 16, 3, 8, 8, generator=gen), random_text(CFG, 1, 2)
    t = torch.tensor([937.5])
    with torch.no_grad():
        want = _flow(transformer, x, t, text)
        cache = _attach(transformer, rk.DenseWindow(window=9))
        try:
            cache.begin_chunk()
            got = _flow(transformer, x, t, text)
        finally:
            detach(transformer)
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


def test_detach_restores_the_model_bit_for_bit(models):
    _, transformer = models
    gen = torch.Generator().manual_seed(3)
    x, text, t = torch.randn(1, 16, 3, 8, 8, generator=gen), random_text(CFG, 1, 3), torch.tensor([500.0])
    before = [block.attn1.processor for block in transformer.blocks]
    with torch.no_grad():
        want = _flow(transformer, x, t, text)
        cache = _attach(transformer, rk.RelaxMemory())
        assert attached_cache(transformer) is cache
        assert all(isinstance(block.attn1.processor, KVCacheAttnProcessor) for block in transformer.blocks)
        assert not any(isinstance(block.attn2.processor, KVCacheAttnProcessor) for block in transformer.blocks)
        for _ in range(2):
            cache.begin_chunk()
            _flow(transformer, x, t, text)
            cache.end_chunk()
        assert detach(transformer) is cache
        got = _flow(transformer, x, t, text)
    assert attached_cache(transformer) is None
    assert [block.attn1.processor for block in transformer.blocks] == before
    assert torch.equal(got, want)


def test_fused_projections_are_served(models):
    """diffusers' fuse_qkv_projections (one to_qkv linear): the processor reads it; same outputs."""
    _, transformer = models
    fused = WanTransformer3DModel(**diffusers_config(CFG)).eval().requires_grad_(False)
    fused.load_state_dict(transformer.state_dict())
    fused.fuse_qkv_projections()
    gen = torch.Generator().manual_seed(4)
    x, text, t = torch.randn(1, 16, 3, 8, 8, generator=gen), random_text(CFG, 1, 4), torch.tensor([1000.0])
    outs = []
    with torch.no_grad():
        for model in (transformer, fused):
            cache = _attach(model, rk.RelaxMemory())
            try:
                cache.begin_chunk()
                outs.append(_flow(model, x, t, text))
            finally:
                detach(model)
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=ATOL)


def test_attach_errors(models):
    model, transformer = models
    with pytest.raises(TypeError, match="expected a diffusers WanTransformer3DModel, got CausalWanModel"):
        attach(model, rk.RelaxMemory(), batch=1, height=4, width=4)
    patched = WanTransformer3DModel(**{**diffusers_config(CFG), "patch_size": (1, 1, 1)})
    with pytest.raises(ValueError, match=r"patch_size \(1, 1, 1\) is not supported"):
        attach(patched, rk.RelaxMemory(), batch=1, height=4, width=4)
    i2v = WanTransformer3DModel(**diffusers_config(CFG), image_dim=16, added_kv_proj_dim=64)
    with pytest.raises(ValueError, match="image-conditioned blocks"):
        attach(i2v, rk.RelaxMemory(), batch=1, height=4, width=4)
    with pytest.raises(TypeError, match="policy: expected a MemoryPolicy"):
        attach(transformer, "relax", batch=1, height=4, width=4)
    with pytest.raises(ValueError, match="process_group is not supported"):
        attach(transformer, rk.RelaxMemory(), batch=1, height=4, width=4, process_group=object())
    assert attached_cache(transformer) is None  # a refused attach changes nothing
    with pytest.raises(ValueError, match="no KV cache is attached"):
        detach(transformer)
    cache = _attach(transformer, rk.RelaxMemory())
    try:
        with pytest.raises(ValueError, match="already has a KV cache attached"):
            _attach(transformer, rk.RelaxMemory())
        cache.begin_chunk()
        text = random_text(CFG, 1, 0)
        for shape in [(1, 16, 3, 8, 6), (1, 16, 3, 6, 8), (2, 16, 3, 8, 8), (1, 16, 2, 8, 8)]:
            with pytest.raises(ValueError, match=r"expected \[1, C, 3, 8, 8\] \(the cache's batch, the 3 latent "
                                                 r"frames of a chunk"):
                _flow(transformer, torch.randn(shape), torch.tensor([0.0] * shape[0]), text.expand(shape[0], -1, -1))
        # text of another batch: named before any layer runs (it used to run and count layer 0, then fail on q)
        with pytest.raises(ValueError, match=r"encoder_hidden_states \(the text embeddings\): expected \[1, "):
            _flow(transformer, torch.randn(1, 16, 3, 8, 8), torch.tensor([0.0]), text.expand(2, -1, -1))
        assert cache._calls == [0] * CFG.num_layers
        # no hidden_states at all: diffusers' own error, not the input check's IndexError
        with pytest.raises(TypeError, match="hidden_states"):
            transformer(timestep=torch.tensor([0.0]), encoder_hidden_states=text)
    finally:
        detach(transformer)


def test_a_processor_swapped_after_attach_is_named_before_the_call():
    """``set_processor`` on a block after ``attach`` would bypass the cache: the next call raises before any layer runs
    (it used to run, return its outputs, and fail only at ``end_chunk``); detach and attach again works."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    transformer = WanTransformer3DModel(**diffusers_config(CFG)).eval().requires_grad_(False)
    cache = _attach(transformer, rk.RelaxMemory())
    text, x = random_text(CFG, 1, 0), torch.randn(1, 16, 3, 8, 8)
    try:
        transformer.blocks[1].attn1.set_processor(WanAttnProcessor())
        cache.begin_chunk()
        with pytest.raises(RuntimeError, match=r"block 1's self-attention processor was replaced after attach \(now "
                                               r"WanAttnProcessor\)"):
            _flow(transformer, x, torch.tensor([0.0]), text)
        assert cache._calls == [0] * CFG.num_layers
    finally:
        detach(transformer)
    cache = _attach(transformer, rk.RelaxMemory())
    try:
        cache.begin_chunk()
        _flow(transformer, x, torch.tensor([0.0]), text)
        cache.end_chunk()
    finally:
        detach(transformer)


def test_pack_refuses_one_head_everywhere(models):
    """Pack scores mid blocks over the first H // 2 heads: with one head that is none (a NaN affinity, always the
    oldest block, silently). KVCache refuses it, through attach too, as the public mid_select does; head-parallel
    ranks holding one head each of a larger model are served (tests/cache/test_distributed_cache.py, H = 4, P = 4)."""
    with pytest.raises(ValueError, match=r"PackMemory: num_heads: expected at least 2 attention heads .* got 1"):
        rk.KVCache(rk.PackMemory(), 1, 1, 1, 16, 4, 4)
    one_head = WanTransformer3DModel(**{**diffusers_config(CFG), "num_attention_heads": 1, "attention_head_dim": 32})
    with pytest.raises(ValueError, match=r"PackMemory: num_heads: expected at least 2 attention heads"):
        attach(one_head, rk.PackMemory(), batch=1, height=4, width=4)
    assert attached_cache(one_head) is None
    rk.KVCache(rk.RelaxMemory(), 1, 1, 1, 16, 4, 4)  # the other policies read no head subset


def test_weights_round_trip_bit_exact_and_named_errors():
    model = build_model(dataclasses.replace(CFG, num_layers=3), seed=1)
    sd = model.state_dict()
    converted = wan_to_diffusers(sd)
    back = diffusers_to_wan(converted)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    assert "blocks.2.attn1.to_out.0.weight" in converted and "condition_embedder.time_proj.bias" in converted
    # a Self-Forcing training checkpoint: EMA weights nested, names prefixed with "model."
    nested = {"generator_ema": {f"model.{k}": v for k, v in sd.items()}, "step": 10}
    assert wan_to_diffusers(nested).keys() == converted.keys()
    with pytest.raises(ValueError, match=r"unknown: blocks\.0\.self_attn\.extra"):
        wan_to_diffusers({**sd, "blocks.0.self_attn.extra": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"1 missing: head\.head\.bias"):
        wan_to_diffusers({k: v for k, v in sd.items() if k != "head.head.bias"})
    with pytest.raises(ValueError, match=r"diffusers_to_wan: .*unknown: blocks\.1\.attn1\.to_qkv\.weight"):
        diffusers_to_wan({**converted, "blocks.1.attn1.to_qkv.weight": torch.zeros(1)})
    for convert in (wan_to_diffusers, diffusers_to_wan):
        with pytest.raises(TypeError, match=rf"{convert.__name__}: state_dict: expected a dict of tensors .* got list"):
            convert([1, 2])
    with pytest.raises(ValueError, match="no transformer blocks"):
        diffusers_to_wan({"proj_out.weight": torch.zeros(1)})


def test_diffusers_config_check():
    transformer = WanTransformer3DModel(**diffusers_config(CFG))
    check_diffusers_config(transformer.config, CFG)
    with pytest.raises(ValueError, match=r"not preset 'wan-1.3b': num_attention_heads 2 \(preset: 12\)"):
        check_diffusers_config(transformer.config, get_preset("wan-1.3b"))


@pytest.mark.gpu
@pytest.mark.cuda_graph
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_cuda_graph_replays_an_attached_chunk_step(name):
    """Both passes of a chunk through the attached bf16 transformer captured once, replayed over later chunks:
    bitwise equal to eager with the same kernels."""
    cfg = dataclasses.replace(CFG, num_heads=1)  # head_dim 64
    weights = wan_to_diffusers(build_model(cfg, seed=0).state_dict())
    caches = {}
    for role in ("eager", "graphed"):
        transformer = WanTransformer3DModel(**diffusers_config(cfg)).eval().requires_grad_(False)
        transformer.load_state_dict(weights)
        transformer.to("cuda", torch.bfloat16)
        caches[role] = (attach(transformer, POLICIES[name](), batch=1, height=cfg.grid_height, width=cfg.grid_width,
                               backend="fused"), transformer)
    u = caches["eager"][0].policy.chunk_frames
    gen = torch.Generator(device="cuda").manual_seed(6)
    text = random_text(cfg, 1, 6).to("cuda", torch.bfloat16)
    transformers = {id(cache): model for cache, model in caches.values()}

    def inputs():
        return [(torch.randn(1, 16, u, 8, 8, generator=gen, device="cuda", dtype=torch.bfloat16),
                 torch.tensor([t], device="cuda"), text) for t in (937.5, 0.0)]

    def step(cache, passes):
        return [_flow(transformers[id(cache)], x, t, ctx) for x, t, ctx in passes]

    with torch.no_grad():
        assert_graph_replays_chunk_steps(caches["eager"][0], caches["graphed"][0], step, inputs, warmup=8, chunks=3)


def test_without_diffusers_the_packages_import_and_the_adapter_names_the_extra():
    """``import relaxkv_kernels`` / ``relaxkv_gen`` need only torch; attach and relaxkv_gen.diffusers then raise an
    ImportError naming the extra (diffusers made unimportable in a fresh interpreter)."""
    code = ("import sys; sys.modules['diffusers'] = None\n"
            "import relaxkv_kernels as rk, relaxkv_gen, relaxkv_kernels.integrations.diffusers as adapter\n"
            "assert 'diffusers' not in {m.split('.')[0] for m, v in sys.modules.items() if v is not None}\n"
            "for call in (lambda: adapter.attach(None, rk.RelaxMemory(), batch=1, height=4, width=4),\n"
            "             lambda: __import__('relaxkv_gen.diffusers')):\n"
            "    try:\n"
            "        call()\n"
            "    except ImportError as e:\n"
            "        assert 'relaxkv-kernels[diffusers]' in str(e), e\n"
            "    else:\n"
            "        raise AssertionError('no ImportError')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
