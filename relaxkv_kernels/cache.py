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

Within a chunk nothing reads device memory on the host: selections are written into the device
segment table by kernels, so the passes of a chunk can be captured in a CUDA graph once shapes are in
steady state (index buffers are reused in place when their shape does not change).
"""
from __future__ import annotations

import contextlib

import torch

from . import ops, tuning
from .memory import ChunkPlan, DenseWindow, PackMemory, RelaxMemory
from .validate import FLOAT_DTYPES, check_head_dim, check_int, check_tensor

CACHE_BACKENDS = ("reference", "fused", "auto", "triton")


class KVCache:
    """KV storage and per-chunk plans for one memory policy, for all layers of a model.

    Args:
        policy: DenseWindow, RelaxMemory or PackMemory.
        num_layers, batch, num_heads, head_dim: model geometry (head_dim even).
        height, width: token grid of a latent frame (F = height * width tokens).
        dtype: storage dtype of K and V (bf16 / fp16 / fp32). device: where everything lives.
        backend: "reference" (pure PyTorch), "fused" (kernels: CUDA/Triton on a GPU, the Triton
            interpreter on CPU), or an op backend name ("auto", "triton"); single ops can be sent to the
            CUDA extension with ``RELAXKV_BACKEND_<OP>=cuda``.
    """

    def __init__(self, policy, num_layers: int, batch: int, num_heads: int, head_dim: int, height: int,
                 width: int, dtype: torch.dtype = torch.bfloat16, device="cpu", backend: str = "auto"):
        op = "KVCache"
        if not isinstance(policy, (DenseWindow, RelaxMemory, PackMemory)):
            raise TypeError(f"{op}: policy: expected DenseWindow, RelaxMemory or PackMemory, got {type(policy).__name__}")
        for name, value in (("num_layers", num_layers), ("batch", batch), ("num_heads", num_heads),
                            ("height", height), ("width", width)):
            check_int(op, name, value, low=1)
        check_head_dim(op, "head_dim", head_dim)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: dtype: expected one of {FLOAT_DTYPES}, got {dtype}")
        if backend not in CACHE_BACKENDS:
            raise ValueError(f"{op}: backend: expected one of {CACHE_BACKENDS}, got {backend!r}")
        self.device = torch.device(device)
        if backend == "fused":
            backend = "auto" if self.device.type == "cuda" else "triton"
        self.backend = backend
        self.policy, self.num_layers = policy, num_layers
        self.batch, self.num_heads, self.head_dim = batch, num_heads, head_dim
        self.height, self.width, self.frame_tokens = height, width, height * width
        self.dtype = dtype
        self.planner = policy.planner(height, width)
        pl, dev = self.planner, self.device
        self.k = torch.empty(num_layers, batch, pl.n_rows, num_heads, head_dim, dtype=dtype, device=dev)
        self.v = torch.empty_like(self.k)
        self.proto = torch.empty(num_layers, batch, pl.n_slots, head_dim, dtype=torch.float32, device=dev)
        self.mean_key = None
        if isinstance(policy, PackMemory):
            self.mean_key = torch.empty(num_layers, batch, pl.n_blocks, num_heads, head_dim, dtype=torch.float32, device=dev)
        seg_tables = num_layers if isinstance(policy, PackMemory) else 1  # Pack selects per layer
        self.seg = torch.zeros(seg_tables, batch, pl.n_seg, 3, dtype=torch.int32, device=dev)
        self._buffers: dict[str, torch.Tensor] = {}
        self.chunk = 0
        self.last_plan: ChunkPlan | None = None
        self.last_scores: dict[int, torch.Tensor] = {}
        self._pending: set[int] = set()
        self.profiler = None  # optional name -> context manager, timing the sections of attend (eager only)

    # ------------------------------------------------------------------ host side, between chunks

    def begin_chunk(self) -> ChunkPlan:
        """Plan the next chunk (eviction, slots, static segments) and upload it; call before its first pass."""
        plan = self.planner.plan(self.chunk)
        self.last_plan = plan
        self._upload("frame_slot", plan.frame_slot)
        self._upload("frame_pos", plan.frame_pos)
        seg = torch.tensor(plan.segments, dtype=torch.int32)
        self.seg.copy_(seg.expand_as(self.seg), non_blocking=True)
        self.last_scores = {}
        self._pending = set()
        self._total = sum(length for _, length, _ in plan.segments)  # keys per batch element, selections included
        if plan.relax is not None:
            job = plan.relax
            self._upload("slot_pos", plan.slot_pos)
            for name in ("sink_slots", "tail_slots", "cand_slots", "target_pos"):
                self._upload(name, getattr(job, name))
            self._pending = {0}
            self._total += len(job.target_pos) * self.frame_tokens
        if plan.pack is not None:
            job = plan.pack
            self._upload("block_pos", plan.block_pos)
            if job.block_slot is not None:
                self._upload("block_slot", [job.block_slot])
                self._upload("block_t0", [plan.start_frame])
            if job.target_pos:
                self._upload("mid_slots", job.mid_slots)
                self._upload("mid_target_pos", job.target_pos)
                self._pending = set(range(self.num_layers))
                self._total += len(job.target_pos) * self.planner.block_tokens
        u = len(plan.frame_slot) * self.frame_tokens
        self._impl = tuning.choose_impl(str(self.device), self.head_dim, u, self._total)
        return plan

    def end_chunk(self) -> None:
        """Finish the chunk (its refresh pass has written the final K/V).

        A chunk step captured in a CUDA graph (after ``begin_chunk``, which resets the pending
        selections so the capture includes them) is replayed between ``begin_chunk`` and ``end_chunk``
        of later chunks: ``begin_chunk`` refreshes the index buffers in place once shapes are steady.
        """
        self.chunk += 1

    def _upload(self, name: str, values: list[int]) -> None:
        host = torch.tensor(values, dtype=torch.int64)
        buf = self._buffers.get(name)
        if buf is None or buf.shape != host.shape:
            self._buffers[name] = host.to(self.device)
        else:
            buf.copy_(host, non_blocking=True)

    # ------------------------------------------------------------------ device side, inside a chunk

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Rotate and cache this pass's K/V, run pending selections, and attend over the planned memory.

        Args:
            layer: layer index. q, k, v: [B, U * F, H, D] after q/k norm, before RoPE, in the cache dtype.

        Returns:
            [B, U * F, H, D] attention output.
        """
        if self.last_plan is None:
            raise RuntimeError("KVCache.attend: call begin_chunk() before the first pass of a chunk")
        check_int("KVCache.attend", "layer", layer, low=0, high=self.num_layers - 1)
        u = len(self.last_plan.frame_slot)
        shape = (self.batch, u * self.frame_tokens, self.num_heads, self.head_dim)
        for name, t in (("q", q), ("k", k), ("v", v)):
            check_tensor("KVCache.attend", name, t, shape=shape, dtypes=(self.dtype,), device=self.device)
        b, be = self._buffers, self.backend
        with self._section("rope_append"):
            q_rot = ops.rope_append(q, k, v, self.k[layer], self.v[layer], self.proto[layer], b["frame_slot"],
                                    b["frame_pos"], self.height, self.width, backend=be)
        seg = self.seg[layer if self.seg.shape[0] > 1 else 0]
        plan = self.last_plan
        if plan.relax is not None and layer in self._pending:
            p = self.policy
            with self._section("select"):
                self.last_scores[layer] = ops.relax_select(
                    self.proto[0], b["slot_pos"], b["sink_slots"], b["tail_slots"], b["cand_slots"], seg,
                    plan.relax.seg_index, b["target_pos"], self.frame_tokens, p.lam, p.batch0_decides,
                    p.contiguous_rope, backend=be)
            self._pending.discard(layer)
        if plan.pack is not None:
            pl = self.planner
            if plan.pack.block_slot is not None:
                with self._section("compress"):
                    ops.compress_kv(k, v, self.k[layer], self.v[layer], self.mean_key[layer], b["block_slot"],
                                    b["block_t0"], pl.row0, self.policy.block_frames, self.height, self.width,
                                    backend=be)
            if layer in self._pending:
                with self._section("select"):
                    self.last_scores[layer] = ops.mid_select(
                        q, self.mean_key[layer], b["mid_slots"], b["block_pos"], seg, plan.pack.seg_index,
                        b["mid_target_pos"], pl.row0, pl.block_tokens, min(self.policy.q_stride, q.shape[1]),
                        backend=be)
                self._pending.discard(layer)
        with self._section("attention"):
            return ops.sparse_kv_attention(q_rot, self.k[layer], self.v[layer], seg, backend=be,
                                           impl=self._impl, total=self._total)

    def _section(self, name: str):
        return contextlib.nullcontext() if self.profiler is None else self.profiler(name)

    # ------------------------------------------------------------------ inspection (syncs: not on the hot path)

    def selected_frames(self) -> list[list[int]]:
        """Frame index attended by every segment of layer 0, per batch element (reads the device table)."""
        plan, f = self.last_plan, self.frame_tokens
        slot_pos = plan.slot_pos
        out = []
        for row in self.seg[0].cpu().tolist():
            frames = []
            for (start, length, _), planned in zip(row, plan.frames_attended):
                if planned != -1:
                    frames.append(planned)
                elif start < self.planner.n_slots * f:
                    frames.append(slot_pos[start // f])
                else:  # a compressed Pack block: report its first frame
                    blk = (start - self.planner.row0) // self.planner.block_tokens
                    frames.append(plan.block_pos[blk])
            out.append(frames)
        return out

    def live_bytes(self) -> int:
        """Bytes of K/V rows holding frames or compressed blocks the memory can still read (all layers)."""
        pl = self.planner
        rows = len(pl.slots.slot_of) * self.frame_tokens
        if self.mean_key is not None:
            rows += sum(pos >= 0 for pos in pl.block_pos) * pl.block_tokens
        per_row = 2 * self.num_layers * self.batch * self.num_heads * self.head_dim * self.k.element_size()
        return rows * per_row

    def memory_bytes(self) -> int:
        """Bytes of device storage allocated by the cache (K, V, prototypes, mean keys, segment tables).

        Fixed at construction: pools are sized for the steady state (see :meth:`live_bytes` for use).
        """
        tensors = [self.k, self.v, self.proto, self.seg] + ([self.mean_key] if self.mean_key is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)
