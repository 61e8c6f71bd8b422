"""What a memory policy is: a frozen config, a host-side planner, and the planner's device steps.

A policy (``MemoryPolicy``) makes a :class:`Planner` per cache. The planner decides, for every chunk and
from the chunk index alone (it never reads device memory), the cache slot of each new frame, what is
evicted and the segment table: one ``(start_row, length, delta)`` row per attended run of pool rows,
in the order memory, then the chunk's own frames, then padding. Entries whose content depends on the
data (Relax's history frame, Pack's mid blocks) are left for the planner's device steps, which see a
typed :class:`StepContext` (the plan, its index tensors on the device, the table they write, the layer's
pools and policy state), never the cache:

- :meth:`Planner.select_chunk` (``selection = "chunk"``): once per chunk, at ``begin_chunk``, from what
  the cache already holds (Relax scores stored prototypes); one table for every layer, so the order in
  which layers are called does not matter;
- :meth:`Planner.select_layer` (``selection = "per_layer"``): at each layer's first pass of the chunk,
  from that layer's queries (Pack's affinity); one table per layer;
- :meth:`Planner.append`: after every cache write of a layer (Pack compresses the current block there);
- :meth:`Planner.commit`: once the chunk's (or a rewrite's) rows are in the pool (a head-parallel cache averages
  the new prototypes over the ranks there).

Frame slot ``s`` owns pool rows ``s * F .. s * F + F - 1``; a planner may put other rows after the
frame slots (Pack's compressed blocks). In steady state every table a planner produces keeps its
shape from chunk to chunk, so a chunk step can be captured in a CUDA graph.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch

from ..ops.checks import check_int
from .heads import HeadShards


@dataclass(frozen=True)
class CacheGeometry:
    """What a planner knows of the cache it serves: model geometry, compute dtype, pool dtype and device.

    ``dtype`` is the dtype of q/k/v, the windows and the attention; ``kv_dtype`` that of the K/V pools (None: the
    same; an FP8 dtype: codes with fp32 scales per row and head, ``relaxkv_kernels.ops.fp8``).
    """

    num_layers: int
    batch: int
    num_heads: int
    head_dim: int
    height: int
    width: int
    dtype: torch.dtype
    device: torch.device
    kv_dtype: torch.dtype | None = None

    @property
    def pool_dtype(self) -> torch.dtype:
        return self.kv_dtype or self.dtype

    @property
    def frame_tokens(self) -> int:
        return self.height * self.width


def host_field(**kwargs) -> dataclasses.Field:
    """A field of a plan's ``index`` record that stays on the host: the cache uploads every other field (``kwargs``:
    those of ``dataclasses.field``). For what the device steps need as Python values (e.g. the first segment row
    they write) or what only the host reads (e.g. the frames behind the slots)."""
    return dataclasses.field(metadata={"upload": False}, **kwargs)


@functools.cache
def uploaded_fields(cls: type) -> tuple[str, ...]:
    """The fields of an ``index`` record class that the cache uploads (lists of ints): all but :func:`host_field`
    ones."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("upload", True))


@functools.cache
def host_fields(cls: type) -> tuple[str, ...]:
    """The :func:`host_field` fields of an ``index`` record class (the ones the cache does not upload)."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in uploaded_fields(cls))


@dataclass
class ChunkPlan:
    """Everything about one chunk that the host knows before it runs.

    ``segments`` rows are (start_row, length, delta) for every batch element: ``segments[:n_memory_seg]``
    are the memory (entries of length 0 reserved for the device step are filled on the device),
    the next ``len(frame_slot)`` are the chunk's frames at delta 0, the rest is padding (0, 0, 0).
    ``frames_attended`` lists the frame index of each segment (-1: chosen on the device, -2: unused).
    ``index`` is the policy's one record of its device steps' inputs (``RelaxIndex``, ``PackIndex``, your own): a
    dataclass of ``list[int]`` fields, which the cache uploads as int64 device tensors (``StepContext.index``: the
    same dataclass, refreshed in place while the shapes hold), and of :func:`host_field` fields it leaves as they
    are.
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
    selects: bool = False  # this chunk runs the planner's selection (see Planner.selection)
    selected_keys: int = 0  # keys per batch element the device step adds to the static segments
    index: object | None = None  # the device steps' inputs: a dataclass of list[int] (uploaded) and host fields

    def memory_keys(self) -> int:
        """Keys per batch element before the chunk's own frames (static memory + selections)."""
        return sum(length for _, length, _ in self.segments[: self.n_memory_seg]) + self.selected_keys

    def total_keys(self) -> int:
        """Keys per batch element the chunk attends to, its own frames included."""
        return sum(length for _, length, _ in self.segments) + self.selected_keys

    def device_rows(self) -> list[int]:
        """The segment rows a device step fills (``frames_attended`` -1), in table order."""
        return [i for i, frame in enumerate(self.frames_attended) if frame == -1]

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


