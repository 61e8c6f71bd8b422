"""A memory policy written outside the package runs through KVCache unchanged: sink + every k-th frame.

The policy below is all a user writes (a frozen config and a Planner subclass); the cache, the ops and
the attention modes are the package's. Whole tiny rollouts through the reference and the fused backends,
in the segment-table and the window modes, equal a literal re-statement: float64 RoPE of every attended
frame at its true position and one softmax over them.
"""
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import relaxkv_kernels as rk
from relaxkv_kernels.geometry import apply_rope, token_positions
from relaxkv_kernels.memory import ChunkPlan, pad


@dataclass(frozen=True)
class SinkEveryKth(rk.MemoryPolicy):
    """The first ``sink`` frames, and every ``every``-th frame of the last ``span`` frames, at their true positions."""

    sink: int = 2
    every: int = 3
    span: int = 12
    chunk_frames: int = 2

    def memory(self, start: int) -> list[int]:
        """Frames before ``start`` that the chunk starting there attends to, oldest first."""
        recent = [f for f in range(max(self.sink, start - self.span), start) if f % self.every == 0]
        return list(range(min(self.sink, start))) + recent

    def planner(self, height: int, width: int) -> "SinkEveryKthPlanner":
        return SinkEveryKthPlanner(self, height * width)


class SinkEveryKthPlanner(rk.Planner):
    def __init__(self, policy: SinkEveryKth, frame_tokens: int):
        n_seg = policy.sink + -(-policy.span // policy.every) + policy.chunk_frames
        super().__init__(frame_tokens, n_slots=n_seg, n_rows=n_seg * frame_tokens, n_seg=n_seg,
                         max_keys=n_seg * frame_tokens)
        self.policy = policy

    def plan(self, n: int) -> ChunkPlan:
        p, f = self.policy, self.frame_tokens
        c = n * p.chunk_frames
        memory = p.memory(c)
        evicted = self.slots.keep_only(memory)  # a frame left out now is never read again
        current = [self.slots.place(c + i) for i in range(p.chunk_frames)]
        frames = memory + list(range(c, c + p.chunk_frames))
        segments = [(self.slots.slot_of[fr] * f, f, 0) for fr in frames]
        attended = list(frames)
        pad(segments, attended, self.n_seg)
        return ChunkPlan(n, c, current, list(range(c, c + p.chunk_frames)), segments, attended, evicted,
                         self.slots.slot_pos(), n_memory_seg=len(memory))


class LiteralSinkEveryKth:
    """Every frame's pre-RoPE K/V kept forever; each call rotates the attended frames and attends in float64."""

    def __init__(self, policy: SinkEveryKth, height: int, width: int):
        self.p, self.h, self.w = policy, height, width
        self.frames = {}  # frame -> {layer: (k, v)} of its chunk's last pass

    def attend(self, start, layer, q, k, v):
        u, f = self.p.chunk_frames, self.h * self.w
        for i in range(u):
            self.frames.setdefault(start + i, {})[layer] = (k[:, i * f:(i + 1) * f], v[:, i * f:(i + 1) * f])
        frames = self.p.memory(start) + list(range(start, start + u))
        kk = torch.cat([self.frames[fr][layer][0] for fr in frames], dim=1).double()
        vv = torch.cat([self.frames[fr][layer][1] for fr in frames], dim=1).double()
        kk = apply_rope(kk, token_positions(torch.tensor(frames), self.h, self.w))
        qq = apply_rope(q.double(), token_positions(torch.arange(start, start + u), self.h, self.w))
        out = F.scaled_dot_product_attention(qq.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2))
        return out.transpose(1, 2)


@pytest.mark.parametrize("backend,attention", [
    ("reference", "segments"), ("reference", "window"), ("reference", "per_call"),
    pytest.param("fused", "segments", marks=pytest.mark.interpreter), pytest.param("fused", "window", marks=pytest.mark.interpreter),
])
def test_custom_policy_rollout_matches_the_literal_restatement(backend, attention):
    if backend == "fused":
        pytest.importorskip("triton")
    policy, layers, batch, heads, head_dim, hh, ww = SinkEveryKth(), 2, 2, 2, 16, 2, 4
    cache = rk.KVCache(policy, layers, batch, heads, head_dim, hh, ww, dtype=torch.float32, backend=backend,
                       attention=attention)
    literal = LiteralSinkEveryKth(policy, hh, ww)
    gen = torch.Generator().manual_seed(0)
    shape = (batch, policy.chunk_frames * hh * ww, heads, head_dim)
    for _ in range(12):  # 24 frames: the span fills, frames leave it, slots are reused
        plan = cache.begin_chunk()
        for _ in range(2):  # two passes: the second rewrites the chunk's K/V, as the refresh pass does
            for layer in range(layers):
                q, k, v = (torch.randn(shape, generator=gen) for _ in range(3))
                got = cache.attend(layer, q, k, v)
                want = literal.attend(plan.start_frame, layer, q, k, v)
                torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        cache.end_chunk()
    assert plan.frames_attended[: plan.n_memory_seg] == [0, 1, 12, 15, 18, 21]
    assert len(cache.planner.slots.slot_of) <= cache.planner.n_slots
