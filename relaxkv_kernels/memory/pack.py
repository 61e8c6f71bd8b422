"""PackForcing memory: full-resolution Sink and Recent, top-k of the 2x4x4-compressed Mid blocks."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..geometry import POOL_T
from ..geometry import POOL_X
from ..geometry import POOL_Y
from ..geometry import compressed_grid
from ..ops.compress_kv.op import compress_kv_op
from ..ops.mid_select.op import mid_select_op
from .base import CacheGeometry
from .base import ChunkPlan
from .base import MemoryPolicy
from .base import Planner
from .base import StepContext
from .base import host_field
from .base import pad


@dataclass
class PackIndex:
    """Inputs of ``mid_select`` and ``compress_kv`` for one chunk: the lists uploaded by the cache every chunk (empty:
    step not run), and on the host the mid blocks and the first mid row."""

    block_pos: list[int]  # first-frame position per archive slot (-1: empty)
    block_slot: list[int]  # [1] archive slot receiving the current block, or [] for a sink block (full resolution only)
    block_t0: list[int]  # [1] first frame of the current block, or []
    mid_slots: list[int]  # archive slots, oldest first ([] when no mid block exists yet)
    mid_target_pos: list[int]  # re-packed first-frame position of each selected block
    mid_blocks: list[int] = host_field(default_factory=list)  # block indices of mid_slots
    seg_index: int = host_field(default=0)  # the segment-table row of the first selected block


@dataclass(frozen=True)
class PackMemory(MemoryPolicy):
    """PackForcing memory (docs/pages/design.md): full-resolution Sink and Recent, compressed top-k Mid blocks.

    Args:
        block_frames: B_f, the generation chunk and the memory unit (latent frames).
        sink_frames: N_sink (a multiple of block_frames). recent_frames: N_recent (one block).
        top_k: N_top mid blocks attended. archive: mid blocks kept compressed (oldest evicted).
        q_stride: query subsample stride for the affinity.
        batch_mean: the paper's rule (the affinity averaged over the batch, one choice for every sample)
            instead of a choice per sample.
    """

    block_frames: int = 4
    sink_frames: int = 8
    recent_frames: int = 4
    top_k: int = 16
    archive: int = 64
    q_stride: int = 8
    batch_mean: bool = False

    def __post_init__(self):
        super().__post_init__()  # types and bounds() first: block_frames >= 2 below
        if self.sink_frames % self.block_frames:
            raise ValueError(f"PackMemory: sink_frames: expected a multiple of block_frames = {self.block_frames}, "
                             f"got {self.sink_frames}")

    def bounds(self) -> dict[str, tuple[int | None, int | None]]:
        b = self.block_frames
        return {"block_frames": (POOL_T, None), "sink_frames": (0, None), "recent_frames": (b, b), "top_k": (1, None),
                "archive": (self.top_k, None), "q_stride": (1, None)}

    @property
    def chunk_frames(self) -> int:
        return self.block_frames

    def planner(self, height: int, width: int) -> "PackPlanner":
        return PackPlanner(self, height, width)


class PackPlanner(Planner):
    """Sink frames, then a ring of two blocks (recent, current); the compressed archive after all frame slots.

    The current block is compressed into its archive slot at every pass (``append``, its refresh pass
    writes the final copy); ``select_layer`` picks the mid blocks of each layer at its first pass.
    """

    selection = "per_layer"  # each layer picks its own mid blocks

    def __init__(self, policy: PackMemory, height: int, width: int):
        f, b = height * width, policy.block_frames
        self.grid = (height, width)
        self.block_tokens = math.prod(compressed_grid(b, height, width))
        if not self.block_tokens:
            raise ValueError(f"PackMemory: a {height}x{width} token grid is smaller than the {POOL_Y}x{POOL_X} pooling "
                             "window of the compressed mid blocks: they would hold no token (expected height >= "
                             f"{POOL_Y} and width >= {POOL_X})")
        self.sink_blocks = policy.sink_frames // b
        n_slots = policy.sink_frames + 2 * b  # sink, then a ring of two blocks (recent, current)
        self.n_blocks = policy.archive + 2  # archive ring: mid blocks, recent, current
        self.row0 = n_slots * f
        n_seg = policy.sink_frames + policy.top_k + policy.recent_frames + b
        max_keys = (policy.sink_frames + policy.recent_frames + b) * f + policy.top_k * self.block_tokens
        super().__init__(f, n_slots, self.row0 + self.n_blocks * self.block_tokens, n_seg, max_keys)
        self.policy = policy
        self.block_pos = [-1] * self.n_blocks

    def plan(self, n: int) -> ChunkPlan:
        p, f, b = self.policy, self.frame_tokens, self.policy.block_frames
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
        n_memory = len(segments)
        segments += [(slot * f, f, 0) for slot in current]
        attended += list(range(c, c + b))
        block_slot = None
        if n >= self.sink_blocks:
            block_slot = (n - self.sink_blocks) % self.n_blocks
            self.block_pos[block_slot] = c
        has_block = block_slot is not None
        index = PackIndex(list(self.block_pos), [block_slot] if has_block else [], [c] if has_block else [],
                          [(m - self.sink_blocks) % self.n_blocks for m in mid],
                          [start[len(sink) + j] for j in range(k)], mid, seg_index)
        pad(segments, attended, self.n_seg)
        plan = ChunkPlan(n, c, current, list(range(c, c + b)), segments, attended, evicted, self.slots.slot_pos(),
                         n_memory_seg=n_memory, index=index)
        if k:
            plan.selects, plan.selected_keys = True, k * self.block_tokens
        return plan

    def check_heads(self, num_heads: int) -> None:
        if num_heads < 2:  # H // 2 = 0 heads would give a NaN affinity and always the oldest block
            raise ValueError(f"PackMemory: num_heads: expected at least 2 attention heads (the Mid selection scores "
                             f"blocks over the first H // 2 heads), got {num_heads}")

    def allocate(self, geometry: CacheGeometry) -> dict[str, torch.Tensor]:
        g = geometry
        shape = (g.num_layers, g.batch, self.n_blocks, g.num_heads, g.head_dim)
        return {"mean_key": torch.empty(shape, dtype=torch.float32, device=g.device)}

    def select_layer(self, step: StepContext, q: torch.Tensor) -> None:
        """mid_select at each layer's first pass: that layer's mid-block rows, per sample (or batch-averaged).

        Head-parallel (``step.heads``): the subsampled queries and the mean keys are gathered over the ranks' heads
        first, so every rank scores all heads as a single process does and chooses the same blocks."""
        i = step.index
        stride, mean_key = min(self.policy.q_stride, q.shape[1]), step.state["mean_key"]
        if step.heads is not None:
            q, mean_key, stride = step.heads.gather_heads(q[:, ::stride], 2), step.heads.gather_heads(mean_key, 2), 1
        mid_select_op(q, mean_key, i.mid_slots, i.block_pos, step.seg, i.seg_index, i.mid_target_pos,
                      self.row0, self.block_tokens, stride, self.policy.batch_mean, step.backend, checked=True)

    def append(self, step: StepContext, k: torch.Tensor, v: torch.Tensor) -> None:
        """compress_kv of the current block into its archive slot (the refresh pass writes the final copy)."""
        i = step.index
        if not i.block_slot.numel():  # sink blocks are kept at full resolution only (a shape: no guard on the slot)
            return
        compress_kv_op(k, v, step.k_pool, step.v_pool, step.state["mean_key"], i.block_slot, i.block_t0, self.row0,
                       self.policy.block_frames, *self.grid, step.backend, step.k_scale, step.v_scale, checked=True)

    def rewrite_index(self, frames: list[int]) -> PackIndex:
        """A rewrite of a non-sink block recompresses it into its archive slot (its mean key too): all its frames, at
        once; sink blocks have no compressed copy."""
        b = self.policy.block_frames
        t0 = frames[0] // b * b
        if t0 not in self.block_pos:
            return PackIndex(list(self.block_pos), [], [], [], [])
        if frames != list(range(t0, t0 + b)):
            raise ValueError(f"PackMemory: a rewrite of block {t0 // b} (frames {t0} to {t0 + b - 1}) takes all its "
                             f"{b} frames, its compressed copy is made of them all; got {frames}")
        return PackIndex(list(self.block_pos), [self.block_pos.index(t0)], [t0], [], [])

    def frame_of_row(self, plan: ChunkPlan, start_row: int) -> int:
        if start_row < self.row0:
            return super().frame_of_row(plan, start_row)
        return plan.index.block_pos[(start_row - self.row0) // self.block_tokens]  # a compressed block: its first frame

    def live_rows(self) -> int:
        return super().live_rows() + sum(pos >= 0 for pos in self.block_pos) * self.block_tokens
