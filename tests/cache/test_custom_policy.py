"""Memory policies written outside the package run through KVCache unchanged.

Each policy below is all a user writes (a frozen config and a Planner subclass, against the public API
only); the cache, the ops and the attention modes are the package's.

- SinkEveryKth: sink + every k-th frame, a static plan (no device step).
- SinkNearest: sink + the tail frame + ONE earlier frame chosen on the device from the stored prototypes
  (``selection = "chunk"``) or from each layer's queries (``"per_layer"``), with its own index dataclass.

Whole tiny rollouts through the reference and the fused backends, in the segment-table and the window
modes, equal a literal re-statement: float64 RoPE of every attended frame at its position and one
softmax over them (for SinkNearest, the choice made again in float64 on the host).
"""
import dataclasses
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import relaxkv_kernels as rk
from relaxkv_kernels.geometry import apply_rope
from relaxkv_kernels.geometry import token_positions
from relaxkv_kernels.memory import ChunkPlan
from relaxkv_kernels.memory import StepContext
from relaxkv_kernels.memory import pad


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
    pytest.param("fused", "segments", marks=pytest.mark.interpreter),
    pytest.param("fused", "window", marks=pytest.mark.interpreter),
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


# ---------------------------------------------------------------------------- a policy with its own device step


@dataclass(frozen=True)
class SinkNearest(rk.MemoryPolicy):
    """The first ``sink`` frames, the tail (the last frame before the chunk) and ONE earlier frame of the last
    ``span`` frames, chosen on the device per sample: the candidate whose prototype is closest (cosine) to the
    tail's, once per chunk; ``by_query``: closest to the layer's mean query, at each layer's first pass.

    Sink and tail keep their true positions; the chosen frame is re-packed right before the tail, at c - 2
    (its delta is c - 2 - frame, 0 when it is frame c - 2), so the device step writes a non-zero delta.
    """

    sink: int = 1
    span: int = 6
    chunk_frames: int = 2
    by_query: bool = False

    def bounds(self) -> dict[str, tuple[int | None, int | None]]:  # checked by MemoryPolicy.__post_init__
        return {"sink": (0, None), "span": (2, None), "chunk_frames": (1, None)}

    def roles(self, start: int) -> tuple[list[int], list[int], list[int]]:
        """(sink, candidates, tail) frames before ``start``; no candidates: sink and tail are every earlier frame."""
        sink = list(range(min(self.sink, start)))
        tail = [start - 1] if start - 1 >= self.sink else []
        return sink, list(range(max(self.sink, start - self.span), start - 1)), tail

    def planner(self, height: int, width: int) -> "SinkNearestPlanner":
        cls = SinkNearestQueryPlanner if self.by_query else SinkNearestPlanner
        return cls(self, height * width)


@dataclass
class NearestIndex:
    """Index lists of SinkNearest's device step (the cache uploads them as int64 tensors)."""

    cand_slots: list[int]  # [C] slots of the candidates, oldest first
    tail_slot: list[int]  # [1] slot of the reference frame
    slot_pos: list[int]  # [n_slots] frame held by each slot (-1: empty)
    target_pos: list[int]  # [1] position given to the chosen frame (c - 2)


class SinkNearestPlanner(rk.Planner):
    """Table: sink | chosen (reserved row, written on the device) | tail | chunk frames | padding."""

    selection = "chunk"  # scores prototypes stored before the chunk: one table for every layer
    needs_prototypes = True

    def __init__(self, policy: SinkNearest, frame_tokens: int):
        n_slots = policy.sink + policy.span + policy.chunk_frames
        n_seg = policy.sink + 2 + policy.chunk_frames
        super().__init__(frame_tokens, n_slots=n_slots, n_rows=n_slots * frame_tokens, n_seg=n_seg,
                         max_keys=n_seg * frame_tokens)
        self.policy = policy

    def plan(self, n: int) -> ChunkPlan:
        p, f = self.policy, self.frame_tokens
        u, c = p.chunk_frames, n * p.chunk_frames
        sink, cands, tail = p.roles(c)
        evicted = self.slots.keep_only(sink + cands + tail)  # a frame left out now is never read again
        current = [self.slots.place(c + i) for i in range(u)]
        slot = self.slots.slot_of
        reserved = [(0, 0, 0)] if cands else []  # written by the device step
        segments = [(slot[fr] * f, f, 0) for fr in sink] + reserved + [(slot[fr] * f, f, 0) for fr in tail]
        attended = sink + [-1] * len(reserved) + tail
        n_memory = len(segments)
        segments += [(s * f, f, 0) for s in current]
        attended += list(range(c, c + u))
        pad(segments, attended, self.n_seg)
        plan = ChunkPlan(n, c, current, list(range(c, c + u)), segments, attended, evicted, self.slots.slot_pos(),
                         n_memory_seg=n_memory)
        if cands:
            plan.selects, plan.selected_keys = True, f
            plan.index = NearestIndex([slot[fr] for fr in cands], [slot[tail[0]]], plan.slot_pos, [c - 2])
        return plan

    def select_chunk(self, step: StepContext) -> None:
        i = step.index
        cand = F.normalize(step.proto[:, i.cand_slots], dim=-1)  # [B, C, D]
        ref = F.normalize(step.proto[:, i.tail_slot], dim=-1)  # [B, 1, D]
        self.write_choice(step, (cand * ref).sum(-1))

    def write_choice(self, step: StepContext, score: torch.Tensor) -> None:
        """Each sample's best candidate (score [B, C]; argmax: the first of ties) into the reserved row, no sync."""
        i, f = step.index, self.frame_tokens
        slot = i.cand_slots[score.argmax(-1)]  # [B]
        row = torch.stack([slot * f, torch.full_like(slot, f), i.target_pos - i.slot_pos[slot]], dim=-1)
        step.seg[:, step.plan.device_rows()[0]] = row.to(step.seg.dtype)  # host list: where the row is


