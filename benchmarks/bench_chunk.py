"""Per-chunk attention benchmark: one chunk of an AR video rollout (layers x passes attention calls).

    python benchmarks/bench_chunk.py --shapes wan --configs dense,relax,pack      # on a GPU
    python benchmarks/bench_chunk.py --shapes tiny                                # CPU smoke (CPU time only)

Configs (DESIGN.md 6), in steady state: dense 21 frames (4680 q x 32760 k), relax 7 frames
(4680 x 10920), pack (6240 x 27872 = 8 sink frames + 16 x 182 mid tokens + 4 recent + 4 current).
Pools and segment tables come from the package's planners and KVCache; pools are filled with random
data once, and only the per-chunk work is timed. Rows (all per chunk, same run, same device):

    official     official-style unfused path: slice + cat of cached pre-RoPE frames, float64 complex
                 RoPE on Q and the gathered keys (Wan's causal_rope_apply), cast back, SDPA
    gather[b]    gather_kv_rope + SDPA[b]: K delta-rotated and V gathered through the device segment table
                 (the CUDA kernel where built, else the reference), then SDPA with backend b
                 (flash / cuDNN / efficient)
    fused[be]    the fused op: rope_append (+ compress_kv for pack) and sparse_kv_attention, backend be
    bound[b]     attention-only bound: SDPA[b] on pre-gathered, pre-rotated contiguous K/V
    select[be]   relax_select (relax, once per chunk) or mid_select (pack, once per layer per chunk)

Breakdown columns: selection, gather/rope (everything before attention, incl. the cache append),
attention; each is timed on its own, and the total is timed end to end.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.configure_triton()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from relaxkv_kernels import DenseWindow, KVCache, PackMemory, RelaxMemory, backends, ops, tuning  # noqa: E402
from relaxkv_kernels.reference import gather_segments_ref, mid_affinity_literal, token_positions  # noqa: E402
from relaxkv_kernels.reference.pack import compressed_positions, subsample_queries  # noqa: E402
from relaxkv_kernels.reference.relax import frame_means_literal, set_prototype  # noqa: E402
from relaxkv_kernels.reference.rope import ROPE_THETA, rope_angles, rope_pair_split  # noqa: E402

CONFIGS = {
    # policy, steady-state chunk index (dense: window full; relax: 120-frame reservoir full; pack: 64-block archive full)
    "dense": (DenseWindow, 8),
    "relax": (RelaxMemory, 45),
    "pack": (PackMemory, 70),
}
EXPECTED_WAN = {"dense": (4680, 32760), "relax": (4680, 10920), "pack": (6240, 27872)}  # DESIGN.md 6
OP_BACKENDS = ("reference", "triton", "auto")


# ----------------------------------------------------------------------------------------------------
# setup: pools, plan and segment tables of one steady-state chunk


@dataclasses.dataclass
class ChunkSetup:
    config: str
    shape: common.Shape
    device: torch.device
    cache: KVCache
    plan: object
    q: torch.Tensor  # [B, Nq, H, D] pre-RoPE chunk queries (keys and values: k, v)
    k: torch.Tensor
    v: torch.Tensor
    idx: dict  # device index tensors of the plan (frame_slot, frame_pos, ...)
    nq: int = 0
    nk: int = 0

    @property
    def pack(self) -> bool:
        return isinstance(self.cache.policy, PackMemory)

    def seg_of(self, layer: int) -> torch.Tensor:
        return self.cache.seg[layer if self.cache.seg.shape[0] > 1 else 0]


def build_setup(config: str, shape: common.Shape, device: torch.device, seed: int = 0) -> ChunkSetup:
    """KVCache of ``config`` fast-forwarded (planner only) to a steady-state chunk, pools random, selection done."""
    policy_cls, steady = CONFIGS[config]
    policy = policy_cls()
    s = shape
    cache = KVCache(policy, s.layers, s.batch, s.heads, s.head_dim, s.height, s.width, s.torch_dtype, device,
                    backend="reference")
    for n in range(steady):  # host-side planning of the earlier chunks (eviction, slots); no attention
        cache.planner.plan(n)
    cache.chunk = steady
    plan = cache.begin_chunk()
    gen = torch.Generator(device=device).manual_seed(seed)
    for t in (cache.k, cache.v, cache.proto) + ((cache.mean_key,) if cache.mean_key is not None else ()):
        for layer in range(s.layers):  # per layer: no full-size fp32 temporary at Wan shapes
            t[layer].copy_(torch.randn(t[layer].shape, generator=gen, device=device, dtype=torch.float32))
    nq = len(plan.frame_slot) * s.frame_tokens
    q, k, v = (torch.randn(s.batch, nq, s.heads, s.head_dim, generator=gen, device=device).to(s.torch_dtype)
               for _ in range(3))
    lists = {"frame_slot": plan.frame_slot, "frame_pos": plan.frame_pos, "slot_pos": plan.slot_pos}
    if plan.relax is not None:
        lists.update({n: getattr(plan.relax, n) for n in ("sink_slots", "tail_slots", "cand_slots", "target_pos")})
    if plan.pack is not None:
        lists.update(block_pos=plan.block_pos, mid_slots=plan.pack.mid_slots, mid_target_pos=plan.pack.target_pos)
        if plan.pack.block_slot is not None:
            lists.update(block_slot=[plan.pack.block_slot], block_t0=[plan.start_frame])
    idx = {n: torch.tensor(v_, dtype=torch.int64, device=device) for n, v_ in lists.items()}
    setup = ChunkSetup(config, s, device, cache, plan, q, k, v, idx)
    run_selection(setup, "reference", cache.seg)
    setup.nq = nq
    setup.nk = int(cache.seg[0, 0, :, 1].sum())
    return setup


def run_selection(su: ChunkSetup, backend: str, seg: torch.Tensor) -> None:
    """The chunk's data-dependent selection into ``seg``: relax_select once, or mid_select for every layer."""
    plan, i, c = su.plan, su.idx, su.cache
    if plan.relax is not None:
        p = c.policy
        ops.relax_select(c.proto[0], i["slot_pos"], i["sink_slots"], i["tail_slots"], i["cand_slots"], seg[0],
                         plan.relax.seg_index, i["target_pos"], su.shape.frame_tokens, p.lam, p.batch0_decides,
                         p.contiguous_rope, backend=backend)
    elif plan.pack is not None and plan.pack.target_pos:
        pl = c.planner
        for layer in range(su.shape.layers):
            ops.mid_select(su.q, c.mean_key[layer], i["mid_slots"], i["block_pos"], seg[layer], plan.pack.seg_index,
                           i["mid_target_pos"], pl.row0, pl.block_tokens, min(c.policy.q_stride, su.q.shape[1]),
                           backend=backend)


