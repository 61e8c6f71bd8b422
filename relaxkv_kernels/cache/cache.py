"""``KVCache``: the coordinator of a model's KV memory. It joins three parts with typed seams:

- storage (:class:`~.storage.KVStorage`): pools, prototypes, policy state, bytes;
- the plan's buffers (:class:`~.plan_buffers.PlanBuffers`): the index tensors of the chunk's plan on the device,
  uploaded by the host at ``begin_chunk`` and reused in place while their shapes hold;
- the attention mode (:mod:`.modes`): windows, the ``rope_append`` write of a pass's K/V, staging, the commit at
  ``end_chunk``.

The policy's planner plans every chunk on the host and runs its device steps on a typed
:class:`~relaxkv_kernels.memory.StepContext`, and its end-of-chunk work in ``Planner.commit``; it never sees the
cache. The cache itself checks the calls, counts them and sequences the parts. Usage inside an attention module
(q, k, v after q/k RMSNorm, before RoPE)::

    cache = KVCache(RelaxMemory(), num_layers=30, batch=1, num_heads=12, head_dim=128,
                    height=30, width=52, dtype=torch.bfloat16, device="cuda")
    for chunk in range(n_chunks):
        cache.begin_chunk()                       # host plan, uploaded; chunk-level selection on the device
        for pass_ in range(5):                    # 4 denoising passes + the clean refresh pass
            for layer in range(30):               # in any order within a pass
                out = cache.attend(layer, q, k, v)  # [B, U*F, H, D]
        cache.end_chunk()                         # checks every layer ran every pass; commits the chunk

Within a chunk nothing reads device memory on the host: selections are written into the device
segment table by kernels, so the passes of a chunk (everything between ``begin_chunk`` and
``end_chunk``) can be captured in a CUDA graph once shapes are in steady state, as FlashInfer splits
``plan`` (host) from ``run`` (capturable). Capturing is a mode the caller asks for: the capture runs
inside :meth:`KVCache.capture`, and from then on every chunk keeps the captured shapes and a chunk
without eager calls counts as a replay::

    cache.begin_chunk()
    with torch.cuda.graph(graph), cache.capture():
        out = chunk_step(cache, static_inputs)    # the passes' attend calls, recorded
    for chunk in ...:                             # this one and every later chunk
        cache.begin_chunk()                       # index buffers refreshed in place
        graph.replay()
        cache.end_chunk()

Under ``torch.compile`` (of a model that calls ``attend``, or of a chunk step) the traced calls read
only what ``begin_chunk`` fixed for the chunk, views made on the host included, and count themselves
in a tensor: a compiled model keeps one graph for a chunk's first pass and one for its later passes
once the plans are steady, whatever the number of passes.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch

from ..memory import CacheGeometry
from ..memory import ChunkPlan
from ..memory import MemoryPolicy
from ..memory import Planner
from ..memory import StepContext
from ..memory.heads import HeadShards
from ..ops.checks import FLOAT_DTYPES
from ..ops.checks import canonical_device
from ..ops.checks import check_head_dim
from ..ops.checks import check_int
from ..ops.checks import check_tensor
from ..ops.dense_attention.engines import ENGINES
from ..ops.fp8 import FP8_DTYPES
from ..targets import require_gpu
from .modes import MODES
from .modes import SegmentsMode
from .modes import check_staging
from .modes import make_mode
from .modes import resolve_attention
from .plan_buffers import PlanBuffers
from .storage import KVStorage
from .storage import nbytes

CACHE_BACKENDS = ("reference", "fused", "auto", "triton")
ATTENTION_MODES = ("auto", *MODES)
SELECTIONS = (None, "chunk", "per_layer")
RECACHE = ("none", "recent", "attended")


class FrameNotHeldError(ValueError):
    """A re-cache asked for frames the memory does not hold at full resolution (dropped, compressed, or not made
    yet)."""


class KVCache:
    """KV storage, per-chunk plans and attention for one memory policy, for all layers of a model.

    Args:
        policy: a memory policy (DenseWindow, RelaxMemory, PackMemory, or your own ``MemoryPolicy``).
        num_layers, batch, num_heads, head_dim: model geometry (head_dim even).
        height, width: token grid of a latent frame (F = height * width tokens).
        dtype: compute dtype of q/k/v, the attention windows and the output (bf16 / fp16 / fp32). device: where
            everything lives (the pools too, unless ``pool_device``).
        kv_dtype: dtype of the K/V pools: None (the same as ``dtype``) or ``torch.float8_e4m3fn``: the pools (frames
            and compressed blocks) hold e4m3 codes with one fp32 scale per row and head (``relaxkv_kernels.ops.fp8``;
            about half the bytes), quantized where rows enter the pool and dequantized when they are read. The
            prototypes and Pack's mean keys stay fp32 and are computed before quantization, so selections do not
            change; with FP8 pools every chunk of the window modes stages (none attends to the pool directly).
        backend: "reference" (pure PyTorch), "fused" (kernels: CUDA/Triton on a GPU, the Triton
            interpreter on CPU), or an op backend name ("auto", "triton"); single ops can be sent to the
            CUDA extension with ``RELAXKV_BACKEND_<OP>=cuda``.
        attention: "window", "per_call", "segments" or "auto" (window on CUDA, segments elsewhere; per_call on CUDA
            for FP8 pools of a planner that never gathers); see ``relaxkv_kernels.cache.modes``.
        engine: attention engine of the window / per_call modes ("auto": the tuning table's choice per
            chunk shape; "reference" with the reference backend), see ``relaxkv_kernels.dense_attention``.
            The segments mode has no engine: any other value than "auto" raises there.
        process_group: a ``torch.distributed`` group of P ranks for head parallelism (None: one process). Each
            rank holds ``num_heads / P`` heads of everything (``num_heads`` is the model's, on every rank; rank r
            holds heads ``r * H / P`` onwards) and ``attend`` takes that rank's heads, ``[B, U*F, H/P, D]``; the
            selections read all heads through collectives (:mod:`relaxkv_kernels.memory.heads`), so every rank
            chooses the same frames. Every rank must make the same calls in the same order, and make the same cache
            (policy, geometry, dtypes, pool placement, modes): checked at construction with one collective.
        pool_device: where the K/V pools and their FP8 scales live: None (on ``device``) or "cpu": host memory,
            pinned on CUDA and read and written in place by the kernels through unified addressing
            (:mod:`relaxkv_kernels.cache.storage`); everything else stays on ``device``. The window mode reads each
            attended row once per chunk and layer over PCIe; per_call and segments read at every call. Checked
            against the host's available memory before anything is allocated (:class:`HostMemoryError`).
        staging: when the window mode stages a layer's memory rows (``relaxkv_kernels.cache.modes``): "first_call"
            (at the layer's first call of the chunk, the default), "next_layer" (one layer ahead on a side stream)
            or "all_layers" (every layer from layer 0's first call on a side stream; a per-layer selection's
            selected rows still at the first call). Ahead of the first call only in the window mode (ValueError
            otherwise); meant for host pools, where the staging reads over PCIe.

    Attributes:
        storage: the :class:`KVStorage` (``storage.k``, ``storage.v``: [L, B, n_rows, H, D]; ``storage.k_scale``,
            ``storage.v_scale``: [L, B, n_rows, H] for FP8 pools).
        plan_buffers: the :class:`PlanBuffers` the chunks' plans are uploaded into (``plan_buffers.seg``: the segment
            tables).
        attention_mode: the attention mode built from ``attention``; active_mode: the one serving the passes in
            progress (``attention_mode``, its pool-prefix mode for a chunk whose keys are a pool prefix, or a rewrite's
            segments mode). planner: the policy's planner.
        num_heads: the heads this cache holds (H / P with a process group). heads: the ``HeadShards`` or None.
        dtype: the compute dtype. kv_dtype: the pools' dtype (``dtype`` unless FP8).
        chunk: index of the next chunk to end. last_plan: the plan of the current (or last) chunk.
        profiler: optional ``name -> context manager`` timing the sections of ``attend``: rope_append,
            select, compress, attention (with stage, the window staging, inside it).
    """

    def __init__(self, policy: MemoryPolicy, num_layers: int, batch: int, num_heads: int, head_dim: int, height: int,
                 width: int, dtype: torch.dtype = torch.bfloat16, device="cpu", backend: str = "auto",
                 attention: str = "auto", engine: str = "auto", process_group=None,
                 kv_dtype: torch.dtype | None = None, pool_device=None, staging: str = "first_call"):
        op = "KVCache"
        if not isinstance(policy, MemoryPolicy):
            raise TypeError(f"{op}: policy: expected a MemoryPolicy (DenseWindow, RelaxMemory, PackMemory, ...), "
                            f"got {type(policy).__name__}")
        for name, value in (("num_layers", num_layers), ("batch", batch), ("num_heads", num_heads),
                            ("height", height), ("width", width)):
            check_int(op, name, value, low=1)
        check_head_dim(op, "head_dim", head_dim)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: dtype: expected one of {FLOAT_DTYPES}, got {dtype}")
        if kv_dtype == dtype:
            kv_dtype = None
        if kv_dtype is not None and kv_dtype not in FP8_DTYPES:
            raise TypeError(f"{op}: kv_dtype: expected None (the compute dtype {dtype}) or one of "
                            f"{[str(d) for d in FP8_DTYPES]}, got {kv_dtype}")
        if backend not in CACHE_BACKENDS:
            raise ValueError(f"{op}: backend: expected one of {CACHE_BACKENDS}, got {backend!r}")
        if attention not in ATTENTION_MODES:
            raise ValueError(f"{op}: attention: expected one of {ATTENTION_MODES}, got {attention!r}")
        if engine not in ("auto", *ENGINES):
            raise ValueError(f"{op}: engine: expected one of {('auto', *ENGINES)}, got {engine!r}")
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"{op}: device: expected a torch device, got {device!r} ({e})") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"{op}: device: {str(device)!r} asked for, but torch sees no CUDA device here "
                             f"(torch {torch.__version__}, CUDA build: {torch.version.cuda is not None})")
        self.device = canonical_device(device)
        host_pools = self._host_pools(pool_device)
        self.heads = None if process_group is None else HeadShards(op, process_group, num_heads)
        if backend == "fused":
            backend = "auto" if self.device.type == "cuda" else "triton"
        if self.device.type == "cuda" and backend != "reference":  # one UnsupportedGPUError here, not in a launch
            require_gpu(self.device, with_extension=backend in ("auto", "cuda"))
        self.planner = pl = policy.planner(height, width)  # raises when the policy's geometry does not fit the grid
        if not isinstance(pl, Planner):
            raise TypeError(f"{op}: {type(policy).__name__}.planner(): expected a relaxkv_kernels.Planner, got "
                            f"{type(pl).__name__}")
        if pl.n_rows < pl.n_slots * height * width or pl.max_keys < policy.chunk_frames * height * width:
            raise ValueError(f"{op}: {type(pl).__name__}: expected n_rows >= n_slots x F = {pl.n_slots} x "
                             f"{height * width} (every slot's rows in the pool) and max_keys >= chunk_frames x F = "
                             f"{policy.chunk_frames * height * width}, got n_rows = {pl.n_rows}, max_keys = "
                             f"{pl.max_keys}")
        pl.check_heads(num_heads)  # the model's heads, on every rank
        staged = kv_dtype is not None or host_pools  # the engines cannot read the pools as they are
        attention = resolve_attention(attention, engine, self.device.type, staged=staged, gathers=pl.gathers)
        check_staging(staging, attention, pl, staged=staged)
        if self.heads is not None:  # ranks that made different caches would hang or mix heads: fail on every rank
            self.heads.check_same(op, {
                "policy": repr(policy) if dataclasses.is_dataclass(policy) else type(policy).__qualname__,
                "geometry": (num_layers, batch, num_heads, head_dim, height, width), "dtype": str(dtype),
                "kv_dtype": str(kv_dtype), "pool_device": "host" if host_pools else "device",
                "backend": backend, "attention": attention, "engine": engine})
        if engine == "auto" and backend == "reference":
            engine = "reference"
        self.backend, self.attention, self.engine = backend, attention, engine
        self.policy, self.num_layers = policy, num_layers
        self.num_heads = num_heads if self.heads is None else self.heads.local_heads
        self.batch, self.head_dim = batch, head_dim
        self.height, self.width, self.frame_tokens = height, width, height * width
        self.dtype = dtype
        self.geometry = CacheGeometry(num_layers, batch, self.num_heads, head_dim, height, width, dtype, self.device,
                                      kv_dtype)
        self.kv_dtype = self.geometry.pool_dtype
        if pl.selection not in SELECTIONS:
            raise ValueError(f"{op}: {type(pl).__name__}.selection: expected one of {SELECTIONS}, got {pl.selection!r}")
        self.storage = KVStorage(self.geometry, pl, host=host_pools)
        n_tables = num_layers if pl.selection == "per_layer" else 1
        self.plan_buffers = PlanBuffers.allocate(n_tables, batch, pl.n_seg, policy.chunk_frames, self.device)
        self._chunk_seg = [self.plan_buffers.seg[i if n_tables > 1 else 0] for i in range(num_layers)]  # per layer
        # what the calls of the current pass read: the chunk's plan, or a rewrite's (begin_chunk / begin_rewrite)
        self._buffers, self._seg = self.plan_buffers, self._chunk_seg
        self._layer_state = [self.storage.layer_state(i) for i in range(num_layers)]
        self.attention_mode = make_mode(attention, self.geometry, self.storage, self.plan_buffers, pl, backend, engine,
                                        self._section, staging)
        self.active_mode = self.attention_mode
        self._appends = type(pl).append is not Planner.append  # the planner has a step after every cache write
        self._chunk_shape = (batch, policy.chunk_frames * self.frame_tokens, self.num_heads, head_dim)
        self._pass_shape = self._chunk_shape
        self.chunk = 0
        self.last_plan: ChunkPlan | None = None
        self._in_chunk = False
        self._rewriting = False  # the passes in progress are a rewrite's (begin_rewrite), not a chunk's
        # attend calls per layer in the current chunk: eager ones in a list, traced ones in a tensor (a compiled
        # graph adds to it without a guard on the count, so every pass runs the same graph)
        self._calls = [0] * num_layers
        self._traced_calls = torch.zeros(num_layers, dtype=torch.int64)
        self._first = None  # per layer: the next call is its first of the chunk (None: no chunk with first-call work)
        self._selects_layer = False  # the chunk runs the planner's select_layer at each layer's first call
        self._captured = None  # the shapes of the chunk captured in capture() (replays need the same)
        self._shapes = None
        self._steps: dict[int, StepContext] = {}
        self._layer_steps: list[StepContext] = []  # made at begin_chunk for a planner with per-layer steps
        self.profiler = None

    def _host_pools(self, pool_device) -> bool:
        """Whether ``pool_device`` (the constructor's) puts the pools in host memory; ValueError for another device."""
        if pool_device is None:
            return False
        try:
            where = canonical_device(pool_device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"KVCache: pool_device: expected None or 'cpu', got {pool_device!r} ({e})") from None
        if where.type != "cpu" and where != self.device:
            raise ValueError(f"KVCache: pool_device: expected None (the pools on {self.device}) or 'cpu' (host "
                             f"memory), got {pool_device!r}")
        return where.type == "cpu"

    # ------------------------------------------------------------------ host side, between chunks

    def begin_chunk(self) -> ChunkPlan:
        """Plan the next chunk (eviction, slots, static segments), upload it and run the chunk-level selection.

        Calling it again before ``end_chunk`` plans the same chunk again (same slots) and restores its
        pending device steps, e.g. to capture the chunk step in a CUDA graph after a warm-up run.
        """
        if self._rewriting:
            raise RuntimeError("KVCache.begin_chunk: a rewrite is in progress: end_rewrite() after its pass first")
        plan = self.planner.plan(self.chunk)
        u = len(plan.frame_slot)
        if u != self.policy.chunk_frames or plan.segments[plan.n_memory_seg: plan.n_memory_seg + u] != [
                (s * self.frame_tokens, self.frame_tokens, 0) for s in plan.frame_slot]:
            raise RuntimeError(f"KVCache.begin_chunk: {type(self.planner).__name__}.plan({self.chunk}): expected the "
                               f"{self.policy.chunk_frames} chunk frames at delta 0 right after the "
                               f"{plan.n_memory_seg} memory segments")
        total = plan.total_keys()
        self._check_plan(plan, total)
        mode = self.attention_mode.for_chunk(plan)
        shapes = (self.plan_buffers.upload(plan), plan.n_memory_seg, total, mode.name)
        if self._captured is not None and shapes != self._captured:
            raise RuntimeError(f"KVCache.begin_chunk: chunk {self.chunk} changes the plan's shapes since a CUDA "
                               "graph captured a chunk step of this cache, so a replay would read stale buffers; "
                               "capture once the plans are steady (past the policy's warm-up), or make a new cache")
        self._shapes = shapes
        self._start_passes(plan, mode, self.plan_buffers, self._chunk_seg, self._chunk_shape)
        mode.begin(plan)
        if plan.selects and self.planner.selection == "chunk":
            with self._section("select"):
                self.planner.select_chunk(self.step_context(None))
        self._selects_layer = plan.selects and self.planner.selection == "per_layer"
        self._layer_steps = ([self.step_context(layer) for layer in range(self.num_layers)]
                             if self._selects_layer or self._appends else [])
        # read in attend only where a layer's first call differs from its others: one compiled graph otherwise
        self._first = [True] * self.num_layers if self._selects_layer or mode.stages else None
        self._in_chunk = True
        return plan

    def _start_passes(self, plan: ChunkPlan, mode, buffers: PlanBuffers, seg: list[torch.Tensor],
                      shape: tuple[int, ...]) -> None:
        """What the calls of the passes to come read (a chunk's or a rewrite's): its plan, mode, uploaded buffers,
        segment table per layer and q/k/v shape; no step made and no call counted yet."""
        self.last_plan, self.active_mode, self._buffers, self._seg, self._pass_shape = plan, mode, buffers, seg, shape
        self._steps = {}  # the planner's StepContext per layer (-1: the chunk's), made on use
        self._calls = [0] * self.num_layers
        self._traced_calls.zero_()

    def _check_plan(self, plan: ChunkPlan, total: int) -> None:
        """A planner's plan is consistent (host only, before anything is uploaded): a padded table of segments inside
        the pool, the chunk's frames in slots no memory segment reads, device rows iff it selects, keys within the
        windows' size."""
        pl = self.planner
        name = f"KVCache.begin_chunk: {type(pl).__name__}.plan({self.chunk})"
        if len(plan.segments) != pl.n_seg or len(plan.frames_attended) != pl.n_seg:
            raise RuntimeError(f"{name}: expected segments and frames_attended of n_seg = {pl.n_seg} rows (pad the "
                               f"table with (0, 0, 0) rows and -2 frames: relaxkv_kernels.memory.pad), got "
                               f"{len(plan.segments)} and {len(plan.frames_attended)}")
        for slot in plan.frame_slot:
            if not 0 <= slot < pl.n_slots:
                raise RuntimeError(f"{name}: frame slot {slot} is not one of the n_slots = {pl.n_slots} slots")
        n_rows, f = pl.n_rows, self.frame_tokens
        for i, (start, length, _) in enumerate(plan.segments):
            if start < 0 or length < 0 or start + length > n_rows:
                raise RuntimeError(f"{name}: segment {i} (start {start}, length {length}) is not inside the pool of "
                                   f"n_rows = {n_rows} rows (expected start >= 0, length >= 0, start + length <= "
                                   "n_rows)")
        read = {}  # slot -> a memory segment reading rows of it
        for i, (start, length, _) in enumerate(plan.segments[:plan.n_memory_seg]):
            if length:
                read.update(dict.fromkeys(range(start // f, (start + length - 1) // f + 1), i))
        for slot in plan.frame_slot:
            if slot in read:
                start, length, _ = plan.segments[read[slot]]
                raise RuntimeError(f"{name}: the chunk writes a frame into slot {slot} (rows {slot * f} to "
                                   f"{(slot + 1) * f - 1}), which memory segment {read[slot]} (rows {start} to "
                                   f"{start + length - 1}) still reads: evict that frame before reusing its slot")
        rows = plan.device_rows()
        if bool(rows) != plan.selects or bool(plan.selected_keys) != plan.selects or plan.selected_keys < 0:
            raise RuntimeError(f"{name}: expected selects=True with selected_keys > 0 exactly when frames_attended "
                               f"marks rows for the device step (-1), got selects={plan.selects}, selected_keys="
                               f"{plan.selected_keys}, device rows {rows}")
        if total > self.planner.max_keys:
            raise RuntimeError(f"{name}: expected at most max_keys = {self.planner.max_keys} keys, got {total}")

    def end_chunk(self) -> None:
        """Finish the chunk (its refresh pass has written the final K/V): check every layer ran every pass, commit.

        Raises RuntimeError, naming the layers, when some layer ran fewer passes than the others (its
        rows would hold stale or uninitialised K/V for every later chunk). Once a chunk step was captured
        (:meth:`capture`), a chunk with no ``attend`` call since ``begin_chunk`` is its replay.
        """
        if not self._in_chunk or self._rewriting:
            raise RuntimeError(f"KVCache.end_chunk: no chunk in progress (call begin_chunk() before the passes of "
                               f"chunk {self.chunk}, end_chunk() once after its refresh pass"
                               f"{'; a rewrite ends with end_rewrite()' if self._rewriting else ''})")
        self._check_calls("KVCache.end_chunk", f"chunk {self.chunk}", replayed=self._captured is not None)
        self.active_mode.commit(self.last_plan)
        self.planner.commit(self.step_context(None))
        self._in_chunk = False
        self.chunk += 1

    def _check_calls(self, op: str, what: str, replayed: bool = False) -> None:
        """RuntimeError unless every layer attended as many times as the others, at least once (``replayed``: a
        chunk whose passes all ran from a captured graph's replays counts no call)."""
        calls = [a + b for a, b in zip(self._calls, self._traced_calls.tolist())]
        most = max(calls)
        if most == 0 and not replayed:
            raise RuntimeError(f"{op}: no layer attended in {what}: run every layer's passes (cache.attend) before "
                               f"{op.rpartition('.')[2]}(), or replay a chunk step captured inside cache.capture()")
        behind = [layer for layer, n in enumerate(calls) if n < most]
        if behind:
            raise RuntimeError(f"{op}: layers {behind} attended {sorted({calls[i] for i in behind})} times in {what}, "
                               f"the others {most}: every layer must run every pass (the last pass writes the K/V "
                               "later chunks read)")

    @contextlib.contextmanager
    def capture(self):
        """The explicit CUDA-graph mode: the passes run inside are the capture of this cache's chunk step.

        Use it around the capture, after ``begin_chunk`` (``with torch.cuda.graph(g), cache.capture(): ...``).
        From then on ``begin_chunk`` refuses a plan whose index shapes differ from the captured chunk's (a replay
        would read reallocated buffers: capture past the policy's warm-up), and a chunk whose passes all ran from
        replays (no eager ``attend`` between ``begin_chunk`` and ``end_chunk``) counts as the captured step. Several
        captures of one chunk (e.g. its first pass and a later one) may share one ``capture()`` block.
        """
        if not self._in_chunk or self._rewriting:
            raise RuntimeError("KVCache.capture: no chunk in progress: call begin_chunk() before capturing the "
                               f"passes of chunk {self.chunk} (a rewrite runs eagerly)")
        yield self
        self._captured = self._shapes

    # ------------------------------------------------------------------ host side: re-cache, between chunks

    def recache_frames(self, which: str) -> list[int]:
        """The frames a re-cache of kind ``which`` rewrites before the next chunk (host only; plans that chunk, as
        ``begin_chunk`` will again, so what it evicts is gone):

        - "none": [];
        - "recent": the planner's recent frames (:meth:`Planner.recent_frames`: the last chunk's frames the next chunk
          may read; a dense window: every frame after its sink, LongLive's local window);
        - "attended": every frame the next chunk may read at full resolution (:meth:`Planner.readable_frames`: its
          memory segments' frames and those a device step may choose, e.g. Relax's history candidates). Pack's
          compressed mid blocks are not frames: their full-resolution rows are gone, they keep their K/V.
        """
        if which not in RECACHE:
            raise ValueError(f"KVCache.recache_frames: expected one of {RECACHE}, got {which!r}")
        self._check_between("KVCache.recache_frames")
        if which == "none":
            return []
        plan = self.planner.plan(self.chunk)
        return self.planner.recent_frames(plan) if which == "recent" else self.planner.readable_frames(plan)

    def held_frames(self) -> list[int]:
        """Frames made so far that the memory holds at full resolution (a re-cache may rewrite them), sorted; the
        next chunk's frames are not made yet, even once its plan placed them."""
        made = self.chunk * self.policy.chunk_frames
        return sorted(fr for fr in self.planner.slots.slot_of if fr < made)

    def recache_groups(self, frames) -> list[list[int]]:
        """``frames`` (sorted, distinct) in the groups :meth:`begin_rewrite` takes: the frames of one chunk each (chunk
        ``c`` holds frames ``c * U`` to ``c * U + U - 1``), in order."""
        u, groups = self.policy.chunk_frames, {}
        for frame in self._check_frames("KVCache.recache_groups", frames, any_chunk=True):
            groups.setdefault(frame // u, []).append(frame)
        return list(groups.values())

    def begin_rewrite(self, frames) -> ChunkPlan:
        """Start a rewrite: one clean pass over the latents of ``frames``, which the memory holds at full resolution,
        that writes their K/V over their rows (a re-cache, e.g. under a new prompt). Between chunks only.

        ``frames``: sorted frame indices of one chunk (:meth:`recache_groups`). Then run the model's clean pass
        (timestep 0) over those frames' latents, ``[B, C, len(frames), h, w]``: every layer's ``attend`` takes
        ``[B, len(frames) * F, H, D]``, rotates q/k at the frames' own positions, writes their rows (and whatever the
        policy derives from them: Relax's prototypes, Pack's compressed copy of their block and its mean key, through
        :meth:`Planner.rewrite_index`), and attends to the frames the next chunk may read from earlier chunks (their
        rows as they are now: rewritten ones hold the new K/V) and to the frames themselves, at their true positions,
        in the segment-table attention (``sparse_kv_attention``). End with :meth:`end_rewrite`.

        Raises FrameNotHeldError for frames the memory dropped (or compressed) or that are not made yet, ValueError
        for frames of several chunks, RuntimeError inside a chunk. Nothing of the next chunk's plan changes.
        """
        op = "KVCache.begin_rewrite"
        self._check_between(op)
        frames = self._check_frames(op, frames)
        nxt = self.planner.plan(self.chunk)  # what the next chunk evicts is gone; re-planned alike at begin_chunk
        slot_of, u, f = self.planner.slots.slot_of, self.policy.chunk_frames, self.frame_tokens
        held = self.held_frames()
        missing = [fr for fr in frames if fr not in held]
        if missing:
            raise FrameNotHeldError(f"{op}: frames {missing} are not held at full resolution before chunk "
                                    f"{self.chunk} (held: {held}): the policy dropped them or they are not made yet")
        context = [fr for fr in self.planner.readable_frames(nxt) if fr // u < frames[0] // u]
        rows = context + frames
        plan = ChunkPlan(self.chunk, frames[0], [slot_of[fr] for fr in frames], frames,
                         [(slot_of[fr] * f, f, 0) for fr in rows], rows, [], nxt.slot_pos, n_memory_seg=len(context),
                         index=self.planner.rewrite_index(frames))
        buffers = PlanBuffers.allocate(1, self.batch, len(rows), len(frames), self.device)
        buffers.upload(plan)
        mode = SegmentsMode(self.geometry, self.storage, buffers, self.backend, "auto", self._section)
        self._start_passes(plan, mode, buffers, [buffers.seg[0]] * self.num_layers,
                           (self.batch, len(frames) * f, self.num_heads, self.head_dim))
        self._first, self._selects_layer = None, False
        self._layer_steps = [self.step_context(layer) for layer in range(self.num_layers)] if self._appends else []
        self._in_chunk = self._rewriting = True
        return plan

    def end_rewrite(self) -> None:
        """Finish the rewrite begun by :meth:`begin_rewrite`: every layer ran its pass (RuntimeError otherwise)."""
        if not self._rewriting:
            raise RuntimeError("KVCache.end_rewrite: no rewrite in progress (begin_rewrite(frames) first)")
        self._check_calls("KVCache.end_rewrite", f"the rewrite of frames {self.last_plan.frame_pos}")
        self.planner.commit(self.step_context(None))
        self._in_chunk = self._rewriting = False

    @property
    def pass_frames(self) -> int:
        """Latent frames a pass takes now: the policy's ``chunk_frames``, or a rewrite's frame count."""
        return self._pass_shape[1] // self.frame_tokens

    def _check_between(self, op: str) -> None:
        if self._in_chunk:
            what = "a rewrite" if self._rewriting else f"chunk {self.chunk}"
            raise RuntimeError(f"{op}: {what} is in progress: a re-cache runs between chunks (after end_chunk(), "
                               "before begin_chunk())")

    def _check_frames(self, op: str, frames, any_chunk: bool = False) -> list[int]:
        """``frames`` as a list of sorted distinct frame indices (of one chunk unless ``any_chunk``)."""
        frames = list(frames) if isinstance(frames, (list, tuple, range)) else None
        ok = frames is not None and all(isinstance(fr, int) and not isinstance(fr, bool) for fr in frames)
        if not ok or not frames or frames != sorted(set(frames)) or frames[0] < 0:
            raise ValueError(f"{op}: frames: expected sorted distinct frame indices >= 0, got {frames!r}")
        u = self.policy.chunk_frames
        if not any_chunk and frames[0] // u != frames[-1] // u:
            raise ValueError(f"{op}: frames: expected frames of one chunk of {u} (split them with recache_groups()), "
                             f"got {frames}")
        return frames

    def step_context(self, layer: int | None) -> StepContext:
        """What a planner's device step of the current chunk sees: at the chunk (``layer`` None) or at one layer.

        The cache hands it to the planner's steps; benchmarks and tests use it to run a step alone. Made once
        per chunk and layer (a planner's step runs at every pass of a layer).
        """
        key = -1 if layer is None else layer
        step = self._steps.get(key)
        if step is None:
            plan, s, buffers = self.last_plan, self.storage, self._buffers
            if layer is None:
                step = StepContext(plan, buffers.index, self._seg[0], None, None, None, s.state, s.proto, self.backend,
                                   self.heads, frame_slot=buffers.frame_slot)
            else:
                step = StepContext(plan, buffers.index, self._seg[layer], layer, *s.layers[layer],
                                   self._layer_state[layer], s.proto, self.backend, self.heads, *s.scales[layer],
                                   buffers.frame_slot)
            self._steps[key] = step
        return step

    # ------------------------------------------------------------------ device side, inside a chunk

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Rotate and cache this pass's K/V, run the policy's device steps, and attend over the planned memory.

        Args:
            layer: layer index. q, k, v: [B, U * F, H, D] after q/k norm, before RoPE, in the cache dtype,
                on the cache's device.

        Returns:
            [B, U * F, H, D] attention output.
        """
        op = "KVCache.attend"
        if not self._in_chunk:
            raise RuntimeError(f"{op}: call begin_chunk() before the first pass of a chunk")
        check_int(op, "layer", layer, low=0, high=self.num_layers - 1)
        for name, t in (("q", q), ("k", k), ("v", v)):
            check_tensor(op, name, t, shape=self._pass_shape, dtypes=(self.dtype,), device=self.device)
        if torch.compiler.is_compiling():
            self._traced_calls[layer] += 1
        else:
            self._calls[layer] += 1
        first = self._first is not None and self._first[layer]
        if first:
            self._first[layer] = False
        mode = self.active_mode
        with self._section("rope_append"):
            q_rot = mode.append(layer, q, k, v)
        if first and self._selects_layer:
            with self._section("select"):
                self.planner.select_layer(self._layer_steps[layer], q)
        if self._appends:
            with self._section("compress"):
                self.planner.append(self._layer_steps[layer], k, v)
        with self._section("attention"):
            return mode.attend(layer, q_rot, self._seg[layer], first)

    @property
    def chunk_engine(self) -> str | None:
        """The attention engine of the current chunk's calls (the tuning table's choice for "auto"); None in
        the segments mode."""
        return self.active_mode.chunk_engine

    def _section(self, name: str):
        return contextlib.nullcontext() if self.profiler is None else self.profiler(name)

    # ------------------------------------------------------------------ inspection (syncs: not on the hot path)

    def selected_frames(self, layer: int = 0) -> list[list[int]]:
        """Frame index attended by every segment of ``layer``'s table, per batch element (reads the device table;
        every layer shares one table unless the planner selects per layer). A compressed block shows its first
        frame."""
        check_int("KVCache.selected_frames", "layer", layer, low=0, high=self.num_layers - 1)
        plan = self.last_plan
        if plan is None:
            raise RuntimeError("KVCache.selected_frames: no chunk planned yet: call begin_chunk() first")
        out = []
        for row in self._seg[layer].cpu().tolist():
            frames = []
            for (start, _, _), planned in zip(row, plan.frames_attended):
                frames.append(planned if planned != -1 else self.planner.frame_of_row(plan, start))
            out.append(frames)
        return out

    def live_bytes(self) -> int:
        """Bytes of K/V rows holding frames or compressed blocks the memory can still read (all layers)."""
        return self.planner.live_rows() * self.storage.row_bytes()

    def pool_bytes(self) -> int:
        """Bytes of the K/V pools, their scales included when they are FP8 (a part of :meth:`memory_bytes`)."""
        return self.storage.pool_bytes()

    def memory_bytes(self) -> int:
        """Bytes of storage allocated by the cache: pools (with their scales when FP8), prototypes, policy state,
        tables and windows (:meth:`pool_bytes`: the pools and scales alone); the sum of :meth:`device_bytes` and
        :meth:`host_bytes`.

        Fixed at construction: pools are sized for the steady state (see :meth:`live_bytes` for use).
        """
        return self.storage.nbytes() + nbytes(self.plan_buffers.seg) + self.attention_mode.nbytes()

    def host_bytes(self) -> int:
        """Bytes the cache holds in host memory: the pools and their scales with ``pool_device="cpu"``, else 0."""
        return self.storage.host_bytes()

    def device_bytes(self) -> int:
        """Bytes the cache holds on its device: :meth:`memory_bytes` less :meth:`host_bytes`."""
        return self.memory_bytes() - self.host_bytes()
