"""Relax Forcing memory: Sink + one History frame chosen on the device from 4 candidates + Tail + current chunk.

Semantics follow the official implementation (docs/pages/design.md). Frames are addressed by
their index in memory order (oldest first) in the planning rules, and by their cache slot in the plans.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ..ops.relax_select.op import relax_select_op
from .base import ChunkPlan
from .base import MemoryPolicy
from .base import Planner
from .base import StepContext
from .base import host_field
from .base import pad


def relax_candidates(num_middle: int, num_candidates: int) -> list[int] | None:
    """Candidate indices inside the middle block of ``num_middle`` frames, or None (use them all).

    a = Mn // 2, C' = min(C, Mn - a); Mn <= 1: None; C' = 1: [a]; otherwise C' + 1 evenly spaced
    float32 points from a to Mn - 1, truncated toward zero, de-duplicated, the largest dropped.
    Examples: 3 -> [1]; 6 -> [3, 4]; 9 -> [4, 5, 6, 7]; 15 -> [7, 8, 10, 12]; 18 -> [9, 11, 13, 15].
    """
    cand = _relax_candidates(num_middle, num_candidates)
    return None if cand is None else list(cand)


@lru_cache(maxsize=1024)  # every chunk of a steady state asks for the same Mn: ~0.1 ms of torch calls saved
def _relax_candidates(num_middle: int, num_candidates: int) -> tuple[int, ...] | None:
    if num_middle <= 1:
        return None
    a = num_middle // 2
    c = min(num_candidates, num_middle - a)
    if c == 1:
        return (a,)
    points = torch.linspace(a, num_middle - 1, c + 1, dtype=torch.float32).to(torch.int64)
    return tuple(torch.unique(points)[:-1].tolist())


@dataclass(frozen=True)
class RelaxRoles:
    """Roles of the P cached frames (memory-order indices) for one chunk; ``warmup`` means attend to all."""

    warmup: bool
    sink: list[int]
    middle: list[int]
    tail: list[int]
    candidates: list[int] | None  # memory-order indices; None: no selection, all middle frames used


def relax_roles(num_cached: int, sink: int, tail: int, num_candidates: int) -> RelaxRoles:
    """Split ``num_cached`` frames (before the current chunk) into sink / middle / tail / candidates."""
    if num_cached <= sink + 1 + tail:  # the official code uses the constant 1 whatever H_sel
        return RelaxRoles(True, [], [], [], None)
    middle = list(range(sink, num_cached - tail))
    cand = relax_candidates(len(middle), num_candidates)
    return RelaxRoles(
        False,
        list(range(sink)),
        middle,
        list(range(num_cached - tail, num_cached)),
        None if cand is None else [middle[i] for i in cand],
    )


def relax_target_positions(chunk_start: int, sink: int, tail: int, history: int,
                           contiguous: bool) -> tuple[list[int], list[int], list[int]]:
    """Temporal positions given to sink, history and tail frames for the chunk starting at ``chunk_start``.

    Hybrid RoPE: sink then history as one block packed right before the tail:
    sink c-T-(S+H) .. c-T-H-1, history c-T-H .. c-T-1, tail c-T .. c-1 (S=2, T=1, H=1: c-4, c-3 | c-2 | c-1).
    ``contiguous`` (paper ablation): sink frame j at j, history at its true index (returned empty:
    the caller keeps true positions), tail at its true positions.
    """
    c = chunk_start
    tail_pos = list(range(c - tail, c))
    if contiguous:
        return list(range(sink)), [], tail_pos
    first = c - tail - sink - history
    return list(range(first, first + sink)), list(range(first + sink, c - tail)), tail_pos


@dataclass
class RelaxIndex:
    """Inputs of ``relax_select`` for one chunk that selects (slots in memory order): the lists uploaded by the
    cache, and on the host the candidates' frames and the first history row."""

    slot_pos: list[int]
    sink_slots: list[int]
    tail_slots: list[int]
    cand_slots: list[int]
    target_pos: list[int]  # one per history entry
    candidates: list[int] = host_field()  # frame indices of the candidates
    seg_index: int = host_field()  # the segment-table row of the first history entry


