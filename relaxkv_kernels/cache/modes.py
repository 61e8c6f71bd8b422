"""How the calls of a chunk attend: one small strategy object per attention mode.

A mode owns its windows, writes a pass's K/V where its calls read them (``rope_append``), stages the memory, runs
the attention and commits the chunk's rows at ``end_chunk``. ``KVCache`` builds one with :func:`make_mode`
and asks it per chunk (:meth:`AttentionMode.for_chunk`) which mode serves that chunk.

    segments   ``sparse_kv_attention`` over the segment table, no copy (the Triton kernel; the reference
               everywhere else); the default off CUDA.
    window     the default on CUDA. Within a chunk only the chunk's own K/V change between passes: at the
               first pass of a layer the memory rows (gathered, delta-rotated) are staged once into a
               per-layer window ``[B, max_keys, H, D]`` laid out [chunk frames | memory], every pass writes
               the chunk's rotated K/V into its first rows, and each call is one dense attention over the
               window on the fastest engine (``ops/dense_attention/tuning.json``). ``end_chunk`` copies the
               chunk's final K/V into the pool. Costs one extra context per layer.
    per_call   one window shared by all layers, re-gathered at every call (memory-tight: one context).
    pool prefix  a chunk whose keys are the pool's first rows at their true positions (``ChunkPlan.pool_prefix``:
               a dense window without re-rotation, or any chunk of that shape) attends to the pool directly;
               window and per_call hand such chunks to it, and a planner that never gathers gets only it.
               Not with FP8 or host pools: the attention engines read the compute dtype on the device, so
               every chunk stages.

Host pools (``KVCache(pool_device="cpu")``, :mod:`.storage`) are read and written in place over PCIe. The window mode
reads each memory row once per chunk and layer (the staging) and writes the chunk's rows once (the commit): the
mode host pools are made for. per_call reads every attended row at every call and writes the chunk's rows at
every pass; segments reads them at every call: both work, at that PCIe cost per call.

When the window mode stages (``KVCache(staging=...)``, one of ``STAGINGS``):

    first_call   at each layer's first call, on the caller's stream, before its attention (the default);
    next_layer   at layer l's first call, layer l + 1's staging is enqueued on a side stream that forks from the
                 caller's there, so it overlaps layer l's attention and the rest of the model's layer; layer l + 1's
                 first call waits for it (an event). Layer 0 stages at its first call.
    all_layers   at layer 0's first call every later layer's staging is enqueued on the side stream at once, each
                 with its event; each layer's first call waits for its own.

A planner that selects per chunk (or never) has every table complete when the layers run: the staging ahead gathers
a layer's whole memory. One that selects per layer (Pack's mid blocks) fills its device rows at the layer's first
call: ahead go the static segments before and after that run of device rows (Pack's sink and recent frames; their
window rows are known, since the run is ``ChunkPlan.selected_keys`` rows), and the run itself is staged at the first
call, after the selection. A plan whose device rows are not one run stages its memory at the first call.

The side stream joins the caller's at the last layer's first call (it waits for the last event), so a chunk step
captured in a CUDA graph holds the fork and the join; under torch.compile the staging ahead runs eagerly (a graph
break at each layer's first call). Off CUDA there is no stream: the staging ahead runs in order, with the same
result. Which of the three is fastest depends on PCIe against compute: ``python -m benchmarks chunk --pools host
--staging ...`` measures them in one run (``STEPS="build host" bash benchmarks/run_gpu.sh``). Only the window mode
stages once per chunk: the others take ``first_call`` alone.

With FP8 pools (``KVCache(kv_dtype=torch.float8_e4m3fn)``) the pool ops take the pools' scales: rope_append and
compress_kv quantize what they write, gather_kv_rope and sparse_kv_attention dequantize what they read, and the
window commit quantizes the chunk's rows (``quantize_frames``, every layer in one launch).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from ..memory import CacheGeometry
from ..memory import ChunkPlan
from ..memory import Planner
from ..ops.dense_attention.op import dense_attention_op
from ..ops.dense_attention.op import resolve_engine
from ..ops.gather_kv_rope.op import gather_kv_rope_into_op
from ..ops.quantize_frames.op import quantize_frames_op
from ..ops.rope_append.op import rope_append_op
from ..ops.sparse_kv_attention.op import choose_impl
from ..ops.sparse_kv_attention.op import sparse_kv_attention_op
from .plan_buffers import PlanBuffers
from .storage import KVStorage
from .storage import nbytes

MODES = ("window", "per_call", "segments")
STAGINGS = ("first_call", "next_layer", "all_layers")


def row_views(k: torch.Tensor, v: torch.Tensor, start: int, stop: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(k[i][:, start:stop], v[i][:, start:stop])`` for every buffer ``i`` of buffers [n_bufs, B, rows, H, D].

    Made on the host at ``begin_chunk``, never inside a call, so a compiled call reads them as graph inputs: a view
    made inside the traced call and written by an op lands at offset 0 under inductor once automatic dynamic
    shapes make its offset symbolic (torch 2.13, silently wrong), and a view kept from one graph for another goes
    stale. Made here, views cost no host time per call either.
    """
    return [(a[:, start:stop], b[:, start:stop]) for a, b in zip(k.unbind(0), v.unbind(0))]


