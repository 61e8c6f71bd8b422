"""Per-chunk benchmark: one steady-state chunk of an AR video rollout (layers x passes attention calls).

    python -m benchmarks chunk --shapes wan --configs dense,relax,pack --write-tuning   # on a GPU
    python -m benchmarks chunk --shapes tiny                                          # CPU smoke (CPU time)

Configs (docs/pages/design.md): dense 21 frames (4680 q x 32760 k), relax 7 frames (4680 x 10920), pack
(6240 x 27872 = 8 sink frames + 16 x 182 mid tokens + 4 recent + 4 current), each at a steady-state
chunk (planner fast-forwarded, pools random). Rows, all per chunk, same run, same device:

    bound[b]             attention-only bound: SDPA backend b (cudnn, flash; strict, no fallback) on
                         pre-gathered, pre-rotated contiguous K/V, one tensor per layer
    official             official-style unfused path: write the chunk's pre-RoPE K/V, slice + cat of the attended
                         frames, float64 complex RoPE of Q and every gathered key (Wan's causal_rope_apply),
                         SDPA with torch's default dispatch; its selection with the host sync the official code has
    step[mode:engine]    the complete chunk step through ``KVCache`` (begin_chunk, every pass of every layer:
                         rope_append + selection + staging + attention, end_chunk), eager, for
                         mode = window (per-chunk window, each engine), per_call (one shared window, re-gathered
                         every call), segments (the fused segment-table Triton kernel)
    step[...]+graph      the same with the passes replayed from one CUDA graph (captured once in steady state)
    step[...]+fp8        ``--kv-dtype fp8``: the step with FP8 pools (``kv_dtype=torch.float8_e4m3fn``) in the mode
                         "auto" picks for them on CUDA (per_call for dense: memory first) and in the window mode,
                         eager and graphed, next to the bf16-pool steps of the same run (target: <= 1.03x the best
                         bf16 step)
    step[...]+host       ``--pools host``: the window step with the pools in pinned host memory
                         (``pool_device="cpu"``), eager and graphed, next to the device-pool steps of the same run
                         (target: <= 1.05x the best device-pool step); with ``--staging`` once per staging
                         (``KVCache(staging=...)``: at the first call, one layer ahead, every layer ahead on a side
                         stream; ``+next_layer`` / ``+all_layers`` rows), the targets naming the fastest
    append / stage / select   rope_append (every call), the window staging (gather_kv_rope_into, once per
                         layer) and the selection, each timed alone; with ``--kv-dtype fp8`` also stage_fp8 (the
                         staging from FP8 pools) and copy_fp8 (a device copy of the same bytes, its bandwidth bound);
                         with ``--pools host`` stage_host (the staging from host pools: pool bytes read over PCIe per
                         second) and copy_h2d (a pinned host-to-device copy of the same bytes: target >= 80% of it)

FLOP per chunk = 4 * Nq * Nk * H * D * layers * passes; TFLOP/s and the fraction of the bf16 matmul peak
measured in the same run. ``--write-tuning`` records the fastest window engine per config in
relaxkv_kernels/ops/dense_attention/tuning.json (read by engine="auto"). The last table printed is the targets: best
complete step / cuDNN bound (dense <= 1.06, relax <= 1.12, pack <= 1.08), speed-up over the official-style path, and
the dense / relax whole-chunk ratio (>= 2.8).
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from benchmarks import common

common.configure_triton()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import relaxkv_kernels as rk  # noqa: E402
from relaxkv_kernels.cache.modes import STAGINGS  # noqa: E402
from relaxkv_kernels.cache.modes import resolve_attention  # noqa: E402
from relaxkv_kernels.geometry import ROPE_THETA  # noqa: E402
from relaxkv_kernels.geometry import compressed_positions  # noqa: E402
from relaxkv_kernels.geometry import rope_angles  # noqa: E402
from relaxkv_kernels.geometry import rope_pair_split  # noqa: E402
from relaxkv_kernels.geometry import token_positions  # noqa: E402
from relaxkv_kernels.ops.dense_attention import tuning  # noqa: E402
from relaxkv_kernels.ops.dense_attention.engines import ENGINES  # noqa: E402
from relaxkv_kernels.ops.dense_attention.engines import available  # noqa: E402
from relaxkv_kernels.ops.mid_select.reference import mid_affinity_literal  # noqa: E402
from relaxkv_kernels.ops.mid_select.reference import subsample_queries  # noqa: E402
from relaxkv_kernels.ops.relax_select.reference import frame_means_literal  # noqa: E402
from relaxkv_kernels.ops.relax_select.reference import set_prototype  # noqa: E402
from relaxkv_kernels.ops.rope_append.op import rope_append_op  # noqa: E402

CONFIGS = {
    # policy, steady-state chunk index (dense: window full; relax: 120-frame reservoir full;
    # pack: 64-block archive full)
    "dense": (rk.DenseWindow, 8),
    "relax": (rk.RelaxMemory, 45),
    "pack": (rk.PackMemory, 70),
}
FP8 = torch.float8_e4m3fn
EXPECTED_WAN = {"dense": (4680, 32760), "relax": (4680, 10920), "pack": (6240, 27872)}  # docs/pages/design.md
TARGETS = {"dense": 1.06, "relax": 1.12, "pack": 1.08}  # best complete step / cuDNN bound, at most
BOUNDS = ("cudnn", "flash")
WINDOW_ENGINES = ("sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "triton", "flash_attn", "flash_attn_cute")


@dataclasses.dataclass
class ChunkSetup:
    """One config at one shape: the policy, its steady-state chunk, token counts, random q/k/v of a chunk."""

    config: str
    shape: common.Shape
    device: torch.device
    policy: object
    steady: int
    nq: int
    nk: int
    qkv: tuple

    def cache(self, **kw) -> rk.KVCache:
        """A KVCache fast-forwarded (planner only) to the steady-state chunk, pools and policy state random."""
        s = self.shape
        cache = rk.KVCache(self.policy, s.layers, s.batch, s.heads, s.head_dim, s.height, s.width, s.torch_dtype,
                           self.device, **kw)
        for n in range(self.steady):
            cache.planner.plan(n)
        cache.chunk = self.steady
        gen = torch.Generator(device=self.device).manual_seed(0)
        st = cache.storage
        tensors = [st.k, st.v] + [t for t in (st.proto,) if t is not None] + list(st.state.values())
        for t in tensors:
            for part in (t if t.dim() == 5 else t[None]):  # per layer: no full-size fp32 temporary at Wan shapes
                part.copy_(torch.randn(part.shape, generator=gen, device=self.device) * (64 if st.fp8 else 1))
        for scale in (st.k_scale, st.v_scale):  # FP8 codes of about N(0, 64^2) times 2^-6: values about N(0, 1)
            if scale is not None:
                scale.fill_(2.0**-6)
        return cache


def build_setup(config: str, shape: common.Shape, device: torch.device, seed: int = 0) -> ChunkSetup:
    policy_cls, steady = CONFIGS[config]
    policy = policy_cls()
    plan = policy.planner(shape.height, shape.width)
    for n in range(steady + 1):
        last = plan.plan(n)
    gen = torch.Generator(device=device).manual_seed(seed)
    nq = policy.chunk_frames * shape.frame_tokens
    qkv = tuple(torch.randn(shape.batch, nq, shape.heads, shape.head_dim, generator=gen, device=device)
                .to(shape.torch_dtype) for _ in range(3))
    return ChunkSetup(config, shape, device, policy, steady, nq, last.total_keys(), qkv)


# ----------------------------------------------------------------------------------------------------
# the official-style unfused path


def wan_rope_table(head_dim: int, device, max_len: int = 1024) -> list[torch.Tensor]:
    """Wan's ``rope_params`` tables: complex128 [max_len, pairs] for the temporal, height and width axes."""
    tables = []
    for pairs in rope_pair_split(head_dim):
        d = 2 * pairs
        inv = 1.0 / torch.pow(ROPE_THETA, torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)
        ang = torch.outer(torch.arange(max_len, dtype=torch.float64, device=device), inv)
        tables.append(torch.polar(torch.ones_like(ang), ang))
    return tables