class SinkNearestQueryPlanner(SinkNearestPlanner):
    """The same plans; each layer chooses at its first pass, by its mean pre-RoPE query."""

    selection = "per_layer"

    def select_chunk(self, step: StepContext) -> None:
        raise AssertionError("selection is 'per_layer': the cache must call select_layer")

    def select_layer(self, step: StepContext, q: torch.Tensor) -> None:
        cand = F.normalize(step.proto[:, step.index.cand_slots], dim=-1)  # [B, C, D]
        query = F.normalize(q.float().mean(dim=(1, 2)), dim=-1)  # [B, D]: mean over tokens and heads
        self.write_choice(step, (cand * query[:, None]).sum(-1))


class LiteralSinkNearest:
    """Every frame's pre-RoPE K/V kept forever; the choice made again in float64; one float64 softmax per sample."""

    def __init__(self, policy: SinkNearest, height: int, width: int):
        self.p, self.h, self.w = policy, height, width
        self.frames = {}  # frame -> {layer: (k, v)} of its chunk's last pass
        self.choice = {}  # (start, layer or None) -> chosen frame per sample
        self.gaps = []  # best minus second-best score of every choice with two candidates or more

    def proto(self, frames: list[int]) -> torch.Tensor:
        """Normalised mean of layer 0's pre-RoPE keys (over tokens and heads), float64 [B, n, D]."""
        keys = torch.stack([self.frames[fr][0][0] for fr in frames], dim=1).double()  # [B, n, F, H, D]
        return F.normalize(keys.mean(dim=(2, 3)), dim=-1)

    def chosen(self, start: int, layer: int, q: torch.Tensor) -> list[int] | None:
        _, cands, tail = self.p.roles(start)
        key = (start, layer if self.p.by_query else None)
        if cands and key not in self.choice:  # by_query: the layer's first pass chooses
            ref = F.normalize(q.double().mean(dim=(1, 2)), dim=-1) if self.p.by_query else self.proto(tail)[:, 0]
            score = (self.proto(cands) * ref[:, None]).sum(-1)  # [B, C]
            if len(cands) > 1:
                top = score.topk(2, dim=-1).values
                self.gaps.append((top[:, 0] - top[:, 1]).min().item())
            self.choice[key] = [cands[j] for j in score.argmax(-1).tolist()]
        return self.choice.get(key)

    def attend(self, start, layer, q, k, v):
        u, f = self.p.chunk_frames, self.h * self.w
        for i in range(u):
            self.frames.setdefault(start + i, {})[layer] = (k[:, i * f:(i + 1) * f], v[:, i * f:(i + 1) * f])
        sink, _, tail = self.p.roles(start)
        chosen = self.chosen(start, layer, q)
        chunk = list(range(start, start + u))
        qq = apply_rope(q.double(), token_positions(torch.tensor(chunk), self.h, self.w))
        out = []
        for b in range(q.shape[0]):
            picked = [] if chosen is None else [chosen[b]]
            frames = sink + picked + tail + chunk
            pos = sink + [start - 2] * len(picked) + tail + chunk
            kk = torch.cat([self.frames[fr][layer][0][b] for fr in frames]).double()
            vv = torch.cat([self.frames[fr][layer][1][b] for fr in frames]).double()
            kk = apply_rope(kk, token_positions(torch.tensor(pos), self.h, self.w))
            out.append(F.scaled_dot_product_attention(qq[b].transpose(0, 1), kk.transpose(0, 1), vv.transpose(0, 1)))
        return torch.stack(out).transpose(1, 2)