class AttentionMode:
    """What every attention mode of a cache shares (see the module docstring); :class:`SegmentsMode` and
    :class:`DenseMode` are the two kinds.

    A mode writes a pass's K/V where its calls read them (:meth:`append`), attends (:meth:`attend`) and commits
    the chunk's rows at ``end_chunk`` (:meth:`commit`). What a call reads is fixed on the host at ``begin`` (views,
    sizes, the engine); :meth:`attend` branches on nothing but ``first``, so a compiled model keeps one graph for a
    chunk's first pass and one for the others.
    """

    name: str
    stages = False  # the current chunk's calls stage memory at each layer's first call
    chunk_engine: str | None = None  # the attention engine of the current chunk's calls (None: no engine)

    def __init__(self, geometry: CacheGeometry, storage: KVStorage, buffers: PlanBuffers, backend: str, engine: str,
                 section: Callable[[str], object]):
        self.g, self.storage, self.buffers = geometry, storage, buffers
        self.backend, self.engine, self.section = backend, engine, section
        self.scale = geometry.head_dim ** -0.5

    def for_chunk(self, plan: ChunkPlan) -> AttentionMode:
        """The mode that serves ``plan`` (this one, or the pool-prefix mode for chunks shaped as a pool prefix)."""
        return self

    def begin(self, plan: ChunkPlan) -> None:
        """Per-chunk set-up on the host (keys per call, engine, the views the calls read and write)."""

    def target(self, layer: int) -> tuple:
        """Where :meth:`append` writes the layer's K/V: (k rows, v rows, k scales, v scales (None unless FP8 pools),
        frame slots, prototypes or None); here the pool rows of the chunk's frames."""
        return (*self.storage.layers[layer], *self.storage.scales[layer], self.buffers.frame_slot, self.storage.proto)

    def append(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``rope_append`` of the pass's pre-RoPE K/V into :meth:`target` at the chunk's positions (layer 0 records
        the prototypes); returns q rotated."""
        dst_k, dst_v, k_scale, v_scale, slots, proto = self.target(layer)
        return rope_append_op(q, k, v, dst_k, dst_v, proto if layer == 0 else None, slots, self.buffers.frame_pos,
                              self.g.height, self.g.width, self.backend, k_scale, v_scale, checked=True)

    def attend(self, layer: int, q_rot: torch.Tensor, seg: torch.Tensor, first: bool) -> torch.Tensor:
        """The layer's attention over its planned memory (``first``: the layer's first call of the chunk)."""
        raise NotImplementedError

    def commit(self, plan: ChunkPlan) -> None:
        """At ``end_chunk``: move what the chunk wrote outside the pool into it."""

    def nbytes(self) -> int:
        """Bytes of the mode's own buffers (windows)."""
        return 0


class SegmentsMode(AttentionMode):
    """``sparse_kv_attention`` over the segment table, reading the pool with no copy."""

    name = "segments"

    def attend(self, layer: int, q_rot: torch.Tensor, seg: torch.Tensor, first: bool) -> torch.Tensor:
        k, v = self.storage.layers[layer]
        k_scale, v_scale = self.storage.scales[layer]
        return sparse_kv_attention_op(q_rot, k, v, seg, self.scale, self.backend, k_scale, v_scale, checked=True)


