"""KVCache: storage, per-chunk plans and attention for any memory policy, all layers of a model.

The Relax cache against a literal restatement of the official 120-frame reservoir (selections and outputs
over 300 frames); reference rollouts stay finite and bounded; argument errors; and whole chunk steps with
the kernels against the reference backend: the Triton kernels (the interpreter on CPU) and the csrc/ CUDA
kernels (``kernel_device``: GPU, or emulated on the CPU).
"""
import pytest
import torch
import torch.nn.functional as F

import relaxkv_kernels as rk
from relaxkv_kernels.geometry import apply_rope
from relaxkv_kernels.geometry import token_positions
from relaxkv_kernels.memory import relax_candidates
from relaxkv_kernels.ops.relax_select.reference import frame_means_literal
from relaxkv_kernels.ops.relax_select.reference import set_prototype

from helpers import DEVICE
from helpers import gen
from helpers import need_triton

CUDA_OPS = ("rope_append", "relax_select", "mid_select", "compress_kv", "gather_kv_rope")


class LiteralRelax:
    """The official Relax Forcing memory, restated literally: a 120-frame reservoir of pre-RoPE K/V,
    RoPE re-applied at every call at hybrid positions, per-sample selection at layer 0."""

    def __init__(self, policy, h, w):
        self.p, self.h, self.w = policy, h, w
        self.frames = []  # memory order: [frame index, {layer: (k, v)}]

    def begin_chunk(self, c):
        u = self.p.chunk_frames
        while len(self.frames) + u > self.p.reservoir:
            del self.frames[self.p.sink]  # oldest non-sink frame
        self.c, self.written, self.choice = c, {}, None

    def attend(self, layer, q, k, v):
        p, u, c = self.p, self.p.chunk_frames, self.c
        self.written[layer] = (k, v)
        mem = self.frames
        n = len(mem)
        if n <= p.sink + 1 + p.tail:
            pos = list(range(c + u - (n + u), c))
        else:
            middle = mem[p.sink : n - p.tail]
            cands = [middle[i] for i in relax_candidates(len(middle), p.candidates)]
            if self.choice is None:  # layer 0, first pass: per-sample choice
                def k0(frs):  # layer 0's keys of frames frs: [B, n, F, H, D]
                    return torch.stack([fr[1][0][0] for fr in frs], dim=1)

                p_h = F.normalize(frame_means_literal(k0(cands)), dim=-1, eps=1e-12)
                p_s = set_prototype(frame_means_literal(k0(mem[: p.sink])))
                p_t = set_prototype(frame_means_literal(k0(mem[n - p.tail :])))
                score = (p_h * p_s[:, None]).sum(-1) - p.lam * (p_h * p_t[:, None]).sum(-1)
                self.choice = score.argmax(-1).tolist()
            pos = list(range(c - p.tail - p.sink - 1, c))
        outs = []
        for b in range(q.shape[0]):
            if n > p.sink + 1 + p.tail:
                hist = [cands[self.choice[b]]]
                chosen = mem[: p.sink] + hist + mem[n - p.tail :]
            else:
                chosen = mem
            ks = [fr[1][layer][0][b] for fr in chosen] + [k[b]]
            vs = [fr[1][layer][1][b] for fr in chosen] + [v[b]]
            kpos = torch.tensor(pos + list(range(c, c + u)))
            kk = apply_rope(torch.cat(ks).double(), token_positions(kpos, self.h, self.w))
            qq = apply_rope(q[b].double(), token_positions(torch.arange(c, c + u), self.h, self.w))
            vv = torch.cat(vs).double()
            o = F.scaled_dot_product_attention(qq.transpose(0, 1), kk.transpose(0, 1), vv.transpose(0, 1))
            outs.append(o.transpose(0, 1))
        return torch.stack(outs)

    def end_chunk(self):
        u, f = self.p.chunk_frames, self.h * self.w
        for i in range(u):
            self.frames.append([self.c + i, {layer: (k[:, i * f : (i + 1) * f], v[:, i * f : (i + 1) * f])
                                             for layer, (k, v) in self.written.items()}])


