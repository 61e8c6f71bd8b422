"""What a memory policy is: a frozen config, a host-side planner, and the planner's device steps.

A policy (``MemoryPolicy``) makes a :class:`Planner` per cache. The planner decides, for every chunk and
from the chunk index alone (it never reads device memory), the cache slot of each new frame, what is
evicted and the segment table: one ``(start_row, length, delta)`` row per attended run of pool rows,
in the order memory, then the chunk's own frames, then padding. Entries whose content depends on the
data (Relax's history frame, Pack's mid blocks) are left for the planner's device step
(:meth:`Planner.select`): a selection kernel run at the first pass of layer 0 (``selection = "layer0"``,
one choice for every layer) or of each layer (``"per_layer"``) of the chunks whose plan ``selects``;
:meth:`Planner.append` runs after every cache write (Pack compresses the current block there). ``KVCache`` runs these steps for any policy: a new policy is a new file.

Frame slot ``s`` owns pool rows ``s * F .. s * F + F - 1``; a planner may put other rows after the
frame slots (Pack's compressed blocks). In steady state every table a planner produces keeps its
shape from chunk to chunk, so a chunk step can be captured in a CUDA graph.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ChunkPlan:
    """Everything about one chunk that the host knows before it runs.

    ``segments`` rows are (start_row, length, delta) for every batch element: ``segments[:n_memory_seg]``
    are the memory (entries of length 0 reserved for the device step are filled on the device),
    the next ``len(frame_slot)`` are the chunk's frames at delta 0, the rest is padding (0, 0, 0).
    ``frames_attended`` lists the frame index of each segment (-1: chosen on the device, -2: unused).
    """

    chunk: int
    start_frame: int
    frame_slot: list[int]
    frame_pos: list[int]
    segments: list[tuple[int, int, int]]
    frames_attended: list[int]
    evicted: list[int]
    slot_pos: list[int]  # true frame position stored in each slot (-1: empty)
    n_memory_seg: int
    job: object | None = None  # the policy's inputs of its device steps (RelaxJob, PackJob, ...)
    selects: bool = False  # this chunk runs Planner.select (see Planner.selection)
    selected_keys: int = 0  # keys per batch element the device step adds to the static segments
    index: dict[str, list[int]] = field(default_factory=dict)  # device index tensors of the steps

    def memory_keys(self) -> int:
        """Keys per batch element before the chunk's own frames (static memory + selections)."""
        return sum(length for _, length, _ in self.segments[: self.n_memory_seg]) + self.selected_keys

    def total_keys(self) -> int:
        """Keys per batch element the chunk attends to, its own frames included."""
        return sum(length for _, length, _ in self.segments) + self.selected_keys

    def pool_prefix(self) -> int | None:
        """``total_keys()`` when the chunk's keys are exactly the pool rows ``[0, total)`` at delta 0, else None.

        Softmax attention has no mask, so key order does not matter: such a chunk can attend to the
        pool's first rows directly, without gathering them (a dense window without re-rotation).
        """
        if self.selects or any(delta for _, length, delta in self.segments if length):
            return None
        end = 0
        for start, length in sorted((start, length) for start, length, _ in self.segments if length):
            if start != end:
                return None
            end += length
        return end


class SlotMap:
    """Frame -> slot map with a free list (lowest free slot first, deterministic)."""

    def __init__(self, n_slots: int):
        self.n_slots = n_slots
        self.slot_of: dict[int, int] = {}

    def keep_only(self, frames) -> list[int]:
        """Evict every frame not in ``frames``; returns the evicted frames, sorted."""
        frames = set(frames)
        evicted = sorted(f for f in self.slot_of if f not in frames)
        for f in evicted:
            del self.slot_of[f]
        return evicted

    def place(self, frame: int, slot: int | None = None) -> int:
        """The slot of ``frame``: ``slot`` when given, its slot when already placed (re-planning), else the lowest free one."""
        if slot is None and frame in self.slot_of:
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


def pad(segments: list, attended: list, n_seg: int) -> None:
    """Pad a segment table and its frame list to ``n_seg`` entries (fixed shapes for CUDA graphs)."""
    segments += [(0, 0, 0)] * (n_seg - len(segments))
    attended += [-2] * (n_seg - len(attended))


class Planner:
    """Host side of a memory policy for one cache, and the policy's device steps.

    Subclasses set the sizes in ``__init__`` and implement :meth:`plan`; policies with a data-dependent
    choice set ``selection`` and implement :meth:`select`.

    Attributes:
        frame_tokens: F. n_slots: frame slots. n_rows: pool rows (>= n_slots * F). n_seg: segment-table rows.
        max_keys: the most keys any chunk attends to (sizes the attention windows).
        selection: None, "layer0" (one device choice at layer 0's first pass, one segment table for every
            layer) or "per_layer" (each layer chooses at its first pass, one segment table per layer).
        needs_prototypes: layer 0's cache write records per-frame prototypes (``cache.proto``).
        gathers: a chunk's keys may differ from a pool prefix at delta 0 (``ChunkPlan.pool_prefix``), so
            the cache's window modes need windows; False: attention reads the pool, no window is allocated.
        slots: the :class:`SlotMap` of frames held.
    """

    selection: str | None = None
    needs_prototypes = False
    gathers = True

    def __init__(self, frame_tokens: int, n_slots: int, n_rows: int, n_seg: int, max_keys: int):
        self.frame_tokens, self.n_slots, self.n_rows, self.n_seg, self.max_keys = (
            frame_tokens, n_slots, n_rows, n_seg, max_keys)
        self.slots = SlotMap(n_slots)

    def plan(self, n: int) -> ChunkPlan:
        """The plan of chunk ``n`` (host only)."""
        raise NotImplementedError

    def allocate(self, cache) -> dict[str, torch.Tensor]:
        """Extra device state of the policy, all layers (e.g. Pack's mean keys); in ``cache.state``."""
        return {}

    def select(self, cache, plan: ChunkPlan, layer: int, q: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        """Device step at the first pass of ``layer`` (see ``selection``): fill the reserved rows of ``seg``.

        ``q``: the pre-RoPE queries [B, U*F, H, D]. Returns the scores (kept in ``cache.last_scores``).
        """
        raise NotImplementedError(f"{type(self).__name__}: plan.selects is set but select() is not implemented")

    def append(self, cache, plan: ChunkPlan, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Device step after every cache write of ``layer`` (k, v: the pre-RoPE keys and values of the chunk)."""

    def frame_of_row(self, plan: ChunkPlan, start_row: int) -> int:
        """The frame a selected segment starting at ``start_row`` shows (for inspection)."""
        return plan.slot_pos[start_row // self.frame_tokens]

    def live_rows(self) -> int:
        """Pool rows holding frames (or compressed blocks) that can still be read."""
        return len(self.slots.slot_of) * self.frame_tokens


class MemoryPolicy:
    """A memory policy: a small frozen config (``chunk_frames`` latent frames per chunk) that makes a
    :class:`Planner` per cache for frames of ``height`` x ``width`` tokens."""

    chunk_frames: int

    def planner(self, height: int, width: int) -> Planner:
        raise NotImplementedError