@dataclass(frozen=True)
class StepContext:
    """What a planner's device step sees: the chunk's plan, its index tensors, the table it writes, the storage.

    Attributes:
        plan: the chunk's host plan. index: ``plan.index`` with its uploaded fields as int64 device tensors (same
            dataclass; :func:`host_field` fields as they are).
        seg: int32 [B, n_seg, 3], the segment table of this step (the one table of every layer for
            ``selection = "chunk"``, the layer's own for ``"per_layer"``).
        layer: the layer (None at the chunk step).
        k_pool, v_pool: the layer's pools [B, n_rows, H, D] (None at the chunk step).
        k_scale, v_scale: float32 [B, n_rows, H], the scales of FP8 pools (``relaxkv_kernels.ops.fp8``); None for
            pools in the compute dtype and at the chunk step. A step writing pool rows passes them to the op.
        state: the policy state of :meth:`Planner.allocate`, the layer's slice of each tensor (whole
            tensors at the chunk step).
        proto: float32 [B, n_slots, D] per-frame prototypes, or None: layer 0's pre-RoPE keys averaged over
            the frame's tokens, then over heads, not normalised. Only frames before the chunk are certain
            to be there (the chunk's own slots may still hold an older frame's until ``end_chunk``).
        backend: the ops' backend.
        heads: the :class:`~relaxkv_kernels.memory.heads.HeadShards` of a head-parallel cache (pools, state and
            queries hold this rank's heads only; a step reading all heads gathers them), or None.
        frame_slot: int64 [U], the pool slots of the chunk's frames on the device (``plan.frame_slot``), or None.
    """

    plan: ChunkPlan
    index: object | None
    seg: torch.Tensor
    layer: int | None
    k_pool: torch.Tensor | None
    v_pool: torch.Tensor | None
    state: dict[str, torch.Tensor]
    proto: torch.Tensor | None
    backend: str
    heads: HeadShards | None = None
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None
    frame_slot: torch.Tensor | None = None


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
        """The slot of ``frame``: ``slot`` when given, its slot when already placed (re-planning), else the lowest
        free one."""
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
    choice set ``selection`` and implement :meth:`select_chunk` or :meth:`select_layer`.

    Attributes:
        frame_tokens: F. n_slots: frame slots. n_rows: pool rows (>= n_slots * F). n_seg: segment-table rows.
        max_keys: the most keys any chunk attends to (sizes the attention windows).
        selection: None, "chunk" (:meth:`select_chunk` once per chunk at ``begin_chunk``, one segment table
            for every layer) or "per_layer" (:meth:`select_layer` at each layer's first pass, one segment
            table per layer).
        needs_prototypes: layer 0's cache write records per-frame prototypes (``StepContext.proto``).
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

    def check_heads(self, num_heads: int) -> None:
        """ValueError when the policy cannot serve a model of ``num_heads`` attention heads (all ranks together);
        called when a cache is made, before any allocation."""

    def allocate(self, geometry: CacheGeometry) -> dict[str, torch.Tensor]:
        """Extra device state of the policy, every tensor ``[num_layers, ...]`` (e.g. Pack's mean keys)."""
        return {}

    def select_chunk(self, step: StepContext) -> None:
        """``selection = "chunk"``: fill the reserved rows of ``step.seg`` from stored data, at ``begin_chunk``."""
        raise NotImplementedError(f"{type(self).__name__}: selection is 'chunk' but select_chunk() is not implemented")

    def select_layer(self, step: StepContext, q: torch.Tensor) -> None:
        """``selection = "per_layer"``: fill the reserved rows of the layer's ``step.seg`` at its first pass.

        ``q``: the layer's pre-RoPE queries [B, U*F, H, D].
        """
        raise NotImplementedError(f"{type(self).__name__}: selection is 'per_layer' but select_layer() is not "
                                  "implemented")

    def append(self, step: StepContext, k: torch.Tensor, v: torch.Tensor) -> None:
        """Device step after every cache write of ``step.layer`` (k, v: the chunk's pre-RoPE keys and values)."""

    def commit(self, step: StepContext) -> None:
        """At ``end_chunk`` and ``end_rewrite``, once the pass's rows are in the pool (``step``: the chunk step's).

        A head-parallel cache (``step.heads``) records each rank's prototypes as a mean over that rank's heads; here
        the prototypes of the chunk's frames become their mean over all heads (one ``all_reduce``), before any
        scoring reads them, so every rank chooses the same frames. A planner with more per-head state to share
        extends it."""
        if step.heads is not None and step.proto is not None:
            step.proto[:, step.frame_slot] = step.heads.mean_(step.proto[:, step.frame_slot])

    def readable_frames(self, plan: ChunkPlan) -> list[int]:
        """Frames before ``plan``'s chunk that it may read at full resolution, sorted: its memory segments' frames,
        and those a device step may choose (a planner with device-chosen frames adds them). A re-cache "attended"
        rewrites these; a rewrite attends to those of earlier chunks."""
        return sorted({fr for fr in plan.frames_attended[: plan.n_memory_seg] if fr >= 0})

    def recent_frames(self, plan: ChunkPlan) -> list[int]:
        """The frames a re-cache "recent" rewrites before ``plan``'s chunk: the readable frames of the chunk before it
        (a planner with a longer recent window widens it)."""
        return [fr for fr in self.readable_frames(plan) if fr >= plan.start_frame - len(plan.frame_slot)]

    def rewrite_index(self, frames: list[int]) -> object | None:
        """The ``index`` (as ``ChunkPlan.index``) of a rewrite of ``frames`` (held, of one chunk) for the planner's
        :meth:`append` step, e.g. Pack's compressed copy of their block; None: a planner without one. ValueError
        for frames the policy cannot rewrite alone."""
        return None

    def frame_of_row(self, plan: ChunkPlan, start_row: int) -> int:
        """The frame a selected segment starting at ``start_row`` shows (for inspection)."""
        return plan.slot_pos[start_row // self.frame_tokens]

    def live_rows(self) -> int:
        """Pool rows holding frames (or compressed blocks) that can still be read."""
        return len(self.slots.slot_of) * self.frame_tokens


_FIELD_TYPES = {"int": int, "float": float, "bool": bool}


class MemoryPolicy:
    """A memory policy: a small frozen config (``chunk_frames`` latent frames per chunk) that makes a
    :class:`Planner` per cache for frames of ``height`` x ``width`` tokens.

    A dataclass policy gets its ``int``, ``float`` and ``bool`` fields type-checked at construction
    (``check_fields``, called by ``__post_init__``), then the ranges its :meth:`bounds` gives.
    """

    chunk_frames: int

    def __post_init__(self):
        self.check_fields()
        for field, (low, high) in self.bounds().items():
            check_int(type(self).__name__, field, getattr(self, field), low=low, high=high)

    def bounds(self) -> dict[str, tuple[int | None, int | None]]:
        """(low, high) of the policy's int fields (None: open), checked at construction after their types."""
        return {}

    def check_fields(self) -> None:
        """TypeError naming the field whose value is not of its declared type (int, float or bool)."""
        name = type(self).__name__
        for f in dataclasses.fields(self) if dataclasses.is_dataclass(self) else ():
            want = _FIELD_TYPES.get(f.type if isinstance(f.type, str) else getattr(f.type, "__name__", ""))
            value = getattr(self, f.name)
            if want is bool:
                ok = isinstance(value, bool)
            elif want is int:
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif want is float:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
                if ok and not math.isfinite(value):
                    raise ValueError(f"{name}: {f.name}: expected a finite number, got {value}")
            else:
                continue
            if not ok:
                kind = "a number" if want is float else f"{'a' if want is bool else 'an'} {want.__name__}"
                raise TypeError(f"{name}: {f.name}: expected {kind}, got {value!r} ({type(value).__name__})")

    def planner(self, height: int, width: int) -> Planner:
        """The :class:`Planner` of a cache whose frames have ``height`` x ``width`` tokens (every policy makes one)."""
        raise NotImplementedError(f"{type(self).__name__}: a MemoryPolicy must implement planner(height, width), "
                                  "returning the Planner that plans its chunks (see relaxkv_kernels.memory)")