def test_relax_cache_matches_literal_reservoir_over_300_frames():
    """The trimmed cache (<= 64 frames) gives the 120-frame reservoir's selections and outputs."""
    policy = rk.RelaxMemory()
    h, w, layers, heads, d, batch = 2, 2, 2, 1, 16, 2
    cache = rk.KVCache(policy, layers, batch, heads, d, h, w, dtype=torch.float32, backend="reference")
    literal = LiteralRelax(policy, h, w)
    g = gen(0)
    u = policy.chunk_frames
    assert cache.planner.n_slots <= 64
    worst = 0.0
    for chunk in range(100):
        cache.begin_chunk()
        literal.begin_chunk(chunk * u)
        for _ in range(2):  # a denoising pass, then the refresh pass whose K/V stay
            for layer in range(layers):
                q, k, v = (torch.randn(batch, u * h * w, heads, d, generator=g) for _ in range(3))
                k = k + 0.5 * torch.randn(batch, 1, 1, d, generator=g)  # frame-level signal
                got = cache.attend(layer, q, k, v).double()
                want = literal.attend(layer, q, k, v)
                worst = max(worst, (got - want).abs().max().item())
        if literal.choice is not None:
            chosen = [row[policy.sink] for row in cache.selected_frames()]
            cands = cache.last_plan.index.candidates
            assert chosen == [cands[i] for i in literal.choice], f"chunk {chunk}"
        cache.end_chunk()
        literal.end_chunk()
        assert len(cache.planner.slots.slot_of) <= 64
    assert worst < 1e-5  # fp32 storage (one rounding of the rotated keys) vs a float64 literal


@pytest.mark.parametrize(
    "policy,chunks",
    [(rk.DenseWindow(window=9, sink=3), 6), (rk.RelaxMemory(), 6), (rk.PackMemory(top_k=2, archive=3, q_stride=2), 8)],
    ids=["sink", "relax", "pack"],
)
def test_cache_reference_rollout_is_finite_and_bounded(policy, chunks):
    g = gen(1)
    cache = rk.KVCache(policy, 2, 2, 2, 16, 4, 4, dtype=torch.float32, backend="reference")
    size = cache.memory_bytes()
    u = policy.chunk_frames
    for _ in range(chunks):
        cache.begin_chunk()
        for layer in range(2):
            q, k, v = (torch.randn(2, u * 16, 2, 16, generator=g) for _ in range(3))
            out = cache.attend(layer, q, k, v)
            assert out.shape == q.shape and torch.isfinite(out).all()
        cache.end_chunk()
    assert cache.memory_bytes() == size


def test_cache_errors():
    with pytest.raises(TypeError, match="policy"):
        rk.KVCache("relax", 1, 1, 1, 16, 2, 2)
    with pytest.raises(ValueError, match="head_dim"):
        rk.KVCache(rk.RelaxMemory(), 1, 1, 1, 15, 2, 2)
    with pytest.raises(ValueError, match="backend"):
        rk.KVCache(rk.RelaxMemory(), 1, 1, 1, 16, 2, 2, backend="fast")
    cache = rk.KVCache(rk.RelaxMemory(), 1, 1, 1, 16, 2, 2, dtype=torch.float32)
    q = torch.randn(1, 12, 1, 16)
    with pytest.raises(RuntimeError, match="begin_chunk"):
        cache.attend(0, q, q, q)
    cache.begin_chunk()
    with pytest.raises(ValueError, match="layer"):
        cache.attend(1, q, q, q)
    with pytest.raises(ValueError, match="expected shape"):
        cache.attend(0, q[:, :8], q[:, :8], q[:, :8])
    with pytest.raises(TypeError, match="dtype"):
        cache.attend(0, q.half(), q.half(), q.half())
    with pytest.raises(ValueError, match="lam"):
        rk.RelaxMemory(lam=float("nan"))


@pytest.mark.parametrize("policy", [rk.RelaxMemory(), rk.PackMemory(top_k=2, archive=3), rk.DenseWindow()],
                         ids=["relax", "pack", "dense"])
def test_policy_state_layout(policy):
    """Prototypes [B, n_slots, D] (layer 0 only) for the policy that scores frames, Pack's mean keys per layer
    in ``state``, one segment table per layer only where each layer selects."""
    layers, batch, heads, d = 2, 3, 2, 16
    cache = rk.KVCache(policy, layers, batch, heads, d, 4, 4, dtype=torch.float32)
    pl = cache.planner
    if isinstance(policy, rk.RelaxMemory):
        assert cache.storage.proto.shape == (batch, pl.n_slots, d) and cache.storage.proto.dtype == torch.float32
    else:
        assert cache.storage.proto is None
    if isinstance(policy, rk.PackMemory):
        assert cache.storage.state["mean_key"].shape == (layers, batch, pl.n_blocks, heads, d)
    else:
        assert cache.storage.state == {}
    assert cache.plan_buffers.seg.shape == (layers if pl.selection == "per_layer" else 1, batch, pl.n_seg, 3)


def test_only_layer_0_writes_prototypes():
    """Relax scores frames by layer 0's keys: layer 1's cache write leaves the prototypes as layer 0 left them."""
    g = gen(2)
    cache = rk.KVCache(rk.RelaxMemory(), 2, 2, 2, 16, 4, 4, dtype=torch.float32, backend="reference")
    for _ in range(3):
        cache.begin_chunk()
        for layer in range(2):
            q, k, v = (torch.randn(2, 3 * 16, 2, 16, generator=g) for _ in range(3))
            cache.attend(layer, q, k, v)
            if layer == 0:
                after_layer0 = cache.storage.proto.clone()
        # empty slots: NaN
        torch.testing.assert_close(cache.storage.proto, after_layer0, rtol=0, atol=0, equal_nan=True)
        cache.end_chunk()


