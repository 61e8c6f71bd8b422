"""Per-model KV cache: owns the storage of every layer and runs one chunk's attention through the ops.

Usage inside an outside attention module (q, k, v after q/k RMSNorm, before RoPE)::

    cache = KVCache(RelaxMemory(), num_layers=30, batch=1, num_heads=12, head_dim=128,
                    height=30, width=52, dtype=torch.bfloat16, device="cuda")
    for chunk in range(n_chunks):
        cache.begin_chunk()                       # host-side plan, uploaded to device buffers
        for pass_ in range(5):                    # 4 denoising passes + the clean refresh pass
            for layer in range(30):
                out = cache.attend(layer, q, k, v)  # [B, U*F, H, D]
        cache.end_chunk()

The cache knows no policy: the planner plans each chunk and runs the policy's device steps (selection,
compression); the cache writes K/V, stages the attention window and calls the attention engine.

Attention modes (``attention=``):

    window    the default on CUDA. Within a chunk only the chunk's own K/V change between passes: at the
              first pass of a layer the memory rows (gathered, delta-rotated) are staged once into a
              per-layer window ``[B, max_keys, H, D]`` laid out [chunk frames | memory], every pass writes
              the chunk's rotated K/V into its first rows, and each call is one dense attention over the
              window on the fastest engine (``tuning.json``). ``end_chunk`` copies the chunk's final K/V
              into the pool. Costs one extra context per layer (``memory_bytes``).
    per_call  one window shared by all layers, re-gathered at every call (memory-tight: one context).
    segments  ``sparse_kv_attention`` over the segment table, no copy (the Triton kernel; the
              reference everywhere else); the default off CUDA.

When a chunk's keys are the pool's first rows at their true positions (a dense window without
re-rotation: ``ChunkPlan.pool_prefix``), window and per_call attend to the pool directly.

Within a chunk nothing reads device memory on the host: selections are written into the device
segment table by kernels, so the passes of a chunk can be captured in a CUDA graph once shapes are in
steady state (index buffers are reused in place when their shape does not change).
"""
from __future__ import annotations

import contextlib

import torch

from . import tuning
from .memory import ChunkPlan, MemoryPolicy
from .ops.checks import FLOAT_DTYPES, canonical_device, check_head_dim, check_int, check_tensor
from .ops.dense_attention.op import dense_attention_op, resolve_engine
from .ops.dense_attention.engines import ENGINES
from .ops.gather_kv_rope.op import gather_kv_rope_into_op
from .ops.rope_append.op import rope_append_op
from .ops.sparse_kv_attention.op import sparse_kv_attention_op

CACHE_BACKENDS = ("reference", "fused", "auto", "triton")
ATTENTION_MODES = ("auto", "window", "per_call", "segments")


