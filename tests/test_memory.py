"""Memory policies, planners and the KV cache against literal re-statements of the papers' code."""
import pytest
import torch
import torch.nn.functional as F

import relaxkv_kernels as rk
from relaxkv_kernels.reference.relax import frame_means_literal, relax_candidates, set_prototype
from relaxkv_kernels.reference.rope import rope_ref, token_positions

WAN_F = 1560


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
        p, f, u, c = self.p, self.h * self.w, self.p.chunk_frames, self.c
        self.written[layer] = (k, v)
        mem = self.frames
        n = len(mem)
        if n <= p.sink + 1 + p.tail:
            groups = [[fr] for fr in mem]
            pos = list(range(c + u - (n + u), c))
        else:
            middle = mem[p.sink : n - p.tail]
            cands = [middle[i] for i in relax_candidates(len(middle), p.candidates)]
            if self.choice is None:  # layer 0, first pass: per-sample choice
                k0 = lambda frs: torch.stack([fr[1][0][0] for fr in frs], dim=1)  # [B, n, F, H, D]
                p_h = F.normalize(frame_means_literal(k0(cands)), dim=-1, eps=1e-12)
                p_s = set_prototype(frame_means_literal(k0(mem[: p.sink])))
                p_t = set_prototype(frame_means_literal(k0(mem[n - p.tail :])))
                score = (p_h * p_s[:, None]).sum(-1) - p.lam * (p_h * p_t[:, None]).sum(-1)
                self.choice = score.argmax(-1).tolist()
            groups = [mem[: p.sink], None, mem[n - p.tail :]]
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
            kk = rope_ref(torch.cat(ks).double(), token_positions(kpos, self.h, self.w))
            qq = rope_ref(q[b].double(), token_positions(torch.arange(c, c + u), self.h, self.w))
            o = F.scaled_dot_product_attention(qq.transpose(0, 1), kk.transpose(0, 1), torch.cat(vs).double().transpose(0, 1))
            outs.append(o.transpose(0, 1))
        return torch.stack(outs)

    def end_chunk(self):
        u, f = self.p.chunk_frames, self.h * self.w
        for i in range(u):
            self.frames.append([self.c + i, {l: (k[:, i * f : (i + 1) * f], v[:, i * f : (i + 1) * f])
                                             for l, (k, v) in self.written.items()}])


def test_relax_cache_matches_literal_reservoir_over_300_frames():
    """The trimmed cache (<= 64 frames) gives the 120-frame reservoir's selections and outputs."""
    policy = rk.RelaxMemory()
    h, w, layers, heads, d, batch = 2, 2, 2, 1, 16, 2
    cache = rk.KVCache(policy, layers, batch, heads, d, h, w, dtype=torch.float32, backend="reference")
    literal = LiteralRelax(policy, h, w)
    gen = torch.Generator().manual_seed(0)
    u = policy.chunk_frames
    assert cache.planner.n_slots <= 64
    worst = 0.0
    for chunk in range(100):
        cache.begin_chunk()
        literal.begin_chunk(chunk * u)
        for _ in range(2):  # a denoising pass, then the refresh pass whose K/V stay
            for layer in range(layers):
                q, k, v = (torch.randn(batch, u * h * w, heads, d, generator=gen) for _ in range(3))
                k = k + 0.5 * torch.randn(batch, 1, 1, d, generator=gen)  # frame-level signal
                got = cache.attend(layer, q, k, v).double()
                want = literal.attend(layer, q, k, v)
                worst = max(worst, (got - want).abs().max().item())
        if literal.choice is not None:
            chosen = [row[policy.sink] for row in cache.selected_frames()]
            cands = cache.last_plan.relax.candidates
            assert chosen == [cands[i] for i in literal.choice], f"chunk {chunk}"
        cache.end_chunk()
        literal.end_chunk()
        assert len(cache.planner.slots.slot_of) <= 64
    assert worst < 1e-5  # fp32 storage (one rounding of the rotated keys) vs a float64 literal


@pytest.mark.parametrize(
    "policy",
    [rk.DenseWindow(), rk.DenseWindow(sink=3), rk.DenseWindow(sink=3, rerotate=True), rk.RelaxMemory(),
     rk.RelaxMemory(history=2, contiguous_rope=True), rk.PackMemory()],
    ids=["dense", "sink", "sink-rerotate", "relax", "relax-h2-contiguous", "pack"],
)
def test_plans_are_bounded_and_steady(policy):
    """Slots stay within the allocation and every table keeps its shape once the memory is full."""
    planner = policy.planner(30, 52)
    shapes = []
    for n in range(400):
        plan = planner.plan(n)
        assert len(plan.segments) == planner.n_seg
        assert len(planner.slots.slot_of) <= planner.n_slots
        for start, length, _ in plan.segments:
            assert length == 0 or 0 <= start and start + length <= planner.n_rows
        job = plan.relax or plan.pack
        shapes.append(None if job is None else tuple(len(x) for x in vars(job).values() if isinstance(x, list)))
    assert len(set(shapes[200:])) == 1


