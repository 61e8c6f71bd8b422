"""Dense window (Self-Forcing baseline) and the attention-sink baseline."""
from __future__ import annotations

from dataclasses import dataclass

from .base import ChunkPlan
from .base import MemoryPolicy
from .base import Planner
from .base import pad


@dataclass(frozen=True)
class DenseWindow(MemoryPolicy):
    """Attend to the last ``window`` frames (current chunk included), plus the first ``sink`` frames kept forever.

    ``rerotate=False`` (Self-Forcing): keys keep their true positions. ``rerotate=True`` (Relax code's
    baselines): the memory is re-rotated at consecutive positions ending at the chunk's last frame.
    """

    window: int = 21
    sink: int = 0
    chunk_frames: int = 3
    rerotate: bool = False

    def bounds(self) -> dict[str, tuple[int | None, int | None]]:
        return {"chunk_frames": (1, None), "sink": (0, None), "window": (self.chunk_frames + self.sink, None)}

    def planner(self, height: int, width: int) -> "DensePlanner":
        return DensePlanner(self, height * width)


class DensePlanner(Planner):
    """One slot per frame of the window; the slots a chunk evicts are the ones its frames take (a ring).

    Without re-rotation every attended key sits at its true position and the pool holds exactly the
    window, so the chunk's keys are the pool's first ``n * F`` rows in some order: attention (softmax
    has no mask) can read the pool as it is, with no gather (``ChunkPlan.pool_prefix``).
    """

    def __init__(self, policy: DenseWindow, frame_tokens: int):
        w = policy.window
        super().__init__(frame_tokens, n_slots=w, n_rows=w * frame_tokens, n_seg=w, max_keys=w * frame_tokens)
        self.policy = policy
        self.gathers = policy.rerotate  # without re-rotation every chunk is a pool prefix

    def recent_frames(self, plan: ChunkPlan) -> list[int]:
        """The whole window after the sink (LongLive's local window)."""
        return [fr for fr in self.readable_frames(plan) if fr >= self.policy.sink]

    def plan(self, n: int) -> ChunkPlan:
        p, f = self.policy, self.frame_tokens
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
        pad(segments, attended, self.n_seg)
        return ChunkPlan(n, c, current, list(range(c, c + u)), segments, attended, evicted, self.slots.slot_pos(),
                         n_memory_seg=len(memory))