class KVCache:
    """KV storage, per-chunk plans and attention windows for one memory policy, for all layers of a model.

    Args:
        policy: a memory policy (DenseWindow, RelaxMemory, PackMemory, or your own ``MemoryPolicy``).
        num_layers, batch, num_heads, head_dim: model geometry (head_dim even).
        height, width: token grid of a latent frame (F = height * width tokens).
        dtype: storage dtype of K and V (bf16 / fp16 / fp32). device: where everything lives.
        backend: "reference" (pure PyTorch), "fused" (kernels: CUDA/Triton on a GPU, the Triton
            interpreter on CPU), or an op backend name ("auto", "triton"); single ops can be sent to the
            CUDA extension with ``RELAXKV_BACKEND_<OP>=cuda``.
        attention: "window", "per_call", "segments" or "auto" (window on CUDA, segments elsewhere); see
            the module docstring.
        engine: attention engine of the window / per_call modes ("auto": the tuning table's choice per
            chunk shape; "reference" with the reference backend), see ``relaxkv_kernels.dense_attention``.
    """

    def __init__(self, policy: MemoryPolicy, num_layers: int, batch: int, num_heads: int, head_dim: int, height: int,
                 width: int, dtype: torch.dtype = torch.bfloat16, device="cpu", backend: str = "auto",
                 attention: str = "auto", engine: str = "auto"):
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
        if backend not in CACHE_BACKENDS:
            raise ValueError(f"{op}: backend: expected one of {CACHE_BACKENDS}, got {backend!r}")
        if attention not in ATTENTION_MODES:
            raise ValueError(f"{op}: attention: expected one of {ATTENTION_MODES}, got {attention!r}")
        if engine not in ("auto", *ENGINES):
            raise ValueError(f"{op}: engine: expected one of {('auto', *ENGINES)}, got {engine!r}")
        self.device = canonical_device(device)
        if backend == "fused":
            backend = "auto" if self.device.type == "cuda" else "triton"
        if attention == "auto":
            attention = "window" if self.device.type == "cuda" else "segments"
        if engine == "auto" and backend == "reference":
            engine = "reference"
        self.backend, self.attention, self.engine = backend, attention, engine
        self.policy, self.num_layers = policy, num_layers
        self.batch, self.num_heads, self.head_dim = batch, num_heads, head_dim
        self.height, self.width, self.frame_tokens = height, width, height * width
        self.dtype = dtype
        self.planner = pl = policy.planner(height, width)
        dev = self.device
        self.k = torch.empty(num_layers, batch, pl.n_rows, num_heads, head_dim, dtype=dtype, device=dev)
        self.v = torch.empty_like(self.k)
        self.proto = None  # layer 0's per-frame prototypes, for policies that score frames
        if pl.needs_prototypes:
            self.proto = torch.empty(batch, pl.n_slots, head_dim, dtype=torch.float32, device=dev)
        self.state = pl.allocate(self)
        seg_tables = num_layers if pl.selection == "per_layer" else 1
        self.seg = torch.zeros(seg_tables, batch, pl.n_seg, 3, dtype=torch.int32, device=dev)
        # attention windows: per layer (window), one shared (per_call), none (segments)
        windows = {"window": num_layers, "per_call": 1}.get(attention, 0) if pl.gathers else 0
        self.win_k = torch.empty(windows, batch, pl.max_keys, num_heads, head_dim, dtype=dtype, device=dev)
        self.win_v = torch.empty_like(self.win_k)
        self._proto_chunk = None  # window mode: the chunk's prototypes, committed by end_chunk
        if windows and attention == "window" and self.proto is not None:
            self._proto_chunk = torch.empty(batch, policy.chunk_frames, head_dim, dtype=torch.float32, device=dev)
        # device index tensors of the plans; the window's chunk slots 0 .. U-1 are the same for every chunk
        self.buffers: dict[str, torch.Tensor] = {"window_slot": torch.arange(policy.chunk_frames, device=dev)}
        self.chunk = 0
        self.last_plan: ChunkPlan | None = None
        self.last_scores: dict[int, torch.Tensor] = {}
        self._in_chunk = False
        self._captured = None  # the shapes of the chunk a CUDA graph captured (replays need the same)
        self._pending_select: set[int] = set()
        self._pending_stage: set[int] = set()
        # optional name -> context manager timing the sections of attend: rope_append, select, compress,
        # attention (with stage, the window staging, inside it); CUDA events work in eager runs and captures
        self.profiler = None

    # ------------------------------------------------------------------ host side, between chunks

    def begin_chunk(self) -> ChunkPlan:
        """Plan the next chunk (eviction, slots, static segments) and upload it; call before its first pass.

        Calling it again before ``end_chunk`` plans the same chunk again (same slots) and restores its
        pending device steps, e.g. to capture the chunk step in a CUDA graph after a warm-up run.
        """
        plan = self.planner.plan(self.chunk)
        u = len(plan.frame_slot)
        if u != self.policy.chunk_frames or plan.segments[plan.n_memory_seg: plan.n_memory_seg + u] != [
                (s * self.frame_tokens, self.frame_tokens, 0) for s in plan.frame_slot]:
            raise RuntimeError(f"KVCache.begin_chunk: {type(self.planner).__name__}.plan({self.chunk}): expected the "
                               f"{self.policy.chunk_frames} chunk frames at delta 0 right after the "
                               f"{plan.n_memory_seg} memory segments")
        self.last_plan = plan
        self._upload("frame_slot", plan.frame_slot)
        self._upload("frame_pos", plan.frame_pos)
        for name, values in plan.index.items():
            self._upload(name, values)
        seg = torch.tensor(plan.segments, dtype=torch.int32)
        self.seg.copy_(seg.expand_as(self.seg), non_blocking=True)
        layers = set(range(self.num_layers))
        self._pending_select = set()
        if plan.selects:
            self._pending_select = {0} if self.planner.selection == "layer0" else set(layers)
        self._pending_stage = set(layers)
        self.last_scores = {}
        self._prefix = plan.pool_prefix()
        if self._prefix is None and not self.planner.gathers:
            raise RuntimeError(f"KVCache.begin_chunk: {type(self.planner).__name__}.gathers is False but the plan of "
                               f"chunk {self.chunk} is not a pool prefix at delta 0")
        self._total = plan.total_keys()
        self._memory = plan.memory_keys()
        shapes = (tuple((n, tuple(t.shape)) for n, t in sorted(self.buffers.items())), plan.n_memory_seg, self._total,
                  self._prefix)
        if self._captured is not None and shapes != self._captured:
            raise RuntimeError(f"KVCache.begin_chunk: chunk {self.chunk} changes the plan's shapes since a CUDA graph "
                               "captured a chunk step of this cache, so a replay would read stale buffers; capture once "
                               "the plans are steady (past the policy's warm-up), or make a new cache")
        self._shapes = shapes
        self._engine = self.engine
        if self.attention != "segments":
            self._engine = resolve_engine(self.engine, self.device, self.dtype, self.head_dim, u * self.frame_tokens,
                                          self._total)
        self._in_chunk = True
        return plan

    def end_chunk(self) -> None:
        """Finish the chunk (its refresh pass has written the final K/V): commit the window's chunk rows to the pool.

        A chunk step captured in a CUDA graph (after ``begin_chunk``, which resets the pending
        steps so the capture includes them) is replayed between ``begin_chunk`` and ``end_chunk``
        of later chunks: ``begin_chunk`` refreshes the index buffers in place once shapes are steady.
        """
        if not self._in_chunk:
            raise RuntimeError(f"KVCache.end_chunk: no chunk in progress (call begin_chunk() before the passes of "
                               f"chunk {self.chunk}, end_chunk() once after its refresh pass)")
        if self._stages_window():
            f = self.frame_tokens
            for u, slot in enumerate(self.last_plan.frame_slot):  # every layer at once: one copy per frame
                self.k[:, :, slot * f:(slot + 1) * f].copy_(self.win_k[:, :, u * f:(u + 1) * f])
                self.v[:, :, slot * f:(slot + 1) * f].copy_(self.win_v[:, :, u * f:(u + 1) * f])
                if self._proto_chunk is not None:
                    self.proto[:, slot].copy_(self._proto_chunk[:, u])
        self._in_chunk = False
        self.chunk += 1

    def _upload(self, name: str, values: list[int]) -> None:
        host = torch.tensor(values, dtype=torch.int64)
        buf = self.buffers.get(name)
        if buf is None or buf.shape != host.shape:
            self.buffers[name] = host.to(self.device)
        else:
            buf.copy_(host, non_blocking=True)

    def _stages_window(self) -> bool:
        """Window mode with memory that needs gathering (not a pool prefix): the chunk's K/V go to the window."""
        return self.attention == "window" and self._prefix is None

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
        if self.device.type == "cuda" and not torch.compiler.is_compiling() and torch.cuda.is_current_stream_capturing():
            self._captured = self._shapes
        plan, pl, b, be = self.last_plan, self.planner, self.buffers, self.backend
        u_rows = len(plan.frame_slot) * self.frame_tokens
        shape = (self.batch, u_rows, self.num_heads, self.head_dim)
        for name, t in (("q", q), ("k", k), ("v", v)):
            check_tensor(op, name, t, shape=shape, dtypes=(self.dtype,), device=self.device)
        staged = self._stages_window()
        with self._section("rope_append"):
            if staged:  # the chunk's rows of the window (slots 0 .. U-1); the pool gets them at end_chunk
                dst_k, dst_v, slots, proto = self.win_k[layer], self.win_v[layer], b["window_slot"], self._proto_chunk
            else:
                dst_k, dst_v, slots, proto = self.k[layer], self.v[layer], b["frame_slot"], self.proto
            proto = proto if layer == 0 else None
            q_rot = rope_append_op(q, k, v, dst_k, dst_v, proto, slots, b["frame_pos"], self.height, self.width, be)
        seg = self.seg[layer if self.seg.shape[0] > 1 else 0]
        if layer in self._pending_select:
            with self._section("select"):
                self.last_scores[layer] = pl.select(self, plan, layer, q, seg)
            self._pending_select.discard(layer)
        with self._section("compress"):
            pl.append(self, plan, layer, k, v)
        with self._section("attention"):
            return self._attention(layer, q_rot, seg, staged, u_rows)

    def _attention(self, layer: int, q_rot: torch.Tensor, seg: torch.Tensor, staged: bool, u_rows: int) -> torch.Tensor:
        scale = self.head_dim ** -0.5
        if self.attention == "segments":
            return sparse_kv_attention_op(q_rot, self.k[layer], self.v[layer], seg, scale, self.backend)
        if self._prefix is not None:  # the keys are the pool's first rows: no copy
            kw, vw = self.k[layer][:, : self._prefix], self.v[layer][:, : self._prefix]
        elif staged:  # [chunk rows | memory rows]: the memory is staged once per chunk
            kw, vw = self.win_k[layer][:, : u_rows + self._memory], self.win_v[layer][:, : u_rows + self._memory]
            if layer in self._pending_stage:
                with self._section("stage"):
                    n_mem = self.last_plan.n_memory_seg
                    gather_kv_rope_into_op(self.k[layer], self.v[layer], seg[:, :n_mem], kw[:, u_rows:], vw[:, u_rows:],
                                           self.backend)
                self._pending_stage.discard(layer)
        else:  # per_call: every segment gathered into the shared window at every call
            kw, vw = self.win_k[0][:, : self._total], self.win_v[0][:, : self._total]
            gather_kv_rope_into_op(self.k[layer], self.v[layer], seg, kw, vw, self.backend)
        return dense_attention_op(q_rot, kw, vw, scale, self._engine)

    def _section(self, name: str):
        return contextlib.nullcontext() if self.profiler is None else self.profiler(name)

    # ------------------------------------------------------------------ inspection (syncs: not on the hot path)

    def selected_frames(self) -> list[list[int]]:
        """Frame index attended by every segment of layer 0, per batch element (reads the device table)."""
        plan = self.last_plan
        out = []
        for row in self.seg[0].cpu().tolist():
            frames = []
            for (start, _, _), planned in zip(row, plan.frames_attended):
                if planned != -1:
                    frames.append(planned)
                else:
                    frames.append(self.planner.frame_of_row(plan, start))
            out.append(frames)
        return out

    def live_bytes(self) -> int:
        """Bytes of K/V rows holding frames or compressed blocks the memory can still read (all layers)."""
        per_row = 2 * self.num_layers * self.batch * self.num_heads * self.head_dim * self.k.element_size()
        return self.planner.live_rows() * per_row

    def memory_bytes(self) -> int:
        """Bytes of device storage allocated by the cache: pools, prototypes, policy state, tables and windows.

        Fixed at construction: pools are sized for the steady state (see :meth:`live_bytes` for use).
        """
        tensors = [self.k, self.v, self.seg, self.win_k, self.win_v, *self.state.values()]
        tensors += [t for t in (self.proto, self._proto_chunk) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)