def test_live_bytes_grow_then_stay_bounded():
    """Dense and Relax hold a bounded number of frames; the allocation covers the largest live set."""
    for policy in (rk.DenseWindow(window=9), rk.RelaxMemory(reservoir=30), rk.PackMemory(top_k=2, archive=3)):
        cache = rk.KVCache(policy, 1, 1, 2, 16, 4, 4, dtype=torch.float32, device="meta")  # Pack: >= 2 heads
        live = []
        for _ in range(40):
            cache.last_plan = cache.planner.plan(cache.chunk)  # planner only: no tensors are touched
            cache.chunk += 1
            live.append(cache.live_bytes())
        assert max(live) <= cache.memory_bytes()
        assert live[-1] == live[-2] > live[0]


@pytest.mark.parametrize(
    "policy", [rk.DenseWindow(sink=3), rk.RelaxMemory(), rk.PackMemory(top_k=4, archive=8, q_stride=2)],
    ids=["sink", "relax", "pack"],
)
def test_200_chunk_rollout_keeps_memory_bounded(policy):
    """A long rollout (fast stand-in for the model: random q/k/v) holds a bounded, eventually flat memory."""
    g = gen(7)
    cache = rk.KVCache(policy, 1, 1, 2, 16, 4, 4, dtype=torch.float32, backend="reference")
    u, live = policy.chunk_frames, []
    for _ in range(200):
        cache.begin_chunk()
        q, k, v = (torch.randn(1, u * 16, 2, 16, generator=g) for _ in range(3))
        assert torch.isfinite(cache.attend(0, q, k, v)).all()
        cache.end_chunk()
        live.append(cache.live_bytes())
    assert max(live) <= cache.memory_bytes()
    assert len(set(live[-100:])) == 1  # flat once the memory is full


# ---------------------------------------------------------------------------- chunk steps with the kernels

POLICIES = pytest.mark.parametrize(
    "policy,chunks",
    [
        (rk.DenseWindow(window=6, sink=3, rerotate=True), 4),
        (rk.RelaxMemory(reservoir=15), 7),
        (rk.RelaxMemory(reservoir=15, history=2, batch0_decides=True), 7),
        (rk.PackMemory(sink_frames=2, block_frames=2, recent_frames=2, top_k=2, archive=3, q_stride=3), 9),
    ],
    ids=["sink-rerotate", "relax", "relax-h2-batch0", "pack"],
)


@POLICIES
def test_fused_chunk_steps_match_reference(policy, chunks):
    """The Triton kernels (segment-table attention), past warm-up, eviction and (Relax, Pack) device-side
    selection, fp32, B = 2."""
    need_triton()
    _run_against_reference(policy, chunks, DEVICE, "fused", "auto")


@POLICIES
def test_cuda_kernel_chunk_steps_match_reference(policy, chunks, kernel_device, backend_env):
    """Every CUDA kernel in the step (RELAXKV_BACKEND_<OP>=cuda): the window attention mode, whose memory rows
    gather_kv_rope writes into a slice of each layer's window."""
    for op in CUDA_OPS:
        backend_env(f"RELAXKV_BACKEND_{op.upper()}", "cuda")
    _run_against_reference(policy, chunks, kernel_device, "auto", "window")


def _run_against_reference(policy, chunks: int, device: str, backend: str, attention: str):
    layers, batch, heads, d, h, w = 2, 2, 2, 16, 4, 4
    caches = {"reference": rk.KVCache(policy, layers, batch, heads, d, h, w, dtype=torch.float32, device=device,
                                      backend="reference"),
              backend: rk.KVCache(policy, layers, batch, heads, d, h, w, dtype=torch.float32, device=device,
                                  backend=backend, attention=attention)}
    g = gen(0)
    u = policy.chunk_frames
    for _ in range(chunks):
        for cache in caches.values():
            cache.begin_chunk()
        for _ in range(2):  # a denoising pass and the refresh pass
            for layer in range(layers):
                q, k, v = (torch.randn(batch, u * h * w, heads, d, generator=g).to(device) for _ in range(3))
                k = k + torch.randn(batch, 1, 1, d, generator=g).to(device)  # frame-level signal for selection
                out = {be: cache.attend(layer, q, k, v) for be, cache in caches.items()}
                torch.testing.assert_close(out[backend], out["reference"], rtol=1e-5, atol=1e-5)
        assert caches[backend].selected_frames() == caches["reference"].selected_frames()
        for cache in caches.values():
            cache.end_chunk()