@pytest.mark.parametrize("by_query,backend,attention", [
    (False, "reference", "segments"), (False, "reference", "window"), (False, "reference", "per_call"),
    (True, "reference", "segments"), (True, "reference", "window"), (True, "reference", "per_call"),
    pytest.param(False, "fused", "window", marks=pytest.mark.interpreter),
], ids=lambda v: {False: "chunk", True: "per_layer"}.get(v, v) if isinstance(v, bool) else v)
def test_device_step_policy_rollout_matches_the_literal_restatement(by_query, backend, attention):
    if backend == "fused":
        pytest.importorskip("triton")
    policy, layers, batch, heads, head_dim, hh, ww = SinkNearest(by_query=by_query), 2, 2, 2, 16, 2, 4
    cache = rk.KVCache(policy, layers, batch, heads, head_dim, hh, ww, dtype=torch.float32, backend=backend,
                       attention=attention)
    literal = LiteralSinkNearest(policy, hh, ww)
    gen = torch.Generator().manual_seed(0)
    shape = (batch, policy.chunk_frames * hh * ww, heads, head_dim)
    chosen = {}  # start -> the frame each sample chose (layer 0)
    for _ in range(11):  # 22 frames: the span fills (chunk 4 on), frames leave it, slots are reused
        plan = cache.begin_chunk()
        for _ in range(2):  # two passes: the second rewrites the chunk's K/V (and prototypes), as the refresh pass
            for layer in range(layers):
                q, k, v = (torch.randn(shape, generator=gen) for _ in range(3))
                got = cache.attend(layer, q, k, v)
                want = literal.attend(plan.start_frame, layer, q, k, v)
                # fp32 storage, RoPE and softmax against float64: at most 6.4e-7 measured (16-40 keys of D = 16,
                # unit-variance inputs): 1e-5 leaves ~15x room; a wrong frame, delta or per-sample choice fails it
                torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        picked = literal.chosen(plan.start_frame, 0, None)
        want_frames = [[picked[b] if fr == -1 else fr for fr in plan.frames_attended] for b in range(batch)]
        assert cache.selected_frames() == want_frames, plan.chunk
        if plan.selects:
            chosen[plan.start_frame] = picked
        cache.end_chunk()
    # the float64 choice is the fp32 one: every best score leads the next by far more than fp32 rounding (~1e-7)
    assert min(literal.gaps) > 1e-4
    assert len(chosen) == 9 and plan.frames_attended[: plan.n_memory_seg] == [0, -1, 19]
    assert any(c[0] != c[1] for c in chosen.values()), "the samples never chose differently"
    offsets = {start - c[0] for start, c in chosen.items()}
    assert len(offsets) > 1 and offsets != {2}, "the choice never changed over chunks, or was never re-packed"
    if by_query:  # each layer's table is its own: the layers chose differently at least once
        assert any(literal.choice[(s, 0)] != literal.choice[(s, 1)] for s in chosen)
    assert len(cache.planner.slots.slot_of) <= cache.planner.n_slots


def _upload(index, device):
    """What the cache makes of ``plan.index``: the same dataclass, int64 tensors on the device."""
    return type(index)(**{fd.name: torch.tensor(getattr(index, fd.name), dtype=torch.int64, device=device)
                          for fd in dataclasses.fields(index)})


@pytest.mark.parametrize("by_query", [False, True], ids=["chunk", "per_layer"])
def test_device_step_needs_only_the_typed_step(by_query):
    """No cache: the step runs on a hand-made StepContext (no pools, no state). On the meta device, where
    a host sync (.item(), .tolist(), nonzero, tensor-valued if) raises; then on the CPU, where it writes only
    the reserved row, with a tie between two candidates going to the lower one."""
    policy, batch, head_dim = SinkNearest(by_query=by_query), 3, 16
    planner = policy.planner(2, 4)
    f = planner.frame_tokens
    for n in range(7):  # the slots of a steady-state chunk, some reused
        plan = planner.plan(n)
    assert plan.selects and len(plan.index.cand_slots) == policy.span - 1
    q_shape = (batch, policy.chunk_frames * f, 2, head_dim)

    def run(device, proto, seg, q):
        step = StepContext(plan, _upload(plan.index, device), seg, 0 if by_query else None, None, None, {}, proto,
                          "reference")
        planner.select_layer(step, q) if by_query else planner.select_chunk(step)

    table = torch.tensor(plan.segments, dtype=torch.int32).repeat(batch, 1, 1)
    seg = table.to("meta")
    run("meta", torch.empty(batch, planner.n_slots, head_dim, device="meta"), seg, torch.empty(q_shape, device="meta"))
    assert seg.shape == table.shape

    gen = torch.Generator().manual_seed(3)
    proto = torch.randn(batch, planner.n_slots, head_dim, generator=gen)
    q = torch.randn(q_shape, generator=gen)
    cand, tail = plan.index.cand_slots, plan.index.tail_slot[0]
    ref = q.double().mean(dim=(1, 2)) if by_query else proto[:, tail].double()
    ref[0] = proto[0, cand[3]].double()
    proto[0, cand[1]] = proto[0, cand[3]]  # sample 0: candidates 1 and 3 tie, exactly (cosine 1) with the reference
    if by_query:
        q[0] = proto[0, cand[3]]  # every token: the mean query is that prototype
    else:
        proto[0, tail] = proto[0, cand[3]]
    seg = table.clone()
    run("cpu", proto, seg, q)
    score = (F.normalize(proto[:, cand].double(), dim=-1) * F.normalize(ref, dim=-1)[:, None]).sum(-1)
    best = [1] + score[1:].argmax(-1).tolist()
    k = plan.device_rows()[0]
    want = table.clone()
    for b, j in enumerate(best):
        want[b, k] = torch.tensor([cand[j] * f, f, plan.start_frame - 2 - plan.slot_pos[cand[j]]])
    torch.testing.assert_close(seg, want, rtol=0, atol=0)
