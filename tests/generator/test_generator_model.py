"""relaxkv_gen model: Self-Forcing parameter names/shapes, Wan formulas, a literal functional reference."""
import math

import pytest
import torch
import torch.nn.functional as F

from relaxkv_gen import FlowMatchSampler
from relaxkv_gen import build_model
from relaxkv_gen import get_preset
from relaxkv_gen import random_text
from relaxkv_gen import rollout
from relaxkv_gen import sinusoidal_embedding_1d
from relaxkv_gen import unpatchify
from relaxkv_gen.config import MAX_LATENT_FRAMES
from relaxkv_gen.config import MAX_SECONDS
from relaxkv_gen.config import ModelConfig
from relaxkv_gen.config import latent_frames_for_seconds

BLOCK_KEYS = {  # Self-Forcing CausalWanAttentionBlock (Wan2.1 WanAttentionBlock naming), shape by (dim, ffn)
    "modulation": lambda d, f: (1, 6, d),
    **{f"{attn}.{p}.weight": (lambda d, f: (d, d)) for attn in ("self_attn", "cross_attn") for p in "qkvo"},
    **{f"{attn}.{p}.bias": (lambda d, f: (d,)) for attn in ("self_attn", "cross_attn") for p in "qkvo"},
    **{f"{attn}.{n}.weight": (lambda d, f: (d,)) for attn in ("self_attn", "cross_attn") for n in ("norm_q", "norm_k")},
    "norm3.weight": lambda d, f: (d,),
    "norm3.bias": lambda d, f: (d,),
    "ffn.0.weight": lambda d, f: (f, d),
    "ffn.0.bias": lambda d, f: (f,),
    "ffn.2.weight": lambda d, f: (d, f),
    "ffn.2.bias": lambda d, f: (d,),
}


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    d, f = cfg.dim, cfg.ffn_dim
    out = {
        "patch_embedding.weight": (d, 16, 1, 2, 2),
        "patch_embedding.bias": (d,),
        "text_embedding.0.weight": (d, cfg.text_dim),
        "text_embedding.0.bias": (d,),
        "text_embedding.2.weight": (d, d),
        "text_embedding.2.bias": (d,),
        "time_embedding.0.weight": (d, 256),
        "time_embedding.0.bias": (d,),
        "time_embedding.2.weight": (d, d),
        "time_embedding.2.bias": (d,),
        "time_projection.1.weight": (6 * d, d),
        "time_projection.1.bias": (6 * d,),
        "head.modulation": (1, 2, d),
        "head.head.weight": (16 * 4, d),
        "head.head.bias": (16 * 4,),
    }
    for i in range(cfg.num_layers):
        out.update({f"blocks.{i}.{k}": shape(d, f) for k, shape in BLOCK_KEYS.items()})
    return out


@pytest.mark.parametrize("preset", ["tiny", "wan-1.3b"])
def test_state_dict_matches_self_forcing_layout(preset):
    cfg = get_preset(preset)
    model = build_model(cfg, init=False)  # meta: no memory for wan-1.3b
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected_shapes(cfg)
    assert got["blocks.0.self_attn.norm_q.weight"] == (cfg.dim,)
    assert got["head.modulation"] == (1, 2, cfg.dim)
    if preset == "wan-1.3b":  # Wan2.1-T2V-1.3B: 825 tensors, 1,418,996,800 parameters
        assert len(got) == 825
        assert sum(math.prod(s) for s in got.values()) == 1_418_996_800
        assert (cfg.grid_height, cfg.grid_width, cfg.tokens_per_frame, cfg.head_dim) == (30, 52, 1560, 128)


def test_seeded_init_is_deterministic_and_not_degenerate():
    cfg = get_preset("tiny")
    a, b, c = build_model(cfg, seed=3), build_model(cfg, seed=3, init_on_device=True), build_model(cfg, seed=4)
    for (k, va), vb, vc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(va, vb), k
    assert not torch.equal(a.head.head.weight, c.head.head.weight)
    assert a.head.head.weight.abs().sum() > 0  # Wan zeros it; we do not (see init_weights)


