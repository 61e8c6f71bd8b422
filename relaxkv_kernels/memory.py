"""Memory policies and their host-side planners: which frames each chunk attends to, where they live.

A policy is a small frozen config. Its planner, made per cache, decides for every chunk the cache slot
of each new frame, what to evict, and the static part of the segment table; selection kernels fill in
the data-dependent entries (Relax history, Pack mid blocks) on the device. Everything a planner does
depends on the chunk index alone, so it never reads device memory, and in steady state every table it
produces keeps its shape from chunk to chunk (a chunk step can be captured in a CUDA graph).

Frame slot ``s`` owns pool rows ``s * F .. s * F + F - 1``; PackForcing's compressed blocks live after
all frame slots, ``Nc`` rows per archive slot.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

from .reference.pack import compressed_grid
from .reference.relax import relax_roles, relax_target_positions


@dataclass
class RelaxJob:
    """Inputs of ``relax_select`` for one chunk (slots, in memory order)."""

    sink_slots: list[int]
    tail_slots: list[int]
    cand_slots: list[int]
    candidates: list[int]  # frame indices of the candidates
    target_pos: list[int]  # one per history entry
    seg_index: int


@dataclass
class PackJob:
    """Inputs of ``mid_select`` and ``compress_kv`` for one chunk."""

    mid_slots: list[int]  # archive slots, oldest first
    mid_blocks: list[int]  # block indices of mid_slots
    target_pos: list[int]  # re-packed first-frame position of each selected block
    seg_index: int
    block_slot: int | None  # archive slot receiving the current block (None for sink blocks)


@dataclass
class ChunkPlan:
    """Everything about one chunk that the host knows before it runs.

    ``segments`` rows are (start_row, length, delta) for every batch element; entries reserved for
    device-side selection are written by the selection kernels. ``frames_attended`` lists the frame
    index of each segment (-1: chosen on the device, -2: unused).
    """

    chunk: int
    start_frame: int
    frame_slot: list[int]
    frame_pos: list[int]
    segments: list[tuple[int, int, int]]
    frames_attended: list[int]
    evicted: list[int]
    slot_pos: list[int]  # true frame position stored in each slot (-1: empty)
    relax: RelaxJob | None = None
    pack: PackJob | None = None
    block_pos: list[int] = field(default_factory=list)  # Pack: first-frame position per archive slot


class _SlotMap:
    """Frame -> slot map with a free list (lowest free slot first, deterministic)."""

    def __init__(self, n_slots: int):
        self.n_slots = n_slots
        self.slot_of: dict[int, int] = {}

    def keep_only(self, frames) -> list[int]:
        frames = set(frames)
        evicted = sorted(f for f in self.slot_of if f not in frames)
        for f in evicted:
            del self.slot_of[f]
        return evicted

    def place(self, frame: int, slot: int | None = None) -> int:
        if slot is None and frame in self.slot_of:  # planning the same chunk again keeps its slots
            return self.slot_of[frame]
        if slot is None:
            used = set(self.slot_of.values())
            slot = next(s for s in range(self.n_slots) if s not in used)
        self.slot_of[frame] = slot
        return slot

    def slot_pos(self) -> list[int]:
        out = [-1] * self.n_slots
        for f, s in self.slot_of.items():
            out[s] = f
        return out


def _pad(segments, attended, n_seg):
    segments += [(0, 0, 0)] * (n_seg - len(segments))
    attended += [-2] * (n_seg - len(attended))


# ----------------------------------------------------------------------------------------------------
# Dense window (Self-Forcing baseline) and attention sink


@dataclass(frozen=True)
class DenseWindow:
    """Attend to the last ``window`` frames (current chunk included), plus the first ``sink`` frames kept forever.

    ``rerotate=False`` (Self-Forcing): keys keep their true positions. ``rerotate=True`` (Relax code's
    baselines): the memory is re-rotated at consecutive positions ending at the chunk's last frame.
    """

    window: int = 21
    sink: int = 0
    chunk_frames: int = 3
    rerotate: bool = False

    def __post_init__(self):
        if self.chunk_frames < 1 or self.sink < 0 or self.window < self.chunk_frames + self.sink:
            raise ValueError(
                f"DenseWindow: expected window >= chunk_frames + sink >= 1, got window={self.window}, "
                f"sink={self.sink}, chunk_frames={self.chunk_frames}"
            )

    def planner(self, height: int, width: int) -> "DensePlanner":
        return DensePlanner(self, height * width)


class DensePlanner:
    def __init__(self, policy: DenseWindow, frame_tokens: int):
        self.policy, self.f = policy, frame_tokens
        self.n_slots = policy.window
        self.n_rows = self.n_slots * frame_tokens
        self.n_seg = policy.window
        self.slots = _SlotMap(self.n_slots)

    def plan(self, n: int) -> ChunkPlan:
        p, f = self.policy, self.f
        u, c = p.chunk_frames, n * p.chunk_frames
        recent = p.window - u - p.sink
        memory = list(range(min(p.sink, c))) + list(range(max(p.sink, c - recent), c))
        evicted = self.slots.keep_only(memory)
        current = [self.slots.place(c + i) for i in range(u)]
        frames = memory + list(range(c, c + u))
        first = c + u - len(frames)
        segments = [
            (self.slots.slot_of[fr] * f, f, (first + i - fr) if p.rerotate and fr < c else 0)
            for i, fr in enumerate(frames)
        ]
        attended = list(frames)
        _pad(segments, attended, self.n_seg)
        return ChunkPlan(n, c, current, list(range(c, c + u)), segments, attended, evicted, self.slots.slot_pos())


# ----------------------------------------------------------------------------------------------------
# Relax Forcing


@dataclass(frozen=True)
class RelaxMemory:
    """Relax Forcing memory (DESIGN.md 4.2): Sink + selected History + Tail + current chunk.

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

    def __post_init__(self):
        if min(self.sink, self.tail) < 0 or self.history < 1 or self.candidates < 1 or self.chunk_frames < 1:
            raise ValueError(f"RelaxMemory: expected sink, tail >= 0 and history, candidates, chunk_frames >= 1, got {self}")
        if self.reservoir < self.sink + self.tail + 2 + self.chunk_frames:
            raise ValueError(f"RelaxMemory: reservoir: expected >= sink + tail + 2 + chunk_frames, got {self.reservoir}")
        if not math.isfinite(self.lam):
            raise ValueError(f"RelaxMemory: lam: expected a finite number, got {self.lam}")

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
        kept = set()
        for later in range(n, n + horizon):
            kept.update(fr for fr in self.read_frames(later) if fr < c)
        return sorted(kept)

    def num_slots(self) -> int:
        """Frame slots a cache needs: the largest kept set plus the current chunk, over the whole fill-up."""
        span = 3 * (self.reservoir // self.chunk_frames + 2)
        return max(len(self.kept_frames(n)) for n in range(span)) + self.chunk_frames


class RelaxPlanner:
    def __init__(self, policy: RelaxMemory, frame_tokens: int):
        self.policy, self.f = policy, frame_tokens
        self.n_slots = _relax_num_slots(policy)
        self.n_rows = self.n_slots * frame_tokens
        self.n_seg = policy.sink + policy.tail + max(1, policy.history) + policy.chunk_frames
        self.slots = _SlotMap(self.n_slots)

    def plan(self, n: int) -> ChunkPlan:
        p, f = self.policy, self.f
        u, c = p.chunk_frames, n * p.chunk_frames
        evicted = self.slots.keep_only(p.kept_frames(n))
        current = [self.slots.place(c + i) for i in range(u)]
        slot_of = self.slots.slot_of
        mem = p.reservoir_frames(n)
        roles = relax_roles(len(mem), p.sink, p.tail, p.candidates)
        segments, attended, job = [], [], None
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
            job = RelaxJob(
                [slot_of[fr] for fr in sink], [slot_of[fr] for fr in tail], [slot_of[fr] for fr in cands], cands,
                hist_pos if not p.contiguous_rope else [0] * h, len(sink),
            )
        _pad(segments, attended, self.n_seg)
        return ChunkPlan(n, c, current, list(range(c, c + u)), segments, attended, evicted, self.slots.slot_pos(), relax=job)


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


# ----------------------------------------------------------------------------------------------------
# PackForcing


@dataclass(frozen=True)
class PackMemory:
    """PackForcing memory (DESIGN.md 4.3): full-resolution Sink and Recent, compressed top-k Mid blocks.

    Args:
        block_frames: B_f, the generation chunk and the memory unit (latent frames).
        sink_frames: N_sink (a multiple of block_frames). recent_frames: N_recent (one block).
        top_k: N_top mid blocks attended. archive: mid blocks kept compressed (oldest evicted).
        q_stride: query subsample stride for the affinity.
    """

    block_frames: int = 4
    sink_frames: int = 8
    recent_frames: int = 4
    top_k: int = 16
    archive: int = 64
    q_stride: int = 8

    def __post_init__(self):
        b = self.block_frames
        if b < 2 or self.sink_frames % b or self.recent_frames != b or self.top_k < 1 or self.archive < self.top_k:
            raise ValueError(
                "PackMemory: expected block_frames >= 2, sink_frames a multiple of it, recent_frames == "
                f"block_frames, 1 <= top_k <= archive, got {self}"
            )

    @property
    def chunk_frames(self) -> int:
        return self.block_frames

    def planner(self, height: int, width: int) -> "PackPlanner":
        return PackPlanner(self, height, width)


class PackPlanner:
    def __init__(self, policy: PackMemory, height: int, width: int):
        self.policy, self.f = policy, height * width
        b = policy.block_frames
        self.block_tokens = math.prod(compressed_grid(b, height, width))
        self.sink_blocks = policy.sink_frames // b
        self.n_slots = policy.sink_frames + 2 * b  # sink, then a ring of two blocks (recent, current)
        self.n_blocks = policy.archive + 2  # archive ring: mid blocks, recent, current
        self.row0 = self.n_slots * self.f
        self.n_rows = self.row0 + self.n_blocks * self.block_tokens
        self.n_seg = policy.sink_frames + policy.top_k + policy.recent_frames + b
        self.slots = _SlotMap(self.n_slots)
        self.block_pos = [-1] * self.n_blocks

    def plan(self, n: int) -> ChunkPlan:
        p, f, b = self.policy, self.f, self.policy.block_frames
        c = n * b
        sink = list(range(min(n, self.sink_blocks)))
        recent = [n - 1] if n - 1 >= self.sink_blocks else []
        mid = list(range(max(self.sink_blocks, n - 1 - p.archive), n - 1))
        k = min(p.top_k, len(mid))
        keep = [blk * b + i for blk in sink + recent for i in range(b)]
        evicted = self.slots.keep_only(keep)
        ring = self.sink_blocks * b + b * (n % 2)
        current = [self.slots.place(c + i, None if n < self.sink_blocks else ring + i) for i in range(b)]
        order = sink + [-1] * k + recent  # blocks before the current one, packed to end at c - 1
        start = {i: c - b * (len(order) - i) for i in range(len(order))}
        segments, attended = [], []
        for i, blk in enumerate(order):
            if blk >= 0:
                for j in range(b):
                    fr = blk * b + j
                    segments.append((self.slots.slot_of[fr] * f, f, start[i] + j - fr))
                    attended.append(fr)
        seg_index = len(sink) * b
        segments[seg_index:seg_index] = [(0, 0, 0)] * k  # written by mid_select
        attended[seg_index:seg_index] = [-1] * k
        segments += [(slot * f, f, 0) for slot in current]
        attended += list(range(c, c + b))
        block_slot = None
        if n >= self.sink_blocks:
            block_slot = (n - self.sink_blocks) % self.n_blocks
            self.block_pos[block_slot] = c
        job = PackJob(
            [(m - self.sink_blocks) % self.n_blocks for m in mid], mid,
            [start[len(sink) + j] for j in range(k)], seg_index, block_slot,
        )
        _pad(segments, attended, self.n_seg)
        plan = ChunkPlan(n, c, current, list(range(c, c + b)), segments, attended, evicted, self.slots.slot_pos(), pack=job)
        plan.block_pos = list(self.block_pos)
        return plan