class DenseMode(AttentionMode):
    """A mode whose calls run ``dense_attention`` on contiguous keys with an engine resolved per chunk shape.

    ``keys``: per layer (or per window) the (k, v) rows a call attends to, remade by :meth:`make_views` at ``begin``
    when the chunk's key count changes (in steady state never).
    """

    def __init__(self, *args):
        super().__init__(*args)
        self.keys, self.n_keys = [], None

    def begin(self, plan: ChunkPlan) -> None:
        self.total = plan.total_keys()
        self.u_rows = len(plan.frame_slot) * self.g.frame_tokens
        self.chunk_engine = resolve_engine(self.engine, self.g.device, self.g.dtype, self.g.head_dim, self.u_rows,
                                           self.total)
        if self.total != self.n_keys:
            self.n_keys = self.total
            self.make_views()

    def make_views(self) -> None:
        """The views of a chunk of ``self.total`` keys."""
        raise NotImplementedError

    def dense(self, q_rot: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return dense_attention_op(q_rot, k, v, self.scale, self.chunk_engine, checked=True)


class PoolPrefixMode(DenseMode):
    """The chunk's keys are the pool rows ``[0, total)`` at delta 0: attention reads the pool, nothing is copied."""

    name = "pool_prefix"

    def for_chunk(self, plan: ChunkPlan) -> AttentionMode:
        if plan.pool_prefix() is None:
            raise RuntimeError(f"KVCache.begin_chunk: the planner never gathers (Planner.gathers is False) but the "
                               f"plan of chunk {plan.chunk} is not a pool prefix at delta 0")
        return self

    def make_views(self) -> None:
        self.keys = row_views(self.storage.k, self.storage.v, 0, self.total)

    def attend(self, layer: int, q_rot: torch.Tensor, seg: torch.Tensor, first: bool) -> torch.Tensor:
        return self.dense(q_rot, *self.keys[layer])


class GatherMode(DenseMode):
    """A mode that gathers memory into windows of its own (``args``: those of :class:`AttentionMode`; windows of
    ``planner.max_keys`` rows); chunks shaped as a pool prefix go to ``prefix``."""

    per_layer_windows = True  # one window per layer; False: one window shared by every layer

    def __init__(self, *args, planner: Planner, prefix: PoolPrefixMode | None):
        super().__init__(*args)
        g = self.g
        self.prefix = prefix  # None: every chunk stages (FP8 or host pools)
        n_windows = g.num_layers if self.per_layer_windows else 1
        self.win_k = torch.empty(n_windows, g.batch, planner.max_keys, g.num_heads, g.head_dim, dtype=g.dtype,
                                 device=g.device)
        self.win_v = torch.empty_like(self.win_k)

    def for_chunk(self, plan: ChunkPlan) -> AttentionMode:
        return self if self.prefix is None or plan.pool_prefix() is None else self.prefix

    def make_views(self) -> None:
        self.keys = row_views(self.win_k, self.win_v, 0, self.total)

    def gather(self, layer: int, seg: torch.Tensor, k_out: torch.Tensor, v_out: torch.Tensor) -> None:
        """The layer's pool rows listed by ``seg``, delta-rotated (dequantized from FP8 pools), into the window rows."""
        k, v = self.storage.layers[layer]
        k_scale, v_scale = self.storage.scales[layer]
        gather_kv_rope_into_op(k, v, seg, k_out, v_out, self.backend, k_scale, v_scale, checked=True)

    def nbytes(self) -> int:
        return nbytes(self.win_k, self.win_v)


class WindowMode(GatherMode):
    """Per-layer windows [chunk rows | memory rows]: the memory staged once per chunk and layer (at the layer's first
    call, or ahead of it on a side stream: ``staging``, see the module docstring), the chunk rows every pass."""

    name = "window"

    def __init__(self, *args, planner: Planner, prefix: PoolPrefixMode | None, staging: str = "first_call"):
        super().__init__(*args, planner=planner, prefix=prefix)
        g = self.g
        self.proto_chunk = None  # the chunk's prototypes, committed by end_chunk
        if self.storage.proto is not None:
            self.proto_chunk = torch.empty(g.batch, len(self.buffers.window_slot), g.head_dim, dtype=torch.float32,
                                           device=g.device)
        self.win_layers = list(zip(self.win_k.unbind(0), self.win_v.unbind(0)))
        self.memory_rows = []  # per layer (k, v): the window rows the staging writes
        self.ahead = {"first_call": 0, "next_layer": 1, "all_layers": g.num_layers}[staging]  # layers staged ahead
        self.per_layer = planner.selection == "per_layer"  # a table per layer, device rows filled at its first call
        self.staged = [False] * g.num_layers  # per layer: its staging of the current chunk is enqueued
        self.parts = None  # with ahead: the (segments, memory rows) staged ahead, and those left to the first call
        self.side, self.events = None, []  # the side stream and one event per layer (CUDA), made on first use

    def begin(self, plan: ChunkPlan) -> None:
        self.n_memory_seg = plan.n_memory_seg
        super().begin(plan)
        self.stages = self.total > self.u_rows  # no memory in the first chunk
        self.staged = [False] * self.g.num_layers
        if self.ahead:
            self.parts = self.ahead_parts(plan)

    def ahead_parts(self, plan: ChunkPlan) -> tuple[list[tuple[slice, slice]], tuple[slice, slice] | None]:
        """The staging ahead of ``plan``'s chunk as (segment rows, memory rows of the window) slices: the parts staged
        ahead, and the part left to the layer's first call (None: nothing). See the module docstring."""
        n, rows = plan.n_memory_seg, self.total - self.u_rows
        everything = (slice(0, n), slice(0, rows))
        if not (self.per_layer and plan.selects):
            return [everything], None
        run = [i for i, frame in enumerate(plan.frames_attended[:n]) if frame == -1]
        i0, i1 = run[0], run[-1] + 1
        if run != list(range(i0, i1)):  # later static rows' places would depend on the device rows' lengths
            return [], everything
        a = sum(length for _, length, _ in plan.segments[:i0])
        b = a + plan.selected_keys
        static = [(slice(0, i0), slice(0, a)), (slice(i1, n), slice(b, rows))]
        return [(segs, place) for segs, place in static if place.start < place.stop], (slice(i0, i1), slice(a, b))

    def make_views(self) -> None:
        super().make_views()
        self.memory_rows = row_views(self.win_k, self.win_v, self.u_rows, self.total)

    def target(self, layer: int) -> tuple:  # the window's chunk rows
        return (*self.win_layers[layer], None, None, self.buffers.window_slot, self.proto_chunk)

    def attend(self, layer: int, q_rot: torch.Tensor, seg: torch.Tensor, first: bool) -> torch.Tensor:
        if first:  # the memory rows: once per chunk and layer
            with self.section("stage"):
                if self.ahead:
                    self.stage_ahead(layer, seg)
                else:
                    self.stage(layer, seg)
        return self.dense(q_rot, *self.keys[layer])

    def stage(self, layer: int, seg: torch.Tensor) -> None:
        """The layer's whole memory (the memory segments of its table ``seg``) into its window's memory rows."""
        self.gather(layer, seg[:, : self.n_memory_seg], *self.memory_rows[layer])

    @torch.compiler.disable  # streams and events stay out of traced graphs
    def stage_ahead(self, layer: int, seg: torch.Tensor) -> None:
        """At ``layer``'s first call (``seg``: its table, its selection done): its memory rows complete in its window
        (all staged now where nothing staged them ahead; else the staging ahead waited for and the part left to the
        first call staged), then the staging ahead of the next ``ahead`` layers not yet enqueued, on the side stream
        forked here."""
        ahead, at_call = self.parts
        if not self.staged[layer]:
            self.stage(layer, seg)
            self.staged[layer] = True
        else:
            if self.events:
                torch.cuda.current_stream(self.g.device).wait_event(self.events[layer])
            if at_call is not None:
                self.gather_part(layer, seg, at_call)
        todo = [i for i in range(layer + 1, min(layer + 1 + self.ahead, self.g.num_layers)) if not self.staged[i]]
        if not todo:
            return
        with self.side_stream():
            for i in todo:
                table = self.buffers.seg[i if self.per_layer else 0]
                for part in ahead:
                    self.gather_part(i, table, part)
                if self.events:
                    self.events[i].record()
                self.staged[i] = True

    def gather_part(self, layer: int, seg: torch.Tensor, part: tuple[slice, slice]) -> None:
        """The segments ``part[0]`` of ``seg`` into the layer's memory rows ``part[1]``."""
        segs, place = part
        k, v = self.memory_rows[layer]
        self.gather(layer, seg[:, segs], k[:, place], v[:, place])

    @contextlib.contextmanager
    def side_stream(self):
        """On CUDA: the side stream, forked from the caller's stream here (it waits for what the caller enqueued so
        far: the plan, the selection, the previous chunk's commit), as the current stream. Off CUDA: nothing."""
        device = self.g.device
        if device.type != "cuda":
            yield
            return
        if self.side is None:
            self.side = torch.cuda.Stream(device)
            self.events = [torch.cuda.Event() for _ in range(self.g.num_layers)]
        self.side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(self.side):
            yield

    def commit(self, plan: ChunkPlan) -> None:
        f, s = self.g.frame_tokens, self.storage
        pools = ((self.win_k, s.k, s.k_scale), (self.win_v, s.v, s.v_scale))
        if s.fp8:  # every layer at once: one quantizing pass each for K and V
            for win, pool, scale in pools:
                quantize_frames_op(win[:, :, :len(plan.frame_slot) * f].flatten(0, 1), pool.flatten(0, 1),
                                   scale.flatten(0, 1), self.buffers.frame_slot, f, self.backend, checked=True)
        else:  # every layer at once: one copy per frame
            for u, slot in enumerate(plan.frame_slot):
                for win, pool, _ in pools:
                    pool[:, :, slot * f:(slot + 1) * f].copy_(win[:, :, u * f:(u + 1) * f])
        if self.proto_chunk is not None:
            s.proto[:, self.buffers.frame_slot] = self.proto_chunk

    def nbytes(self) -> int:
        return super().nbytes() + nbytes(self.proto_chunk)


class PerCallMode(GatherMode):
    """One window shared by every layer, re-gathered (every segment, the chunk's own rows too) at every call."""

    name = "per_call"
    per_layer_windows = False

    def attend(self, layer: int, q_rot: torch.Tensor, seg: torch.Tensor, first: bool) -> torch.Tensor:
        kw, vw = self.keys[0]
        self.gather(layer, seg, kw, vw)
        return self.dense(q_rot, kw, vw)


def resolve_attention(attention: str, engine: str, device_type: str, staged: bool = False, gathers: bool = True
                      ) -> str:
    """The mode ``attention`` names on a ``device_type`` device, for pools the attention engines read as they are or
    not (``staged``: FP8 or host pools), of a planner that ``gathers`` or not; ValueError for an engine given to the
    segments mode, which has none.

    "auto": segments where ``sparse_kv_attention``'s own choice (:func:`choose_impl`) is its fused kernel (off
    CUDA); else window, except per_call for staged pools of a planner that never gathers (a dense window without
    re-rotation): there per-layer windows would add compute-dtype copies of every pool row on the device, while one
    shared window keeps the memory small (staged at every call instead of once per chunk).
    """
    if attention == "auto":
        if choose_impl("auto", device_type) == "fused":
            attention = "segments"
        else:
            attention = "per_call" if staged and not gathers else "window"
    if attention == "segments" and engine != "auto":
        raise ValueError(f"KVCache: engine: the segments attention mode runs the segment-table kernel and has no "
                         f"engine, got engine={engine!r} (use attention='window' or 'per_call')")
    return attention


def check_staging(staging: str, attention: str, planner: Planner, staged: bool) -> None:
    """ValueError unless ``staging`` (one of ``STAGINGS``) fits the resolved ``attention`` mode, ``planner`` and pools
    (``staged``: FP8 or host pools, as for :func:`resolve_attention`); checked before anything is allocated."""
    if staging not in STAGINGS:
        raise ValueError(f"KVCache: staging: expected one of {STAGINGS}, got {staging!r}")
    if staging == "first_call":
        return
    why = None
    if attention != "window":
        why = f"the {attention} attention mode has no once-per-chunk staging (use attention='window')"
    elif not staged and not planner.gathers:
        why = (f"{type(planner).__name__} never gathers: with pools on the device every chunk attends to the pool "
               "prefix, and nothing is staged")
    if why:
        raise ValueError(f"KVCache: staging={staging!r}: {why}; use staging='first_call'")


def make_mode(attention: str, geometry: CacheGeometry, storage: KVStorage, buffers: PlanBuffers, planner: Planner,
              backend: str, engine: str, section: Callable[[str], object], staging: str = "first_call"
              ) -> AttentionMode:
    """The strategy of ``attention`` (one of ``MODES``; the window mode's ``staging``, checked before by
    :func:`check_staging`): the one place a mode name becomes behaviour.

    window and per_call over a planner that never gathers (``Planner.gathers`` False) attend to the pool
    prefix of every chunk and allocate no window, unless the engines cannot read the pools (FP8 or host pools,
    ``KVStorage.direct``): then every chunk stages.
    """
    args = (geometry, storage, buffers, backend, engine, section)
    if attention == "segments":
        return SegmentsMode(*args)
    prefix = PoolPrefixMode(*args) if storage.direct else None
    if prefix is not None and not planner.gathers:
        return prefix
    if attention == "window":
        return WindowMode(*args, planner=planner, prefix=prefix, staging=staging)
    return PerCallMode(*args, planner=planner, prefix=prefix)