@dataclass(frozen=True)
class RelaxMemory(MemoryPolicy):
    """Relax Forcing memory (docs/pages/design.md): Sink + selected History + Tail + current chunk.

    Args:
        sink, tail, history: S, T, H_sel. candidates: C. lam: lambda in r(h) = S(h) - lambda R(h).
        reservoir: R, the official code's frame budget (eviction of the oldest non-sink frames).
        contiguous_rope: paper ablation (true positions) instead of hybrid RoPE.
        batch0_decides: the official behaviour (batch element 0 chooses for all) instead of per sample.
        trim: keep only frames that can still be read (about half the memory, identical outputs);
            False keeps the whole reservoir.
    """

    sink: int = 2
    tail: int = 1
    history: int = 1
    candidates: int = 4
    lam: float = 2.0
    reservoir: int = 120
    chunk_frames: int = 3
    contiguous_rope: bool = False
    batch0_decides: bool = False
    trim: bool = True

    def bounds(self) -> dict[str, tuple[int | None, int | None]]:
        return {"sink": (0, None), "tail": (0, None), "history": (1, None),
                "candidates": (self.history, None),  # history entries are chosen among the candidates
                "chunk_frames": (1, None), "reservoir": (self.sink + self.tail + 2 + self.chunk_frames, None)}

    def planner(self, height: int, width: int) -> "RelaxPlanner":
        return RelaxPlanner(self, height * width)

    def reservoir_frames(self, n: int) -> list[int]:
        """Frames in the official reservoir before chunk ``n``, memory order (oldest non-sink evicted first)."""
        c, u = n * self.chunk_frames, self.chunk_frames
        keep = self.reservoir - u - self.sink
        if c <= self.reservoir - u:
            return list(range(c))
        return list(range(self.sink)) + list(range(c - keep, c))

    def read_frames(self, n: int) -> tuple[int, ...]:
        """Frames (before chunk n) that chunk n may attend to: all in warm-up, else sink, tail, candidates."""
        return _relax_read_frames(self, n)

    def kept_frames(self, n: int) -> list[int]:
        """Frames (before chunk n) the cache must still hold at chunk n: read by chunk n or a later one."""
        if not self.trim:
            return self.reservoir_frames(n)
        c = n * self.chunk_frames
        horizon = self.reservoir // self.chunk_frames + 2  # a frame leaves the reservoir within this many chunks
        kept = set().union(*(self.read_frames(later) for later in range(n, n + horizon)))
        return sorted(fr for fr in kept if fr < c)

    def num_slots(self) -> int:
        """Frame slots a cache needs: the largest kept set plus the current chunk, over the whole fill-up."""
        span = 3 * (self.reservoir // self.chunk_frames + 2)
        return max(len(self.kept_frames(n)) for n in range(span)) + self.chunk_frames


class RelaxPlanner(Planner):
    """Slots for the frames that can still be read; the history rows are chosen by ``relax_select`` once per chunk."""

    selection = "chunk"  # the prototypes it scores are stored before the chunk: no layer is waited for
    needs_prototypes = True

    def __init__(self, policy: RelaxMemory, frame_tokens: int):
        n_slots = _relax_num_slots(policy)
        n_seg = policy.sink + policy.tail + max(1, policy.history) + policy.chunk_frames
        super().__init__(frame_tokens, n_slots, n_slots * frame_tokens, n_seg, n_seg * frame_tokens)
        self.policy = policy

    def plan(self, n: int) -> ChunkPlan:
        p, f = self.policy, self.frame_tokens
        u, c = p.chunk_frames, n * p.chunk_frames
        evicted = self.slots.keep_only(p.kept_frames(n))
        current = [self.slots.place(c + i) for i in range(u)]
        mem = p.reservoir_frames(n)
        roles = relax_roles(len(mem), p.sink, p.tail, p.candidates)
        slot_of, slot_pos = self.slots.slot_of, self.slots.slot_pos()
        segments, attended, index = [], [], None
        if roles.warmup:
            frames = mem + list(range(c, c + u))
            first = c + u - len(frames)
            segments = [(slot_of[fr] * f, f, first + i - fr) for i, fr in enumerate(frames)]
            attended = frames
        else:
            sink = [mem[i] for i in roles.sink]
            tail = [mem[i] for i in roles.tail]
            cands = [mem[i] for i in roles.candidates]
            h = min(p.history, len(cands))
            sink_pos, hist_pos, tail_pos = relax_target_positions(c, p.sink, p.tail, h, p.contiguous_rope)
            segments += [(slot_of[fr] * f, f, pos - fr) for fr, pos in zip(sink, sink_pos)]
            segments += [(0, 0, 0)] * h  # written by relax_select
            segments += [(slot_of[fr] * f, f, pos - fr) for fr, pos in zip(tail, tail_pos)]
            segments += [(slot_of[c + i] * f, f, 0) for i in range(u)]
            attended = sink + [-1] * h + tail + list(range(c, c + u))
            index = RelaxIndex(
                slot_pos, [slot_of[fr] for fr in sink], [slot_of[fr] for fr in tail], [slot_of[fr] for fr in cands],
                hist_pos if not p.contiguous_rope else [0] * h, cands, len(sink),
            )
        n_memory = len(segments) - u
        pad(segments, attended, self.n_seg)
        plan = ChunkPlan(n, c, current, list(range(c, c + u)), segments, attended, evicted, slot_pos,
                         n_memory_seg=n_memory, index=index)
        if index is not None:
            plan.selects, plan.selected_keys = True, len(index.target_pos) * f
        return plan

    def readable_frames(self, plan: ChunkPlan) -> list[int]:
        """The static frames and every history candidate (relax_select chooses among them on the device)."""
        candidates = plan.index.candidates if plan.index is not None else []
        return sorted(set(super().readable_frames(plan)).union(candidates))

    def select_chunk(self, step: StepContext) -> None:
        """relax_select once per chunk, from the stored prototypes: the history rows of the table every layer reads."""
        p, i = self.policy, step.index
        relax_select_op(step.proto, i.slot_pos, i.sink_slots, i.tail_slots, i.cand_slots, step.seg, i.seg_index,
                        i.target_pos, self.frame_tokens, p.lam, p.batch0_decides, p.contiguous_rope, step.backend,
                        checked=True)


@lru_cache(maxsize=None)
def _relax_num_slots(policy: RelaxMemory) -> int:
    return policy.num_slots()


@lru_cache(maxsize=1024)  # each chunk looks ahead over the next R / U chunks: memoised, ~40x less host work
def _relax_read_frames(policy: RelaxMemory, n: int) -> tuple[int, ...]:
    mem = policy.reservoir_frames(n)
    roles = relax_roles(len(mem), policy.sink, policy.tail, policy.candidates)
    if roles.warmup:
        return tuple(mem)
    return tuple(mem[i] for i in roles.sink + roles.tail + roles.candidates)