def test_relax_steady_state_plan():
    """R = 120: candidates 58, 44, 30, 16 frames before c; sink at c-4, c-3, history c-2, tail c-1."""
    planner = rk.RelaxMemory().planner(30, 52)
    n = 100
    for i in range(n + 1):
        plan = planner.plan(i)
    c = plan.start_frame
    assert [c - fr for fr in plan.relax.candidates] == [58, 44, 30, 16]
    assert plan.relax.target_pos == [c - 2]
    sink, tail = plan.segments[0:2], plan.segments[3]
    assert [s[2] for s in sink] == [c - 4, c - 4]  # stored at 0 and 1, read at c-4 and c-3
    assert tail[2] == 0 and plan.frames_attended[3] == c - 1
    assert plan.frames_attended[4:] == [c, c + 1, c + 2]


def test_pack_active_context_is_27872_tokens():
    """Sink 8 frames + 16 x 182 mid tokens + recent 4 frames + current 4 frames, whatever the length."""
    planner = rk.PackMemory().planner(30, 52)
    assert planner.block_tokens == 182
    for n in range(300):
        plan = planner.plan(n)
        if n >= 19:  # 16 mid blocks exist from block 19 on
            k = len(plan.pack.target_pos)
            assert sum(s[1] for s in plan.segments) + k * planner.block_tokens == 27872


def test_pack_repacks_sink_and_mid_before_recent():
    planner = rk.PackMemory(top_k=2, archive=3).planner(4, 4)
    for n in range(8):
        plan = planner.plan(n)
    c = plan.start_frame  # 28; mid blocks 4, 5, 6 (first frames 16, 20, 24); recent block 6
    assert plan.pack.mid_blocks == [3, 4, 5]
    assert plan.pack.target_pos == [16, 20]  # two selected blocks packed right before recent (24)
    assert [s[2] for s in plan.segments[:8]] == [8] * 8  # sink frames 0..7 now at 8..15
    assert plan.frames_attended[10:14] == [24, 25, 26, 27] and [s[2] for s in plan.segments[10:]] == [0] * 8


def test_dense_window_self_forcing_and_rerotated():
    sf = rk.DenseWindow(window=9, sink=3).planner(2, 2)
    rr = rk.DenseWindow(window=9, sink=3, rerotate=True).planner(2, 2)
    for n in range(5):
        a, b = sf.plan(n), rr.plan(n)
    assert a.frames_attended == [0, 1, 2, 9, 10, 11, 12, 13, 14]
    assert [s[2] for s in a.segments] == [0] * 9
    assert [s[2] for s in b.segments] == [6, 6, 6, 0, 0, 0, 0, 0, 0]  # sink right before the window
    assert a.evicted == [6, 7, 8]


@pytest.mark.parametrize(
    "policy,chunks",
    [(rk.DenseWindow(window=9, sink=3), 6), (rk.RelaxMemory(), 6), (rk.PackMemory(top_k=2, archive=3, q_stride=2), 8)],
    ids=["sink", "relax", "pack"],
)
def test_cache_reference_rollout_is_finite_and_bounded(policy, chunks):
    gen = torch.Generator().manual_seed(1)
    cache = rk.KVCache(policy, 2, 2, 2, 16, 4, 4, dtype=torch.float32, backend="reference")
    size = cache.memory_bytes()
    u = policy.chunk_frames
    for _ in range(chunks):
        cache.begin_chunk()
        for layer in range(2):
            q, k, v = (torch.randn(2, u * 16, 2, 16, generator=gen) for _ in range(3))
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


def test_live_bytes_grow_then_stay_bounded():
    """Dense and Relax hold a bounded number of frames; the allocation covers the largest live set."""
    for policy in (rk.DenseWindow(window=9), rk.RelaxMemory(reservoir=30), rk.PackMemory(top_k=2, archive=3)):
        cache = rk.KVCache(policy, 1, 1, 1, 16, 4, 4, dtype=torch.float32, device="meta")
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
    gen = torch.Generator().manual_seed(7)
    cache = rk.KVCache(policy, 1, 1, 2, 16, 4, 4, dtype=torch.float32, backend="reference")
    u, live = policy.chunk_frames, []
    for _ in range(200):
        cache.begin_chunk()
        q, k, v = (torch.randn(1, u * 16, 2, 16, generator=gen) for _ in range(3))
        assert torch.isfinite(cache.attend(0, q, k, v)).all()
        cache.end_chunk()
        live.append(cache.live_bytes())
    assert max(live) <= cache.memory_bytes()
    assert len(set(live[-100:])) == 1  # flat once the memory is full