def has_selection(su: ChunkSetup) -> bool:
    return su.plan.relax is not None or (su.plan.pack is not None and bool(su.plan.pack.target_pos))


def append(su: ChunkSetup, layer: int, backend: str) -> torch.Tensor:
    """Per-call cache write of the fused path: rope_append (+ compress_kv of the current Pack block); returns Q rotated."""
    c, i, s = su.cache, su.idx, su.shape
    q_rot = ops.rope_append(su.q, su.k, su.v, c.k[layer], c.v[layer], c.proto[layer], i["frame_slot"], i["frame_pos"],
                            s.height, s.width, backend=backend)
    if "block_slot" in i:
        ops.compress_kv(su.k, su.v, c.k[layer], c.v[layer], c.mean_key[layer], i["block_slot"], i["block_t0"],
                        c.planner.row0, c.policy.block_frames, s.height, s.width, backend=backend)
    return q_rot


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


def key_positions(su: ChunkSetup, seg_b: list) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """Pool row ranges and target (t, y, x) positions of every key of one segment table row list."""
    c, s = su.cache, su.shape
    rows, pos = [], []
    for start, length, delta in seg_b:
        if length == 0:
            continue
        rows.append((start, length))
        if su.pack and start >= c.planner.row0:  # a compressed Pack block
            slot = (start - c.planner.row0) // c.planner.block_tokens
            pos.append(compressed_positions(su.plan.block_pos[slot] + delta, c.policy.block_frames, s.height, s.width))
        else:
            frame = su.plan.slot_pos[start // s.frame_tokens] + delta
            pos.append(token_positions(torch.tensor([frame]), s.height, s.width))
    return rows, torch.cat(pos)


class OfficialPath:
    """Slice + cat of cached pre-RoPE frames, float64 RoPE of Q and the keys, cast back, SDPA (per call)."""

    def __init__(self, su: ChunkSetup):
        self.su = su
        s = su.shape
        seg_cpu = su.cache.seg[:, 0].cpu().tolist()  # batch element 0's table (B = 1 in every shape)
        self.rows, self.k_rope = [], []
        for table in seg_cpu:
            rows, pos = key_positions(su, table)
            self.rows.append(rows)
            self.k_rope.append(OfficialRope(pos, s.head_dim, su.device))
        self.q_rope = OfficialRope(token_positions(torch.tensor(su.plan.frame_pos), s.height, s.width), s.head_dim,
                                   su.device)
        f = s.frame_tokens
        self.current = [(slot * f, u * f) for u, slot in enumerate(su.plan.frame_slot)]

    def gather(self, layer: int):
        su, c = self.su, self.su.cache
        t = layer if len(self.rows) > 1 else 0
        f = su.shape.frame_tokens
        k_pool, v_pool = c.k[layer], c.v[layer]
        for row, src in self.current:  # kv_cache[:, s:e] = k, as the official code writes the chunk
            k_pool[:, row:row + f] = su.k[:, src:src + f]
            v_pool[:, row:row + f] = su.v[:, src:src + f]
        if "block_slot" in su.idx:  # Pack: pool the current block (PyTorch pooling, no kernel)
            i = su.idx
            ops.compress_kv(su.k, su.v, k_pool, v_pool, c.mean_key[layer], i["block_slot"], i["block_t0"],
                            c.planner.row0, c.policy.block_frames, su.shape.height, su.shape.width,
                            backend="reference")
        k = torch.cat([k_pool[:, a:a + n] for a, n in self.rows[t]], dim=1)
        v = torch.cat([v_pool[:, a:a + n] for a, n in self.rows[t]], dim=1)
        return self.q_rope(su.q), self.k_rope[t](k), v

    def selection(self) -> None:
        """Official-style scoring from raw keys, with the host sync the official code has (.item() / .tolist())."""
        su, c, plan = self.su, self.su.cache, self.su.plan
        f = su.shape.frame_tokens
        if plan.relax is not None:
            k0 = c.k[0]

            def frames(slots):  # [B, n, F, H, D]
                return torch.stack([k0[:, sl * f:(sl + 1) * f] for sl in slots], dim=1)

            p_sink = set_prototype(frame_means_literal(frames(plan.relax.sink_slots)))
            p_tail = set_prototype(frame_means_literal(frames(plan.relax.tail_slots)))
            p_cand = F.normalize(frame_means_literal(frames(plan.relax.cand_slots)), dim=-1, eps=1e-12)
            r = (p_cand * p_sink[:, None]).sum(-1) - c.policy.lam * (p_cand * p_tail[:, None]).sum(-1)
            r[0].argmax().item()
        elif plan.pack is not None and plan.pack.target_pos:
            pl, k_top = c.planner, len(plan.pack.target_pos)
            q_sub = subsample_queries(su.q, c.policy.q_stride)
            for layer in range(su.shape.layers):
                blocks = [c.k[layer][:, pl.row0 + sl * pl.block_tokens: pl.row0 + (sl + 1) * pl.block_tokens]
                          for sl in plan.pack.mid_slots]
                mid_affinity_literal(q_sub, blocks).topk(k_top).indices.tolist()


# ----------------------------------------------------------------------------------------------------
# attention backends


def sdpa_backends(device: torch.device) -> dict:
    """SDPA variants to compare: the default dispatch, and on CUDA each named backend."""
    out = {"default": None}
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend  # noqa: PLC0415

        out.update(flash=SDPBackend.FLASH_ATTENTION, cudnn=SDPBackend.CUDNN_ATTENTION,
                   efficient=SDPBackend.EFFICIENT_ATTENTION)
    return out


def flash_attn_func():
    """``flash_attn.flash_attn_func`` when the package is installed, else None."""
    try:
        from flash_attn import flash_attn_func as fn  # noqa: PLC0415
    except ImportError:
        return None
    return fn


def attention_fn(name: str, backend, device: torch.device):
    """(q, k, v in [B, N, H, D]) -> out, for SDPA[name] or flash_attn."""
    if name == "flash_attn":
        fa = flash_attn_func()
        return lambda q, k, v: fa(q, k, v)

    def run(q, k, v):
        ctx = contextlib.nullcontext()
        if backend is not None:
            from torch.nn.attention import sdpa_kernel  # noqa: PLC0415

            ctx = sdpa_kernel(backend)
        with ctx:
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    return run


# ----------------------------------------------------------------------------------------------------
# rows


def chunk_loop(su: ChunkSetup, per_call, selection=None):
    """One chunk: the selection (if any), then ``per_call(layer)`` for every pass and layer."""
    def run():
        if selection is not None:
            selection()
        for _ in range(su.shape.passes):
            for layer in range(su.shape.layers):
                per_call(layer)
    return run


class RowRunner:
    def __init__(self, su: ChunkSetup, args, peak: dict):
        self.su, self.args, self.peak = su, args, peak
        self.cache_ms: dict[str, float] = {}  # shared component timings (bound attention, selection)
        self.flop = common.attention_flop(su.nq, su.nk, su.shape.heads, su.shape.head_dim, su.shape.layers,
                                          su.shape.passes)
        self._pregathered = None
        self._official = None

    def time(self, fn) -> common.Timing:
        a = self.args
        return common.measure(fn, self.su.device, warmup=a.warmup, reps=a.reps, budget_s=a.budget_s)

    def row(self, kind: str, name: str, label: str, backend: str, **kw) -> dict:
        su = self.su
        out = {"config": su.config, "row": name, "kind": kind, "label": label, "backend": backend,
               "nq": su.nq, "nk": su.nk, "layers": su.shape.layers, "passes": su.shape.passes,
               "calls_per_chunk": su.shape.layers * su.shape.passes, "flop": self.flop if kind != "select" else None,
               "cpu_timing": su.device.type != "cuda", "status": "ok", "ms_per_chunk": None,
               "selection_ms": None, "gather_rope_ms": None, "attention_ms": None, "tflops": None,
               "frac_peak": None}
        out.update(kw)
        return out

    def finish(self, row: dict, total: common.Timing) -> dict:
        row.update(ms_per_chunk=total.ms, reps=total.reps, method=total.method)
        if row["flop"]:
            row["tflops"], row["frac_peak"] = common.throughput(row["flop"], total.ms, self.peak["tflops"])
        return row

    # -- pieces

    def pregathered(self):
        """Per layer: Q rotated, K delta-rotated and V gathered, contiguous [B, N, H, D] (built once)."""
        if self._pregathered is None:
            su = self.su
            q_rot = append(su, 0, "reference")
            data = []
            for layer in range(su.shape.layers):
                seg = su.seg_of(layer).cpu()
                kv = [gather_segments_ref(su.cache.k[layer][b], su.cache.v[layer][b], seg[b])
                      for b in range(su.shape.batch)]
                data.append((torch.stack([x[0] for x in kv]).contiguous(), torch.stack([x[1] for x in kv]).contiguous()))
            self._pregathered = (q_rot.contiguous(), data)
        return self._pregathered

    def official(self) -> OfficialPath:
        if self._official is None:
            self._official = OfficialPath(self.su)
        return self._official

    # -- rows

    def bound(self, name: str, backend) -> dict:
        su = self.su
        fn = attention_fn(name, backend, su.device)
        q_rot, data = self.pregathered()
        row = self.row("bound", f"bound[{name}]", f"attention-only bound: {self._attn_label(name)} on pre-gathered K/V",
                       name)
        fn(q_rot, *data[0])  # raises when this backend does not support the inputs
        t = self.time(chunk_loop(su, lambda layer: fn(q_rot, *data[layer])))
        self.cache_ms[f"attn:{name}"] = t.ms
        return self.finish(dict(row, attention_ms=t.ms), t)

    def official_row(self) -> dict:
        su, off = self.su, self.official()
        attn = attention_fn("default", None, su.device)
        sel = off.selection if has_selection(su) else None
        row = self.row("official", "official", "official-style unfused: slice+cat, fp64 RoPE, SDPA[default]", "default")
        t_rope = self.time(chunk_loop(su, off.gather))
        t_sel = self.time(sel) if sel is not None else None
        total = self.time(chunk_loop(su, lambda layer: attn(*off.gather(layer)), sel))
        row.update(gather_rope_ms=t_rope.ms, selection_ms=t_sel.ms if t_sel else None,
                   attention_ms=self.cache_ms.get("attn:default"), attention_source="bound[default]")
        return self.finish(row, total)

    def gather_row(self, name: str, backend) -> dict:
        su = self.su
        attn = attention_fn(name, backend, su.device)
        row = self.row("gather", f"gather[{name}]", f"gather_kv_rope[auto] + {self._attn_label(name)}", name,
                       resolved=ops.resolve_backend("gather_kv_rope", su.device))
        q_rot = append(su, 0, "auto")

        def gather(layer):  # device-side table, no host copy: the host only knows the key count
            return ops.gather_kv_rope(su.cache.k[layer], su.cache.v[layer], su.seg_of(layer), su.nk)

        def call(layer):
            q = append(su, layer, "auto")
            attn(q, *gather(layer))

        attn(q_rot, *gather(0))  # raises when this backend does not support the inputs
        t_rope = self.time(chunk_loop(su, lambda layer: (append(su, layer, "auto"), gather(layer))))
        sel = (lambda: run_selection(su, "auto", su.cache.seg)) if has_selection(su) else None
        total = self.time(chunk_loop(su, call, sel))
        row.update(gather_rope_ms=t_rope.ms, selection_ms=self.cache_ms.get("select:auto"),
                   attention_ms=self.cache_ms.get(f"attn:{name}"), attention_source=f"bound[{name}]")
        return self.finish(row, total)

    def select_row(self, backend: str) -> dict:
        su = self.su
        op = "relax_select" if su.plan.relax is not None else "mid_select"
        per = "once per chunk" if op == "relax_select" else f"{su.shape.layers} layers, once per chunk"
        row = self.row("select", f"select[{backend}]", f"{op}[{backend}] ({per})", backend, op=op,
                       resolved=ops.resolve_backend(op, su.device, backend))
        scratch = su.cache.seg.clone()
        t = self.time(lambda: run_selection(su, backend, scratch))
        self.cache_ms[f"select:{backend}"] = t.ms
        return self.finish(dict(row, selection_ms=t.ms), t)

    def fused_row(self, backend: str) -> dict:
        su = self.su
        resolved = {op: ops.resolve_backend(op, su.device, backend)
                    for op in ("rope_append", "sparse_kv_attention", "compress_kv")}
        row = self.row("fused", f"fused[{backend}]", f"sparse_kv_attention[{backend}] (+ rope_append)", backend,
                       resolved=resolved)
        q_rot = append(su, 0, backend)

        def attend(layer):
            ops.sparse_kv_attention(q_rot, su.cache.k[layer], su.cache.v[layer], su.seg_of(layer), backend=backend)

        def call(layer):
            q = append(su, layer, backend)
            ops.sparse_kv_attention(q, su.cache.k[layer], su.cache.v[layer], su.seg_of(layer), backend=backend)

        t_attn = self.time(chunk_loop(su, attend))
        t_rope = self.time(chunk_loop(su, lambda layer: append(su, layer, backend)))
        sel = (lambda: run_selection(su, backend, su.cache.seg)) if has_selection(su) else None
        total = self.time(chunk_loop(su, call, sel))
        row.update(attention_ms=t_attn.ms, gather_rope_ms=t_rope.ms, selection_ms=self.cache_ms.get(f"select:{backend}"))
        return self.finish(row, total)

    @staticmethod
    def _attn_label(name: str) -> str:
        return "flash_attn_func" if name == "flash_attn" else f"SDPA[{name}]"


def row_specs(su: ChunkSetup, args) -> list[tuple[str, str, tuple]]:
    """(method name, row id, args) in run order: shared pieces (bounds, selections) before the paths using them."""
    avail = backends()
    sdpa = sdpa_backends(su.device)
    attn = [(n, b) for n, b in sdpa.items() if args.sdpa == "all" or n in args.sdpa.split(",")]
    if su.device.type == "cuda" and flash_attn_func() is not None:
        attn.append(("flash_attn", None))
    ob = [b for b in args.backends.split(",") if b]
    specs = [("bound", f"bound[{n}]", (n, b)) for n, b in attn]
    if has_selection(su):
        specs += [("select_row", f"select[{b}]", (b,)) for b in ob]
    specs.append(("official_row", "official", ()))
    specs += [("gather_row", f"gather[{n}]", (n, b)) for n, b in attn]
    for b in ob:
        if b == "triton" and not avail["triton"]:
            specs.append(("skip", f"fused[{b}]", ("triton unavailable on this machine",)))
        else:
            specs.append(("fused_row", f"fused[{b}]", (b,)))
    return specs


# ----------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", choices=sorted(common.SHAPES), default="tiny")
    p.add_argument("--configs", default="dense,relax,pack")
    p.add_argument("--backends", default=",".join(OP_BACKENDS), help="op backends of the fused and select rows")
    p.add_argument("--sdpa", default="all", help="SDPA variants: all, or a list of default,flash,cudnn,efficient")
    p.add_argument("--layers", type=int, help="override the shape's layer count")
    p.add_argument("--passes", type=int, help="override the shape's passes per chunk")
    p.add_argument("--dtype", help="override the shape's dtype (bfloat16, float16, float32)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=60.0, help="time cap per measurement")
    p.add_argument("--peak-n", type=int, help="bf16 matmul size for the peak (default 8192 on CUDA, 512 on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="JSON path (CSV written beside it); default benchmarks/results/chunk_<shapes>_<device>.json")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--write-tuning", action="store_true",
                   help="record the faster of fused[auto] and the best gather row per config in relaxkv_kernels/tuning.json (CUDA only)")
    return p.parse_args(argv)


def record_tuning(rows: list[dict], config: str, su: ChunkSetup) -> None:
    """impl="auto" table entry for this device and shape: the faster of the fused op and gather + attention."""
    def best(kind):
        times = [r["ms_per_chunk"] for r in rows if r["config"] == config and r["kind"] == kind
                 and r["status"] == "ok" and (kind != "fused" or r["row"] == "fused[auto]")]
        return min(times, default=None)

    fused, gather = best("fused"), best("gather")
    if fused is None or gather is None:
        return
    key = tuning.tuning_key(tuning.device_name(str(su.device)), su.shape.head_dim, su.nq, su.nk)
    path = tuning.record({key: "gather" if gather < fused else "fused"})
    print(f"tuning: {key} -> {'gather' if gather < fused else 'fused'} ({gather:.3g} vs {fused:.3g} ms) in {path}")


def print_table(rows: list[dict], env: dict, peak: dict) -> None:
    note = f" -- {common.CPU_LABEL}" if env["cpu_timing"] else ""
    print(f"\nper chunk on {env['device']} (commit {env['commit'][:12]}, {env['date']}){note}")
    print(f"bf16 matmul peak measured: {peak['tflops']:.3g} TFLOP/s (n={peak['n']})")
    head = f"{'config':6} {'row':18} {'ms/chunk':>10} {'TFLOP/s':>8} {'%peak':>6} {'select':>8} {'rope/gather':>11} {'attn':>9}  status"
    print(head)
    for r in rows:
        frac = None if r.get("frac_peak") is None else 100 * r["frac_peak"]
        print(f"{r['config']:6} {r['row']:18} {common.fmt(r.get('ms_per_chunk')):>10} {common.fmt(r.get('tflops')):>8} "
              f"{common.fmt(frac, 2):>6} {common.fmt(r.get('selection_ms')):>8} {common.fmt(r.get('gather_rope_ms')):>11} "
              f"{common.fmt(r.get('attention_ms')):>9}  {r['status']}")
    if env["cpu_timing"]:
        print(f"({common.CPU_LABEL}: no GPU figure in this table)")


def main(argv=None) -> dict:
    from tqdm import tqdm  # noqa: PLC0415

    args = parse_args(argv)
    device = common.default_device()
    shape = common.shape_from_args(args.shapes, args.layers, args.passes, args.dtype)
    env = common.env_info(device)
    peak = common.bf16_matmul_peak(device, args.peak_n)
    torch.manual_seed(args.seed)
    rows, setups = [], []
    configs = [c for c in args.configs.split(",") if c]
    for config in configs:
        su = build_setup(config, shape, device, args.seed)
        if shape.name == "wan" and (su.nq, su.nk) != EXPECTED_WAN[config]:
            print(f"warning: {config}: {su.nq} x {su.nk} tokens, DESIGN.md 6 says {EXPECTED_WAN[config]}")
        runner = RowRunner(su, args, peak)
        specs = row_specs(su, args)
        for method, name, margs in tqdm(specs, desc=config, disable=args.no_progress, leave=False):
            if method == "skip":
                rows.append(runner.row("fused", name, name, name[6:-1], status=f"skipped: {margs[0]}"))
                continue
            try:
                rows.append(getattr(runner, method)(*margs))
            except (RuntimeError, NotImplementedError, ValueError) as exc:  # backend unsupported here
                msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                rows.append(runner.row(name.split("[")[0], name, name, name, status=f"unavailable: {msg}"))
        if args.write_tuning and device.type == "cuda":
            record_tuning(rows, config, su)
        setups.append({"config": config, "chunk": su.plan.chunk, "nq": su.nq, "nk": su.nk,
                       "segments": [list(x) for x in su.cache.seg[0, 0].tolist() if x[1] > 0],
                       "flop": runner.flop, "kv_bytes": su.cache.memory_bytes()})
        del runner, su
        if device.type == "cuda":
            torch.cuda.empty_cache()
    payload = {"kind": "chunk", "env": env, "shape": dataclasses.asdict(shape), "peak_bf16": peak,
               "flop_formula": "4 * Nq * Nk * H * D * layers * passes", "setups": setups,
               "args": vars(args)}
    out = Path(args.out) if args.out else common.default_out("chunk", shape.name, device)
    json_path, csv_path = common.write_results(out, payload, rows)
    print_table(rows, env, peak)
    print(f"wrote {json_path} and {csv_path}")
    return dict(payload, rows=rows, json=str(json_path), csv=str(csv_path))


if __name__ == "__main__":
    main()