def test_sinusoidal_embedding_literal():
    dim, half = 256, 128
    t = torch.rand(7) * 1000
    got = sinusoidal_embedding_1d(dim, t)
    assert got.dtype == torch.float64 and got.shape == (7, dim)
    want = torch.empty(7, dim, dtype=torch.float64)
    for n, p in enumerate(t.tolist()):  # float32 timestep widened to float64
        for j in range(half):
            w = 10000.0 ** (-j / half)
            want[n, j] = math.cos(p * w)
            want[n, half + j] = math.sin(p * w)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)


def test_unpatchify_ordering():
    b, c, frames, h, w, patch = 2, 3, 2, 3, 5, (1, 2, 2)
    tokens = torch.randn(b, frames * h * w, c * 4)
    got = unpatchify(tokens, frames, h, w, patch, c)
    assert got.shape == (b, c, frames, h * 2, w * 2)
    for f in range(frames):
        for y in range(h):
            for x in range(w):
                vec = tokens[:, (f * h + y) * w + x].view(b, 1, 2, 2, c)  # (pt, ph, pw, c), c fastest
                for i in range(2):
                    for j in range(2):
                        torch.testing.assert_close(got[:, :, f, 2 * y + i, 2 * x + j], vec[:, 0, i, j], rtol=0, atol=0)


def test_sampler_schedule():
    s = FlowMatchSampler.create()
    torch.testing.assert_close(s.timesteps, torch.tensor([1000.0, 937.5, 2500.0 / 3.0, 625.0]))
    for step, sig in zip((1000, 750, 500, 250), s.sigmas.tolist()):
        raw = 1 - (1000 - step) / 1000
        assert sig == pytest.approx(5 * raw / (1 + 4 * raw), rel=1e-6)
    assert s.timesteps.dtype == torch.float32
    x_t, flow = torch.randn(4, 5), torch.randn(4, 5)
    torch.testing.assert_close(s.to_x0(x_t, flow, s.sigmas[1]), x_t - 0.9375 * flow)
    assert latent_frames_for_seconds(5) == 20 and latent_frames_for_seconds(5.1) == 21


@pytest.mark.parametrize("seconds", [0.0, -1.0, math.inf, -math.inf, math.nan, MAX_SECONDS * 1.001],
                         ids=["zero", "negative", "inf", "-inf", "nan", "past-the-longest-video"])
def test_video_length_out_of_range_is_a_value_error(seconds):
    with pytest.raises(ValueError, match=r"seconds: expected a number in \(0, 4194304\]"):
        latent_frames_for_seconds(seconds)
    assert latent_frames_for_seconds(MAX_SECONDS) == MAX_LATENT_FRAMES