class OfficialRope:
    """Float64 complex RoPE as Wan's ``causal_rope_apply`` does it, for a fixed list of token positions.

    Integer positions index the complex128 tables (Wan's path); fractional ones (Pack's compressed
    tokens) go through ``torch.polar`` of float64 angles. Either way the per-call work is: build the
    [N, D/2] complex factors, view x as complex128, multiply, view back, cast to x's dtype.
    """

    def __init__(self, pos: torch.Tensor, head_dim: int, device):
        pos = pos.to(torch.float64)
        self.integer = bool((pos == pos.round()).all())
        if self.integer:
            self.tables = wan_rope_table(head_dim, device)
            self.index = [pos[:, a].long().to(device) for a in range(3)]
        else:
            self.angles = rope_angles(pos, head_dim).to(device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b, n, h, d = x.shape
        if self.integer:
            freqs = torch.cat([t[i] for t, i in zip(self.tables, self.index)], dim=-1)
        else:
            freqs = torch.polar(torch.ones_like(self.angles), self.angles)
        xc = torch.view_as_complex(x.to(torch.float64).reshape(b, n, h, -1, 2))
        return torch.view_as_real(xc * freqs[:, None]).flatten(3).to(x.dtype)


class OfficialPath:
    """Slice + cat of cached pre-RoPE frames, float64 RoPE of Q and the keys, cast back, SDPA (per call).

    Its tables come from a reference-backend cache at the same steady-state chunk whose selection has run,
    so it attends to exactly the frames the fused paths attend to.
    """

    def __init__(self, su: ChunkSetup):
        self.su = su
        s, f = su.shape, su.shape.frame_tokens
        self.cache = cache = su.cache(backend="reference", attention="segments")
        plan = cache.begin_chunk()  # runs a chunk-level selection (Relax)
        if plan.selects and cache.planner.selection == "per_layer":  # every layer's choice (Pack) into its table
            for layer in range(s.layers):
                cache.planner.select_layer(cache.step_context(layer), su.qkv[0])
        self.plan = plan
        self.rows, self.k_rope = [], []
        for table in cache.plan_buffers.seg[:, 0].cpu().tolist():  # batch element 0's tables (B = 1 in every shape)
            rows, pos = [], []
            for start, length, delta in table:
                if length == 0:
                    continue
                rows.append((start, length))
                pl = cache.planner
                if start >= pl.n_slots * f:  # a compressed Pack block
                    t0 = plan.index.block_pos[(start - pl.row0) // pl.block_tokens] + delta
                    pos.append(compressed_positions(t0, su.policy.block_frames, s.height, s.width))
                else:
                    pos.append(token_positions(torch.tensor([plan.slot_pos[start // f] + delta]), s.height, s.width))
            self.rows.append(rows)
            self.k_rope.append(OfficialRope(torch.cat(pos), s.head_dim, su.device))
        self.q_rope = OfficialRope(token_positions(torch.tensor(plan.frame_pos), s.height, s.width), s.head_dim,
                                   su.device)
        self.current = [(slot * f, u * f) for u, slot in enumerate(plan.frame_slot)]

    def gather(self, layer: int):
        su, cache, f = self.su, self.cache, self.su.shape.frame_tokens
        q, k, v = su.qkv
        t = layer if len(self.rows) > 1 else 0
        k_pool, v_pool = cache.storage.k[layer], cache.storage.v[layer]
        for row, src in self.current:  # kv_cache[:, s:e] = k, as the official code writes the chunk
            k_pool[:, row:row + f] = k[:, src:src + f]
            v_pool[:, row:row + f] = v[:, src:src + f]
        keys = torch.cat([k_pool[:, a:a + n] for a, n in self.rows[t]], dim=1)
        values = torch.cat([v_pool[:, a:a + n] for a, n in self.rows[t]], dim=1)
        return self.q_rope(q), self.k_rope[t](keys), values

    def attend(self, layer: int):
        q, k, v = self.gather(layer)
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))

    def selection(self) -> None:
        """Official-style scoring from raw keys, with the host sync the official code has (.item() / .tolist())."""
        su, cache, plan, f = self.su, self.cache, self.plan, self.su.shape.frame_tokens
        if isinstance(su.policy, rk.RelaxMemory):
            k0 = cache.storage.k[0]

            def frames(slots):  # [B, n, F, H, D]
                return torch.stack([k0[:, sl * f:(sl + 1) * f] for sl in slots], dim=1)

            index = plan.index
            p_sink = set_prototype(frame_means_literal(frames(index.sink_slots)))
            p_tail = set_prototype(frame_means_literal(frames(index.tail_slots)))
            p_cand = F.normalize(frame_means_literal(frames(index.cand_slots)), dim=-1, eps=1e-12)
            r = (p_cand * p_sink[:, None]).sum(-1) - su.policy.lam * (p_cand * p_tail[:, None]).sum(-1)
            r[0].argmax().item()
        elif isinstance(su.policy, rk.PackMemory):
            pl, index = cache.planner, plan.index
            q_sub = subsample_queries(su.qkv[0], su.policy.q_stride)
            for layer in range(su.shape.layers):
                k_pool = cache.storage.k[layer]
                blocks = [k_pool[:, pl.row0 + sl * pl.block_tokens: pl.row0 + (sl + 1) * pl.block_tokens]
                          for sl in index.mid_slots]
                scores = mid_affinity_literal(q_sub, blocks, su.policy.batch_mean)
                scores.topk(len(index.mid_target_pos)).indices.tolist()


# ----------------------------------------------------------------------------------------------------
# rows


def sdpa_strict(name: str):
    """(q, k, v) [B, N, H, D] -> SDPA with only backend ``name`` (raises when it cannot take the inputs)."""
    backend = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}[name]
    from torch.nn.attention import SDPBackend  # noqa: PLC0415
    from torch.nn.attention import sdpa_kernel  # noqa: PLC0415

    def run(q, k, v):
        with sdpa_kernel(getattr(SDPBackend, backend)):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))

    return run


class GraphedChunk:
    """A KVCache chunk step whose passes replay from one CUDA graph captured in steady state.

    ``__call__`` runs one chunk: begin_chunk (host plan, index buffers refreshed in place), replay,
    end_chunk (the window's chunk rows committed to the pool).
    """

    def __init__(self, cache: rk.KVCache, passes):
        self.cache, self.passes = cache, passes
        cache.begin_chunk()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture: autotuning, cuDNN plans
            passes()
        torch.cuda.current_stream().wait_stream(side)
        cache.begin_chunk()  # the same chunk planned again: pending selection and staging restored
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), cache.capture():
            passes()
        cache.end_chunk()

    def __call__(self) -> None:
        self.cache.begin_chunk()
        self.graph.replay()
        self.cache.end_chunk()


class RowRunner:
    def __init__(self, su: ChunkSetup, args, peak: dict):
        self.su, self.args, self.peak = su, args, peak
        s = su.shape
        self.calls = s.layers * s.passes
        self.flop = common.attention_flop(su.nq, su.nk, s.heads, s.head_dim, s.layers, s.passes)
        self.window_ms: dict[str, float] = {}

    def time(self, fn) -> common.Timing:
        a = self.args
        return common.measure(fn, self.su.device, warmup=a.warmup, reps=a.reps, budget_s=a.budget_s)

    def row(self, kind: str, name: str, label: str, **kw) -> dict:
        su = self.su
        out = {"config": su.config, "row": name, "kind": kind, "label": label, "nq": su.nq, "nk": su.nk,
               "layers": su.shape.layers, "passes": su.shape.passes, "calls_per_chunk": self.calls,
               "flop": self.flop if kind in ("bound", "official", "step") else None,
               "cpu_timing": su.device.type != "cuda", "status": "ok", "ms_per_chunk": None, "tflops": None,
               "frac_peak": None}
        out.update(kw)
        return out

    def finish(self, row: dict, t: common.Timing) -> dict:
        row.update(ms_per_chunk=t.ms, reps=t.reps, method=t.method)
        if row["flop"]:
            row["tflops"], row["frac_peak"] = common.throughput(row["flop"], t.ms, self.peak["tflops"])
        return row

    def passes(self, cache: rk.KVCache):
        s, qkv = self.su.shape, self.su.qkv

        def run():
            for _ in range(s.passes):
                for layer in range(s.layers):
                    cache.attend(layer, *qkv)
        return run

    # -- rows

    def bound(self, name: str) -> dict:
        su, s = self.su, self.su.shape
        fn = sdpa_strict(name)
        gen = torch.Generator(device=su.device).manual_seed(1)
        q = torch.randn(s.batch, su.nq, s.heads, s.head_dim, generator=gen, device=su.device, dtype=s.torch_dtype)
        kv = [[torch.randn(s.batch, su.nk, s.heads, s.head_dim, generator=gen, device=su.device, dtype=s.torch_dtype)
               for _ in range(2)] for _ in range(s.layers)]
        fn(q, *kv[0])  # raises when this backend cannot take the inputs

        def chunk():
            for _ in range(s.passes):
                for layer in range(s.layers):
                    fn(q, *kv[layer])

        row = self.row("bound", f"bound[{name}]", f"attention-only bound: SDPA[{name}] on pre-gathered K/V",
                       backend=name)
        return self.finish(row, self.time(chunk))

    def official(self) -> dict:
        su = self.su
        off = OfficialPath(su)
        row = self.row("official", "official", "official-style unfused: slice+cat, fp64 RoPE, SDPA[default]",
                       kv_bytes=off.cache.memory_bytes())

        def chunk():
            off.selection()
            for _ in range(su.shape.passes):
                for layer in range(su.shape.layers):
                    off.attend(layer)

        return self.finish(row, self.time(chunk))

    def step(self, attention: str, engine: str, graph: bool, kv_dtype: torch.dtype | None = None,
             pool_device: str | None = None, staging: str = "first_call") -> dict:
        su = self.su
        name = f"step[{attention}:{engine}]" if attention != "segments" else "step[segments]"
        name += "+fp8" if kv_dtype is not None else ""
        name += ("+host" if pool_device else "") + ("" if staging == "first_call" else f"+{staging}")
        name += "+graph" if graph else ""
        label = {"window": "per-chunk window", "per_call": "per-call window",
                 "segments": "segment-table kernel"}[attention] + (f", {engine}" if attention != "segments" else "")
        label += (", FP8 pools" if kv_dtype is not None else "") + (", host pools" if pool_device else "")
        label += "" if staging == "first_call" else f", staging {staging.replace('_', ' ')} ahead"
        cache = su.cache(backend="auto", attention=attention, engine=engine if attention != "segments" else "auto",
                         kv_dtype=kv_dtype, pool_device=pool_device, staging=staging)
        passes = self.passes(cache)

        def eager():
            cache.begin_chunk()
            passes()
            cache.end_chunk()

        eager()  # compiles / autotunes every kernel; raises when the engine cannot run
        fn = GraphedChunk(cache, passes) if graph else eager
        row = self.row("step", name, label + (" (CUDA graph)" if graph else " (eager)"), attention=attention,
                       engine=engine, graph=graph, kv_bytes=cache.memory_bytes(),
                       window_bytes=cache.attention_mode.nbytes(), kv_dtype=str(cache.kv_dtype).replace("torch.", ""),
                       pools="host" if pool_device else "device", staging=staging, device_bytes=cache.device_bytes())
        t = self.time(fn)
        if attention == "window" and not graph and kv_dtype is None and not pool_device:
            self.window_ms[engine] = t.ms
        return self.finish(row, t)

    def parts(self) -> list[dict]:
        """rope_append, staging and selection alone (the components of a window step)."""
        su, s = self.su, self.su.shape
        cache, plan = self.first_pass()
        q, k, v = su.qkv
        mode, buffers = cache.active_mode, cache.plan_buffers
        rows = []
        targets = [mode.target(layer) for layer in range(s.layers)]  # window rows or pool rows (+ scales), slots

        def append():
            for _ in range(s.passes):
                for layer, (dst_k, dst_v, k_scale, v_scale, slots, _) in enumerate(targets):
                    rope_append_op(q, k, v, dst_k, dst_v, None, slots, buffers.frame_pos, s.height, s.width,
                                   cache.backend, k_scale, v_scale, checked=True)

        nbytes = 6 * q.numel() * q.element_size()  # read q, k, v; write q_rot, rotated k, v
        t = self.time(append)
        rows.append(self.finish(self.row("part", "append", "rope_append, every call (no prototypes)",
                                         gbps=nbytes * self.calls / (t.ms * 1e-3) / 1e9), t))
        if mode.name == "window":
            rows.append(self.stage(cache, plan, "stage", "window staging: gather_kv_rope_into, once per layer")[0])
        if plan.selects:
            pl = cache.planner
            per_layer = pl.selection == "per_layer"
            layers = range(s.layers) if per_layer else [None]
            scratch = buffers.seg.clone()  # the selections write here, not into the cache's tables
            steps = [dataclasses.replace(cache.step_context(layer), seg=scratch[layer or 0]) for layer in layers]

            def select():
                for step in steps:
                    if per_layer:
                        pl.select_layer(step, q)
                    else:
                        pl.select_chunk(step)

            t = self.time(select)
            row = self.row("part", "select", f"selection ({len(layers)} layer(s), once per chunk)")
            rows.append(self.finish(row, t))
        return rows

    def parts_fp8(self) -> list[dict]:
        """The window staging from FP8 pools (gather_kv_rope_into dequantizing codes and scales, once per layer)
        against a device copy of the same bytes (read and written)."""
        su = self.su
        cache, plan = self.first_pass(FP8)
        if cache.active_mode.name != "window":
            return []
        row, read, written = self.stage(cache, plan, "stage_fp8", "window staging from FP8 pools, once per layer")
        moved = read + written
        src = torch.empty(moved // 2, dtype=torch.uint8, device=su.device)
        dst = torch.empty_like(src)
        t = self.time(lambda: dst.copy_(src))
        return [row, self.finish(self.row("part", "copy_fp8", "device copy of the staging's bytes (its bound)",
                                          gbps=2 * src.numel() / (t.ms * 1e-3) / 1e9), t)]

    def parts_host(self) -> list[dict]:
        """The window staging from host pools (gather_kv_rope_into reading pinned host memory over PCIe, once per
        layer) against a pinned host-to-device copy of the bytes it reads, measured in the same run."""
        su = self.su
        cache, plan = self.first_pass(pool_device="cpu")
        row, read, _ = self.stage(cache, plan, "stage_host", "window staging from host pools, once per layer")
        t_stage = row["ms_per_chunk"]
        row["gbps_host_read"] = read / (t_stage * 1e-3) / 1e9
        src = torch.empty(read, dtype=torch.uint8, pin_memory=su.device.type == "cuda")
        dst = torch.empty(read, dtype=torch.uint8, device=su.device)
        t = self.time(lambda: dst.copy_(src, non_blocking=True))
        return [row, self.finish(self.row("part", "copy_h2d", "pinned host-to-device copy of the staging's pool bytes "
                                          "(its bound)", gbps=read / (t.ms * 1e-3) / 1e9), t)]

    def first_pass(self, kv_dtype: torch.dtype | None = None, pool_device: str | None = None
                   ) -> tuple[rk.KVCache, object]:
        """A window-mode cache (pools in ``kv_dtype``, on ``pool_device``) at the steady chunk, after its first pass
        (every layer's selection and staging): (cache, the chunk's plan)."""
        su = self.su
        cache = su.cache(backend="auto", attention="window", kv_dtype=kv_dtype, pool_device=pool_device)
        plan = cache.begin_chunk()
        for layer in range(su.shape.layers):
            cache.attend(layer, *su.qkv)
        return cache, plan

    def stage(self, cache: rk.KVCache, plan, name: str, label: str) -> tuple[dict, int, int]:
        """The window staging of ``cache`` (after :meth:`first_pass`) alone, once per layer: its row, the bytes it
        reads (pool rows and their scales) and the bytes it writes (window rows)."""
        su, s = self.su, self.su.shape
        mode, st, u_rows = cache.active_mode, cache.storage, su.nq
        segs = [cache.step_context(layer).seg[:, :plan.n_memory_seg] for layer in range(s.layers)]

        def stage():
            for layer in range(s.layers):
                mode.gather(layer, segs[layer], mode.win_k[layer][:, u_rows:su.nk], mode.win_v[layer][:, u_rows:su.nk])

        elems = 2 * (su.nk - u_rows) * s.batch * s.heads * s.head_dim * s.layers  # K and V elements staged
        read, written = elems * st.k.element_size(), elems * mode.win_k.element_size()
        if st.fp8:
            read += elems // s.head_dim * st.k_scale.element_size()
        t = self.time(stage)
        row = self.row("part", name, label, gbps=(read + written) / (t.ms * 1e-3) / 1e9)
        return self.finish(row, t), read, written


def row_specs(su: ChunkSetup, args) -> list[tuple[str, str, tuple]]:
    """(method, row id, args) in run order; the graph rows use the fastest eager window engine (resolved later)."""
    cuda = su.device.type == "cuda"
    dtype = su.shape.torch_dtype
    engines = [e for e in args.engines.split(",") if e] if args.engines else (
        [e for e in WINDOW_ENGINES if available(e, su.device, dtype)] if cuda else ["sdpa"])
    specs = [("bound", f"bound[{b}]", (b,)) for b in (BOUNDS if cuda else ())]
    if not args.skip_official:
        specs.append(("official", "official", ()))
    specs += [("step", f"step[window:{e}]", ("window", e, False)) for e in engines]
    if cuda:
        specs += [("step", "step[window:best]+graph", ("window", None, True))]
    for mode in ("per_call", "segments"):
        name = "step[segments]" if mode == "segments" else f"step[{mode}:best]"
        specs.append(("step", name, (mode, None, False)))
        if cuda:
            specs.append(("step", f"{name}+graph", (mode, None, True)))
    specs.append(("parts", "parts", ()))
    if args.kv_dtype == "fp8":  # the mode "auto" picks for FP8 pools on CUDA, and the window (dense: per_call first)
        auto = resolve_attention("auto", "auto", "cuda", staged=True,
                                 gathers=su.policy.planner(su.shape.height, su.shape.width).gathers)
        for mode in dict.fromkeys((auto, "window")):
            specs.append(("step", f"step[{mode}:best]+fp8", (mode, None, False, FP8)))
            if cuda:
                specs.append(("step", f"step[{mode}:best]+fp8+graph", (mode, None, True, FP8)))
        specs.append(("parts_fp8", "parts_fp8", ()))
    if args.pools == "host":  # the window step with the pools in pinned host memory, and its staging's bandwidth
        for staging in args.staging.split(","):
            name = "step[window:best]+host" + ("" if staging == "first_call" else f"+{staging}")
            specs.append(("step", name, ("window", None, False, None, "cpu", staging)))
            if cuda:
                specs.append(("step", f"{name}+graph", ("window", None, True, None, "cpu", staging)))
        specs.append(("parts_host", "parts_host", ()))
    return specs


def record_tuning(runner: RowRunner) -> None:
    """The fastest window engine of this config on this device into relaxkv_kernels/ops/dense_attention/tuning.json
    (read by engine="auto")."""
    su = runner.su
    if not runner.window_ms:
        return
    best = min(runner.window_ms, key=runner.window_ms.get)
    key = tuning.tuning_key(tuning.device_name(str(su.device)), su.shape.head_dim, su.nq, su.nk)
    path = tuning.record({key: best})
    print(f"tuning: {key} -> {best} ({', '.join(f'{e} {ms:.4g} ms' for e, ms in runner.window_ms.items())}) in {path}")


def targets(rows: list[dict]) -> list[dict]:
    """The targets from the rows of one run: best complete step vs the cuDNN bound (``TARGETS``) and vs the
    official-style path, and the dense / relax whole-chunk ratio (>= 2.8)."""
    def ms(config, pred):
        times = [r["ms_per_chunk"] for r in rows if r["config"] == config and r["status"] == "ok" and pred(r)]
        return min(times, default=None)

    out = []
    best = {}
    fp8_name = str(FP8).replace("torch.", "")
    for config in dict.fromkeys(r["config"] for r in rows):
        step = ms(config, lambda r: r["kind"] == "step" and r.get("kv_dtype") != fp8_name and r.get("pools") != "host")
        fp8 = ms(config, lambda r: r["kind"] == "step" and r.get("kv_dtype") == fp8_name)
        by_staging = {name: ms(config, lambda r, n=name: r["kind"] == "step" and r.get("pools") == "host"
                               and r.get("staging") == n) for name in STAGINGS}  # host-pool steps
        by_staging = {name: t for name, t in by_staging.items() if t is not None}
        host = min(by_staging.values(), default=None)
        stage_host = [r for r in rows if r["config"] == config and r["row"] in ("stage_host", "copy_h2d")
                      and r["status"] == "ok"]
        bound = ms(config, lambda r: r["row"] == "bound[cudnn]")
        official = ms(config, lambda r: r["kind"] == "official")
        best[config] = step
        out.append({"config": config, "best_step_ms": step, "cudnn_bound_ms": bound, "official_ms": official,
                    "step_over_bound": step / bound if step and bound else None, "target_over_bound": TARGETS[config],
                    "speedup_vs_official": official / step if step and official else None})
        if fp8:
            out[-1].update(fp8_step_ms=fp8, fp8_over_bf16=fp8 / step if step else None, target_fp8_over_bf16=1.03)
        if host:
            out[-1].update(host_step_ms=host, host_over_device=host / step if step else None,
                           target_host_over_device=1.05, host_ms_by_staging=by_staging,
                           host_best_staging=min(by_staging, key=by_staging.get))
        if len(stage_host) == 2:
            staged, copy = stage_host
            out[-1].update(stage_host_gbps=staged["gbps_host_read"], copy_h2d_gbps=copy["gbps"],
                           stage_over_copy=staged["gbps_host_read"] / copy["gbps"], target_stage_over_copy=0.8)
    if best.get("dense") and best.get("relax"):
        out.append({"config": "dense/relax", "ratio": best["dense"] / best["relax"], "target": 2.8})
    return out


# ----------------------------------------------------------------------------------------------------
# CLI


def stagings(text: str) -> str:
    """``--staging``: comma-separated names of ``STAGINGS`` (argparse's type)."""
    unknown = [name for name in text.split(",") if name not in STAGINGS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown staging {', '.join(unknown)} (expected some of "
                                         f"{', '.join(STAGINGS)})")
    return text


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", choices=sorted(common.SHAPES), default="tiny")
    p.add_argument("--configs", default="dense,relax,pack")
    p.add_argument("--engines", help=f"window engines to time (default: every available one of {WINDOW_ENGINES})")
    p.add_argument("--skip-official", action="store_true", help="leave out the official-style row (slow)")
    p.add_argument("--layers", type=int, help="override the shape's layer count")
    p.add_argument("--passes", type=int, help="override the shape's passes per chunk")
    p.add_argument("--dtype", help="override the shape's dtype (bfloat16, float16, float32)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=20.0, help="time cap per measurement")
    p.add_argument("--peak-n", type=int, help="bf16 matmul size for the peak (default 8192 on CUDA, 512 on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-dtype", choices=["fp8"], help="also time the steps with FP8 pools and their staging")
    p.add_argument("--pools", choices=["host"],
                   help="also time the window step with the pools in pinned host memory and its staging against the "
                        "pinned host-to-device copy bandwidth")
    p.add_argument("--staging", default="first_call", type=stagings,
                   help="with --pools host, the window stagings to time, comma-separated, of "
                        f"{','.join(STAGINGS)}")
    p.add_argument("--out", help="JSON path (CSV written beside it); "
                                 "default benchmarks/results/chunk_<shapes>_<device>.json")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--write-tuning", action="store_true",
                   help="record the fastest window engine per config in "
                        "relaxkv_kernels/ops/dense_attention/tuning.json (CUDA only)")
    return p.parse_args(argv)


def print_tables(rows: list[dict], goals: list[dict], env: dict, peak: dict) -> None:
    note = f" -- {common.CPU_LABEL}" if env["cpu_timing"] else ""
    print(f"\nper chunk on {env['device']} (commit {env['commit'][:12]}, {env['date']}){note}")
    print(f"bf16 matmul peak measured: {peak['tflops']:.3g} TFLOP/s (n={peak['n']})")
    print(f"{'config':6} {'row':32} {'ms/chunk':>10} {'TFLOP/s':>8} {'%peak':>6} {'GiB':>6}  status")
    for r in rows:
        frac = None if r.get("frac_peak") is None else 100 * r["frac_peak"]
        gib = None if r.get("kv_bytes") is None else r["kv_bytes"] / 2**30
        print(f"{r['config']:6} {r['row']:32} {common.fmt(r.get('ms_per_chunk')):>10} {common.fmt(r.get('tflops')):>8} "
              f"{common.fmt(frac, 2):>6} {common.fmt(gib):>6}  {r['status']}")
    print(f"\ntargets{note}")
    for g in goals:
        if "ratio" in g:
            print(f"  dense/relax whole-chunk ratio {common.fmt(g['ratio'])} (target >= {g['target']})")
        else:
            print(f"  {g['config']:6} best step {common.fmt(g['best_step_ms'])} ms = "
                  f"{common.fmt(g['step_over_bound'])}x the cuDNN bound (target <= {g['target_over_bound']}), "
                  f"{common.fmt(g['speedup_vs_official'])}x faster than official-style")
            if "fp8_step_ms" in g:
                print(f"  {g['config']:6} FP8 pools {common.fmt(g['fp8_step_ms'])} ms = "
                      f"{common.fmt(g['fp8_over_bf16'])}x the bf16-pool step (target <= {g['target_fp8_over_bf16']})")
            if "host_step_ms" in g:
                print(f"  {g['config']:6} host pools {common.fmt(g['host_step_ms'])} ms = "
                      f"{common.fmt(g['host_over_device'])}x the device-pool step "
                      f"(target <= {g['target_host_over_device']}), staging "
                      + ", ".join(f"{name} {common.fmt(t)} ms" for name, t in g["host_ms_by_staging"].items()))
            if "stage_over_copy" in g:
                print(f"  {g['config']:6} staging from host pools {common.fmt(g['stage_host_gbps'])} GB/s = "
                      f"{common.fmt(g['stage_over_copy'])}x the pinned copy's {common.fmt(g['copy_h2d_gbps'])} GB/s "
                      f"(target >= {g['target_stage_over_copy']})")


def main(argv=None) -> dict:
    from tqdm import tqdm  # noqa: PLC0415

    args = parse_args(argv)
    device = common.default_device()
    shape = common.shape_from_args(args.shapes, args.layers, args.passes, args.dtype)
    env = common.env_info(device)
    peak = common.bf16_matmul_peak(device, args.peak_n)
    out = Path(args.out) if args.out else common.default_out("chunk", shape.name, device)
    rows, setups = [], []
    payload = {"kind": "chunk", "env": env, "shape": dataclasses.asdict(shape), "peak_bf16": peak,
               "flop_formula": "4 * Nq * Nk * H * D * layers * passes", "setups": setups, "targets": [],
               "engines": list(ENGINES), "args": vars(args), "complete": False}

    def save():  # after every config, and on an interrupt (a time limit): what ran is kept
        payload["targets"] = targets(rows)
        return common.write_results(out, payload, rows)

    try:
        for config in [c for c in args.configs.split(",") if c]:
            su = build_setup(config, shape, device, args.seed)
            if shape.name == "wan" and (su.nq, su.nk) != EXPECTED_WAN[config]:
                print(f"warning: {config}: {su.nq} x {su.nk} tokens, the design says {EXPECTED_WAN[config]}")
            runner = RowRunner(su, args, peak)
            setups.append({"config": config, "chunk": su.steady, "nq": su.nq, "nk": su.nk, "flop": runner.flop})
            for method, name, margs in tqdm(row_specs(su, args), desc=config, disable=args.no_progress, leave=False):
                if method == "step" and margs[1] is None:  # the fastest eager window engine so far
                    margs = (margs[0], min(runner.window_ms, key=runner.window_ms.get, default="sdpa"), *margs[2:])
                try:
                    out_rows = getattr(runner, method)(*margs)
                    rows.extend(out_rows if isinstance(out_rows, list) else [out_rows])
                except (RuntimeError, NotImplementedError, ValueError) as exc:  # a backend or engine that cannot run
                    msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                    rows.append(runner.row(method, name, name, status=f"unavailable: {msg}"))
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            if args.write_tuning and device.type == "cuda":
                record_tuning(runner)
            del runner, su
            save()
        payload["complete"] = True
    except KeyboardInterrupt:
        print("interrupted: writing the rows measured so far")
    json_path, csv_path = save()
    print_tables(rows, payload["targets"], env, peak)
    print(f"wrote {json_path} and {csv_path}")
    return dict(payload, rows=rows, json=str(json_path), csv=str(csv_path))


if __name__ == "__main__":
    main()