class PlainAttend:
    """Test double for the KV memory: bidirectional SDPA over the chunk, no RoPE, records inputs."""

    def __init__(self):
        self.calls = []

    def attend(self, layer, q, k, v):
        self.calls.append((layer, q.clone(), k.clone(), v.clone()))
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _rms(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


def _ln(x, w=None, b=None):
    return F.layer_norm(x, x.shape[-1:], w, b, eps=1e-6)


def _attn(q, k, v, heads):
    def split(t):  # [H, L, D]
        return t.unflatten(-1, (heads, -1)).transpose(0, 1)

    return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(0, 1).flatten(1)


def literal_forward(sd, cfg, x, t, text):
    """Wan formulas written out per sample and per latent frame, straight from the state dict."""
    def lin(h, name):
        return h @ sd[name + ".weight"].T + sd[name + ".bias"]

    def gelu(h):
        return F.gelu(h, approximate="tanh")

    outs = []
    for bi in range(x.shape[0]):
        frames = x.shape[2]
        tok = F.conv3d(x[bi:bi + 1], sd["patch_embedding.weight"], sd["patch_embedding.bias"], stride=(1, 2, 2))
        tok = tok[0].flatten(1).T  # [U*F, dim], row-major (f, y, x)
        ctx = torch.cat([text[bi], text.new_zeros(cfg.text_len - text.shape[1], cfg.text_dim)])
        ctx = lin(gelu(lin(ctx, "text_embedding.0")), "text_embedding.2")
        e = lin(F.silu(lin(sinusoidal_embedding_1d(256, t[bi]).to(x.dtype), "time_embedding.0")), "time_embedding.2")
        e0 = lin(F.silu(e), "time_projection.1").view(frames, 6, cfg.dim)
        per = tok.shape[0] // frames
        for i in range(cfg.num_layers):
            p = f"blocks.{i}."
            mod = sd[p + "modulation"][0] + e0  # [U, 6, dim]
            def rep(j):  # frame value on each of its tokens
                return mod[:, j].repeat_interleave(per, 0)

            h = _ln(tok) * (1 + rep(1)) + rep(0)
            q = _rms(lin(h, p + "self_attn.q"), sd[p + "self_attn.norm_q.weight"])
            k = _rms(lin(h, p + "self_attn.k"), sd[p + "self_attn.norm_k.weight"])
            y = lin(_attn(q, k, lin(h, p + "self_attn.v"), cfg.num_heads), p + "self_attn.o")
            tok = tok + y * rep(2)
            h = _ln(tok, sd[p + "norm3.weight"], sd[p + "norm3.bias"])
            q = _rms(lin(h, p + "cross_attn.q"), sd[p + "cross_attn.norm_q.weight"])
            k = _rms(lin(ctx, p + "cross_attn.k"), sd[p + "cross_attn.norm_k.weight"])
            tok = tok + lin(_attn(q, k, lin(ctx, p + "cross_attn.v"), cfg.num_heads), p + "cross_attn.o")
            y = lin(gelu(lin(_ln(tok) * (1 + rep(4)) + rep(3), p + "ffn.0")), p + "ffn.2")
            tok = tok + y * rep(5)
        hm = sd["head.modulation"][0] + e[:, None]  # [U, 2, dim]: time_embedding output, not e0
        out = lin(_ln(tok) * (1 + hm[:, 1].repeat_interleave(per, 0)) + hm[:, 0].repeat_interleave(per, 0), "head.head")
        outs.append(out)
    return unpatchify(torch.stack(outs), x.shape[2], cfg.grid_height, cfg.grid_width, (1, 2, 2), 16)


@pytest.mark.parametrize("frames", [1, 3], ids=["one-frame", "three-frames"])
def test_forward_matches_literal_reference(frames):
    cfg = get_preset("tiny")
    model = build_model(cfg, seed=1, dtype=torch.float64)
    x = torch.randn(2, 16, frames, cfg.latent_height, cfg.latent_width, dtype=torch.float64)
    t = torch.rand(2, frames) * 1000  # a different timestep per frame and per sample
    text = torch.randn(2, 5, cfg.text_dim, dtype=torch.float64)
    x_before = x.clone()
    cache = PlainAttend()
    got = model(x, t, model.embed_text(text), cache)
    assert torch.equal(x, x_before)
    want = literal_forward(model.state_dict(), cfg, x, t, text)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    # the KV memory sees every layer once, with [B, U*F, H, D] pre-RoPE q/k after the full-dim RMSNorm
    assert [c[0] for c in cache.calls] == list(range(cfg.num_layers))
    layer, q, k, v = cache.calls[0]
    assert q.shape == k.shape == v.shape == (2, frames * cfg.tokens_per_frame, cfg.num_heads, cfg.head_dim)
    rms = k.flatten(2) / model.blocks[0].self_attn.norm_k.weight
    torch.testing.assert_close(rms.pow(2).mean(-1), torch.ones(2, frames * cfg.tokens_per_frame, dtype=torch.float64),
                               rtol=1e-4, atol=1e-4)


def test_forward_rejects_bad_shapes():
    cfg = get_preset("tiny")
    model = build_model(cfg)
    ctx = model.embed_text(torch.randn(1, 3, cfg.text_dim))
    with pytest.raises(ValueError, match="per-frame timesteps"):
        model(torch.randn(1, 16, 3, 8, 8), torch.rand(1, 2), ctx, PlainAttend())
    with pytest.raises(ValueError, match="expected \\[B, 16, U, 8, 8\\]"):
        model(torch.randn(1, 16, 3, 8, 6), torch.rand(1, 3), ctx, PlainAttend())
    with pytest.raises(ValueError, match="text embeddings"):
        model.embed_text(torch.randn(1, 3, 512))


class _Plan:
    """The part of a ``ChunkPlan`` the rollout reads."""

    selects = False

    def total_keys(self):
        return 0


class _RecordingCache(PlainAttend):
    """Protocol double: records begin/attend/end order (attention as PlainAttend)."""

    def __init__(self, log):
        super().__init__()
        self.log = log

    def begin_chunk(self):
        self.log.append("begin")

    def attend(self, layer, q, k, v):
        self.log.append(layer)
        return super().attend(layer, q, k, v)

    def end_chunk(self):
        self.log.append("end")

    dtype = kv_dtype = torch.float32
    heads = None

    def memory_bytes(self):
        return 1

    def device_bytes(self):
        return 1

    def host_bytes(self):
        return 0

    def pool_bytes(self):
        return 1

    def live_bytes(self):
        return 1

    def selected_frames(self):
        return [[]]

    last_plan = _Plan()


def test_rollout_protocol_and_sampler(monkeypatch):
    import importlib
    from types import SimpleNamespace

    from relaxkv_gen import random_text
    from relaxkv_gen import rollout

    cfg = get_preset("tiny")
    model = build_model(cfg, seed=2)
    log, seen = [], []
    policy = SimpleNamespace(chunk_frames=2)
    fake_rk = SimpleNamespace(DenseWindow=lambda **kw: policy, RelaxMemory=lambda: policy, PackMemory=lambda: policy,
                              KVCache=lambda *a, **kw: _RecordingCache(log), RECACHE=("none",))
    forward = model.forward

    def spy(x, t, context, cache, timer=None):
        seen.append((x.clone(), t.clone()))
        return forward(x, t, context, cache, timer)

    model.forward = spy
    monkeypatch.setattr(importlib.import_module("relaxkv_gen.rollout"), "rk", fake_rk)
    res = rollout(model, "relax", random_text(cfg, 2, 0), num_chunks=3, seed=4)
    per_chunk = ["begin", *([0, 1] * 5), "end"]
    assert log == per_chunk * 3
    assert res.latents.shape == (2, 16, 6, 8, 8) and len(res.chunks) == 3
    steps = [t for _, t in seen[:5]]
    for t, want in zip(steps, [1000.0, 937.5, 2500.0 / 3.0, 625.0, 0.0]):
        assert t.shape == (2, 2)
        torch.testing.assert_close(t, torch.full((2, 2), want))
    for c in range(3):  # the refresh pass (5th) runs on the chunk's final x0, which is what is returned
        torch.testing.assert_close(seen[5 * c + 4][0], res.latents[:, :, 2 * c:2 * c + 2], rtol=0, atol=0)


@pytest.mark.parametrize("num_chunks, error", [(True, TypeError), (0, ValueError), (2.0, TypeError)])
def test_rollout_takes_an_int_count_of_chunks(num_chunks, error):
    """A bool is not a count: ``num_chunks=True`` used to run one chunk."""
    cfg = get_preset("tiny")
    with pytest.raises(error, match="num_chunks: expected an int"):
        rollout(build_model(cfg, seed=0), "relax", random_text(cfg, 1, 0), num_chunks=num_chunks)
