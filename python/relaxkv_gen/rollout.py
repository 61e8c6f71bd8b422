"""Chunked autoregressive rollout on top of the ``relaxkv_kernels`` KV memory (public API only).

Per chunk of ``policy.chunk_frames`` latent frames (:func:`denoise_chunk` between the cache calls)::

    cache.begin_chunk()                       # eviction + plan for the new frames
    x = noise
    for each of the 4 denoising steps:        # passes 1..4
        flow = model(x, t_step, ctx, cache)   # every layer: cache.attend(layer, q, k, v)
        x0 = x - sigma * flow
        x = renoise(x0, sigma_next, fresh noise) unless last
    model(x0, t=0, ctx, cache)                # pass 5: clean refresh, rewrites the chunk's K/V
    cache.end_chunk()

With a ``process_group`` of P ranks, every rank runs this same loop on the same noise: the cache holds the
rank's H / P heads and the model its U*F / P tokens (:mod:`relaxkv_gen.parallel`), and every rank ends with the
same latents.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from dataclasses import field
from typing import Callable

import torch

import relaxkv_kernels as rk

from .model import CausalWanModel
from .parallel import SequenceParallel
from .parallel import check_ranks
from .sampler import FlowMatchSampler

POLICY_NAMES = ("dense", "sink", "relax", "pack")
DENSE_WINDOW = 21  # frames, including the current chunk (Self-Forcing)
SINK_FRAMES = 3  # attention-sink baseline
# the Relax Forcing profiler's rows: qkv, rope + cache write, candidate scoring, compression (Pack),
# attention, output projection; all but qkv and o_proj are timed inside KVCache.attend
SELF_ATTN_SECTIONS = ("qkv", "rope_append", "select", "compress", "attention", "o_proj")
BLOCK_SECTIONS = ("cross_attn", "ffn")  # the rest of a block's heavy work, timed by the model
SECTIONS = SELF_ATTN_SECTIONS + BLOCK_SECTIONS  # disjoint: their sum is at most a pass's time
NESTED_SECTIONS = ("stage",)  # KVCache's window staging, inside "attention"
CHUNK_SECTION = "chunk"  # a whole chunk, begin_chunk to end_chunk, on the same clock as the sections
WALL_CLOCK = "wall time on the CPU (time.perf_counter)"
MAX_PLAN_ELEMENTS = 256  # bigger tensors in a plan are summarised by shape in the report


def check_count(name: str, value, low: int = 1) -> int:
    """An int count argument: TypeError for anything but an int (a bool too: ``True`` is not a count), ValueError
    below ``low``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {value!r} ({type(value).__name__})")
    if value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value}")
    return value


def make_policy(name: str):
    """Memory policy object for ``name`` in :data:`POLICY_NAMES`."""
    if name not in POLICY_NAMES:
        raise ValueError(f"unknown policy {name!r}: expected one of {list(POLICY_NAMES)}")
    if name == "dense":
        return rk.DenseWindow(window=DENSE_WINDOW, sink=0)
    if name == "sink":
        return rk.DenseWindow(window=DENSE_WINDOW, sink=SINK_FRAMES)
    if name == "relax":
        return rk.RelaxMemory()
    return rk.PackMemory()


def default_backend() -> str:
    """The generator's KV memory backend here: "fused" (kernels) with CUDA, "reference" otherwise."""
    return "fused" if torch.cuda.is_available() else "reference"


def clock_label(device) -> str:
    """What :class:`SectionTimer` measures on ``device``: CUDA events on a GPU, host wall time elsewhere."""
    return "CUDA events" if torch.device(device).type == "cuda" else WALL_CLOCK


class SectionTimer:
    """Accumulates the time of named sections (model sections and ``KVCache.profiler`` sections).

    CPU: ``time.perf_counter`` around each section: host wall time (not CPU time: a section that waits
    for a core busy with another process counts the wait), labelled :data:`WALL_CLOCK`.
    CUDA: a pair of CUDA events per section, read by :meth:`collect` (one sync, none inside the sections).
    With ``external=True`` the events are CUDA "external" events, which keep their timestamps when they
    are recorded inside a CUDA graph capture: every replay re-records them (read them after each replay).
    """

    def __init__(self, device, external: bool = False):
        self.cuda = torch.device(device).type == "cuda"
        self.external = external
        self.label = clock_label(device)
        self.reset()

    def reset(self) -> None:
        self._cpu: dict[str, float] = defaultdict(float)
        self._events: dict[str, list] = defaultdict(list)

    @contextlib.contextmanager
    def section(self, name: str):
        if self.cuda:
            start, end = (torch.cuda.Event(enable_timing=True, external=self.external) for _ in range(2))
            start.record()
            yield
            end.record()
            self._events[name].append((start, end))
        else:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self._cpu[name] += time.perf_counter() - t0

    def collect(self, reset: bool = True) -> dict[str, float]:
        """Milliseconds per section (every name in :data:`SECTIONS` and :data:`NESTED_SECTIONS`, 0 when not
        run, plus any other name timed) and ``self_attn`` (the sum of :data:`SELF_ATTN_SECTIONS`).

        ``reset=False`` keeps the recorded events (a captured graph's events, read after every replay).
        """
        if self.cuda:
            torch.cuda.synchronize()
            ms = {n: sum(s.elapsed_time(e) for s, e in ev) for n, ev in self._events.items()}
        else:
            ms = {n: 1e3 * sec for n, sec in self._cpu.items()}
        ms = {**dict.fromkeys(SECTIONS + NESTED_SECTIONS, 0.0), **ms}
        ms["self_attn"] = sum(ms[n] for n in SELF_ATTN_SECTIONS)
        if reset:
            self.reset()
        return ms


def to_jsonable(obj, depth: int = 0):
    """Plan / info objects -> JSON-friendly values (tensors to lists, big ones summarised)."""
    if depth > 8:
        return repr(obj)
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else repr(obj)
    if isinstance(obj, torch.Tensor):
        if obj.numel() > MAX_PLAN_ELEMENTS:
            return {"tensor_shape": list(obj.shape), "dtype": str(obj.dtype).replace("torch.", "")}
        return to_jsonable(obj.detach().cpu().tolist(), depth + 1)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name), depth + 1) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v, depth + 1) for v in obj]
    if isinstance(obj, (torch.dtype, torch.device)):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        try:
            return to_jsonable(obj.item(), depth + 1)
        except (TypeError, ValueError):
            pass
    return repr(obj)


@dataclass
class RolloutResult:
    policy: str
    latents: torch.Tensor | None  # [B, 16, frames, H, W] (CPU, model dtype)
    chunk_frames: int
    chunks: list[dict] = field(default_factory=list)
    memory: dict = field(default_factory=dict)  # memory_summary(cache)


def random_text(cfg, batch: int, seed: int) -> torch.Tensor:
    """Seeded stand-in for T5 states: [batch, text_len, text_dim] float32."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g)


def make_cache(model: CausalWanModel, policy, batch: int, backend: str = "reference", process_group=None,
               kv_dtype: torch.dtype | None = None, device=None, pool_device=None):
    """A ``relaxkv_kernels.KVCache`` for ``policy`` with the model's geometry, dtype and device (or ``device``, e.g.
    "meta" to count bytes); with a ``process_group`` of P ranks, head-parallel: this rank's ``num_heads / P`` heads
    (ValueError unless P divides them); ``kv_dtype``: the pools' dtype (None: the model's; torch.float8_e4m3fn);
    ``pool_device``: None (the pools on the device) or "cpu" (host memory, see ``KVCache``)."""
    cfg = model.cfg
    param = next(model.parameters())
    return rk.KVCache(
        policy, num_layers=cfg.num_layers, batch=batch, num_heads=cfg.num_heads, head_dim=cfg.head_dim,
        height=cfg.grid_height, width=cfg.grid_width, dtype=param.dtype, device=device or param.device,
        backend=backend, process_group=process_group, kv_dtype=kv_dtype, pool_device=pool_device,
    )


def memory_summary(model: CausalWanModel, policy, batch: int, cache: rk.KVCache) -> dict:
    """What ``cache`` allocates, where, and what the same cache takes with pools in the model's dtype (counted on
    the meta device): ``{"kv_dtype", "pools", "kv_bytes", "device_bytes", "host_bytes", "pool_bytes",
    "kv_bytes_same_dtype", "pool_bytes_same_dtype", "ratio"}`` (``pools``: "device" or "host"; ``ratio``: pools and
    scales against the same-dtype pools)."""
    group = None if cache.heads is None else cache.heads.group  # this rank's share of the heads, like ``cache``
    same = cache if cache.kv_dtype == cache.dtype else make_cache(model, policy, batch, process_group=group,
                                                                  device="meta")
    out = {"kv_dtype": str(cache.kv_dtype).replace("torch.", ""), "pools": "host" if cache.host_bytes() else "device",
           "kv_bytes": cache.memory_bytes(), "device_bytes": cache.device_bytes(), "host_bytes": cache.host_bytes(),
           "pool_bytes": cache.pool_bytes(), "kv_bytes_same_dtype": same.memory_bytes(),
           "pool_bytes_same_dtype": same.pool_bytes()}
    out["ratio"] = out["pool_bytes"] / out["pool_bytes_same_dtype"]
    return out


def denoise_chunk(forward: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor], sampler: FlowMatchSampler,
                  noise: Callable[[], torch.Tensor], batch: int, frames: int, device,
                  given: torch.Tensor | None = None) -> torch.Tensor:
    """The denoising passes and the clean refresh pass of one chunk (between ``begin_chunk`` and ``end_chunk``).

    Args:
        forward: ``forward(x, t, i)`` -> flow [B, 16, U, H, W] for latents x [B, 16, U, H, W] at per-frame
            timesteps t [B, U] (float32); ``i`` is the pass index, 0 for the chunk's first pass (the one
            that runs the memory's selection) up to ``sampler.num_steps`` for the refresh pass.
        sampler: the step schedule. noise: returns fresh noise [B, 16, U, H, W] (called ``num_steps`` times:
            the initial latents, then one draw per re-noising).
        batch, frames: B and U. device: where the timesteps go.
        given: clean latents [B, 16, r, H, W] of the chunk's first r frames (context frames, e.g. an image's), or
            None. r < U: at every pass those frames are the given latents at timestep 0 (CausVid's zero-shot
            image-to-video), and the result holds them bitwise. r = U: a context chunk, its one pass the clean
            refresh pass (no noise drawn).

    Returns:
        x0 [B, 16, U, H, W]: the last denoising step's prediction (the given latents of a context chunk), the
        refresh pass's input.
    """
    r = 0 if given is None else given.shape[2]
    if r == frames:
        forward(given, torch.zeros(batch, frames, device=device), sampler.num_steps)
        return given

    def pin(x):  # the given frames in front, as they are
        return x if not r else torch.cat([given, x[:, :, r:]], dim=2)

    def at(t):  # [B, U] per-frame timesteps: t for the generated frames, 0 for the given ones
        t = t.expand(batch, frames)
        return t if not r else torch.cat([torch.zeros_like(t[:, :r]), t[:, r:]], dim=1)

    timesteps, sigmas = sampler.timesteps.to(device), sampler.sigmas.to(device)
    x = pin(noise())
    for step in range(sampler.num_steps):
        flow = forward(x, at(timesteps[step]), step)
        x0 = pin(sampler.to_x0(x, flow, sigmas[step]))
        if step + 1 < sampler.num_steps:
            x = pin(sampler.renoise(x0, noise(), sigmas[step + 1]))
    forward(x0, torch.zeros(batch, frames, device=device), sampler.num_steps)  # refresh pass at t = 0
    return x0


def context_chunks(context: torch.Tensor | None, chunk_frames: int, batch: int, shape: tuple[int, ...],
                   device, dtype) -> list[torch.Tensor]:
    """Clean latent frames ``context`` [1 or B, C, n, H, W] split over the first chunks (``denoise_chunk``'s
    ``given``): the whole context chunks, then the rest (fewer frames, at the front of the first generated chunk),
    each [B, C, <= U, H, W] on ``device`` in ``dtype``; [] for None. ValueError / TypeError for a tensor of another
    shape.

    ``shape`` is a chunk's latent shape (B, C, U, H, W)."""
    if context is None:
        return []
    _, c, _, h, w = shape
    if not isinstance(context, torch.Tensor):
        raise TypeError(f"context: expected a tensor [1 or {batch}, {c}, n, {h}, {w}] of clean latent frames, got "
                        f"{type(context).__name__}")
    if (context.dim() != 5 or context.shape[0] not in (1, batch) or context.shape[1] != c or context.shape[2] < 1
            or tuple(context.shape[3:]) != (h, w) or not context.is_floating_point()):
        raise ValueError(f"context: expected clean latent frames [1 or {batch}, {c}, n >= 1, {h}, {w}] (a float "
                         f"tensor), got {list(context.shape)} {context.dtype}")
    if not bool(context.isfinite().all()):
        raise ValueError("context: expected finite latents, got NaN or inf")
    given = context.to(device=device, dtype=dtype).expand(batch, -1, -1, -1, -1)
    return list(given.split(chunk_frames, dim=2))


def text_schedule(prompts, text: torch.Tensor, chunks: int | None) -> dict[int, torch.Tensor]:
    """The text of every chunk that changes it: ``{0: text}`` and ``prompts`` (``{chunk: text encoder states [B, L,
    text_dim]}``, chunks counted as the records count them, context chunks included), in chunk order. ValueError /
    TypeError, before any work, for a chunk that is not an int in ``[0, chunks)`` (``chunks`` None: any >= 0), or a
    prompt that is not a non-empty tensor of ``text``'s batch and width."""
    if prompts is None:
        return {0: text}
    if not isinstance(prompts, dict):
        raise TypeError(f"prompts: expected a dict {{chunk: text states}}, got {type(prompts).__name__}")
    schedule = {0: text}
    for chunk, states in sorted(prompts.items(), key=lambda kv: kv[0] if isinstance(kv[0], int) else -1):
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0 or (chunks is not None
                                                                                  and chunk >= chunks):
            bound = "" if chunks is None else f" < {chunks} (the chunks of this run)"
            raise ValueError(f"prompts: chunk {chunk!r}: expected a chunk index >= 0{bound}")
        if (not isinstance(states, torch.Tensor) or states.dim() != 3 or not states.numel()
                or states.shape[0] not in (1, text.shape[0]) or states.shape[2] != text.shape[2]):
            got = list(states.shape) if isinstance(states, torch.Tensor) else type(states).__name__
            raise ValueError(f"prompts: chunk {chunk}: expected text states [1 or {text.shape[0]}, L >= 1, "
                             f"{text.shape[2]}], got {got}")
        schedule[chunk] = states.expand(text.shape[0], -1, -1)
    return schedule


def run_recache(cache: rk.KVCache, which: str, latents: Callable[[list[int]], torch.Tensor],
            forward: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor], batch: int, device) -> list[int]:
    """Re-cache before the next chunk: the frames ``cache.recache_frames(which)`` names, one chunk's of them at a
    time, each rewritten by one clean pass at timestep 0 (``forward(x, t, pass)`` as in :func:`denoise_chunk`, with the
    new text) over their latents (``latents(frames)`` -> [B, C, len(frames), H, W]); returns the frames."""
    frames = cache.recache_frames(which)
    for group in cache.recache_groups(frames) if frames else []:
        cache.begin_rewrite(group)
        forward(latents(group), torch.zeros(batch, len(group), device=device), 0)
        cache.end_rewrite()
    return frames


@torch.no_grad()
def rollout(
    model: CausalWanModel,
    policy_name: str,
    text: torch.Tensor,
    *,
    num_chunks: int,
    seed: int = 0,
    backend: str = "reference",
    sampler: FlowMatchSampler | None = None,
    timing: bool = True,
    progress: bool = False,
    process_group=None,
    kv_dtype: torch.dtype | None = None,
    pool_device=None,
    context: torch.Tensor | None = None,
    prompts: dict[int, torch.Tensor] | None = None,
    recache: str = "none",
) -> RolloutResult:
    """Generate ``num_chunks`` chunks with memory policy ``policy_name``.

    Args:
        model: the generator (its device and dtype are used for everything).
        policy_name: one of :data:`POLICY_NAMES`.
        text: text encoder states [B, L <= text_len, text_dim] (B is the batch size).
        num_chunks: chunks of ``policy.chunk_frames`` latent frames each.
        seed: seeds the initial and re-noising noise (drawn on the CPU: identical on every device).
        backend: ``"reference"`` or ``"fused"``, passed to ``relaxkv_kernels.KVCache``.
        timing: time the sections of every pass and the whole chunk (:class:`SectionTimer`: CUDA events on
            a GPU, host wall time on a CPU). progress: a tqdm bar (on stderr).
        process_group: an initialised ``torch.distributed`` group of P ranks (None: one process), every rank
            calling ``rollout`` with the same arguments: Ulysses sequence parallelism (:mod:`relaxkv_gen.parallel`)
            over a head-parallel cache. ValueError on every rank, before any work, unless P divides the model's
            heads and a chunk's tokens U*F. The records are this rank's (``kv_bytes``: its share of the heads).
        kv_dtype: the cache's pool dtype (None: the model's; ``torch.float8_e4m3fn``: FP8 pools, about half the
            bytes; ``RolloutResult.memory`` compares them).
        pool_device: where the cache's K/V pools live: None (the model's device) or "cpu" (host memory, pinned on
            CUDA; ``RolloutResult.memory`` splits the bytes by place).
        context: clean latent frames [1 or B, 16, n, H, W] the video starts with (image-to-video: an image's one
            latent frame; video extension: a video's latents), or None. The latents begin with them, bitwise.
            Every whole chunk of them is a context chunk: one clean pass at timestep 0 (as a refresh pass), which
            commits their K/V at their positions for the memory to treat as any frame. The rest (n mod U frames)
            opens the first generated chunk: at every pass those frames are the given latents at timestep 0, the
            others are denoised. ``num_chunks`` generated chunks follow the context chunks.
        prompts: a prompt schedule ``{chunk: text states [1 or B, L, text_dim]}`` (chunks counted as the records
            count them, context chunks included; chunk 0 defaults to ``text``), or None. From each listed chunk on the
            cross-attention reads that text.
        recache: at each switch, which stored K/V are re-computed under the new text before the chunk
            (``KVCache.recache_frames``): "none" (only the cross-attention text changes), "recent" (the last chunk's
            frames the memory reads, a dense window's whole window: LongLive's choice) or "attended" (every frame the
            next chunk may read at full resolution). Each is rewritten by a clean pass over its latents at its own
            position (``KVCache.begin_rewrite``), its derived state (Relax's prototypes, Pack's compressed block)
            following.

    Returns:
        :class:`RolloutResult` with latents [B, 16, T, H, W] (T: ``chunk_frames`` times the context chunks and
        ``num_chunks``) and one record per chunk (``context_frames``: how many of its frames were given):
        ``time_ms`` (host wall time, after a device sync on CUDA), KV bytes (allocated and in use), the cache's
        ``last_plan``, the frames each memory segment showed, ``prompt`` (the schedule's chunk whose text it read)
        and ``recached_frames`` (re-computed before it, in ``time_ms``) and, with ``timing``, ``timing_ms``:
        every section and ``"chunk"`` (:data:`CHUNK_SECTION`) on the timer's clock.
    """
    check_count("num_chunks", num_chunks)  # a finite rollout (Rollout(num_chunks=None) streams without end)
    run = Rollout(model, policy_name, text, num_chunks=num_chunks, seed=seed, backend=backend, sampler=sampler,
                  timing=timing, progress=progress, process_group=process_group, kv_dtype=kv_dtype,
                  pool_device=pool_device, context=context, prompts=prompts, recache=recache)
    return collect(run)


def collect(run: "Rollout", stop: Callable[[Callable[[], int]], contextlib.AbstractContextManager] | None = None
            ) -> RolloutResult:
    """``run``'s chunks, generated, in a :class:`RolloutResult`. ``stop``: given a function counting the chunks done, a
    context manager around the loop (one that ends it early without an error keeps the chunks done)."""
    result = RolloutResult(policy=run.policy_name, latents=None, chunk_frames=run.chunk_frames, memory=run.memory)
    outputs = []
    with contextlib.nullcontext() if stop is None else stop(lambda: len(outputs)):
        for record, x0 in run:
            result.chunks.append(record)
            outputs.append(x0)
    result.latents = torch.cat(outputs, dim=2)
    return result


class HeldLatents:
    """The latents of the frames a cache holds at full resolution, what a re-cache reads (:func:`run_recache`'s
    ``latents``): :meth:`add` each chunk's after it ends (``keep`` False: none kept, no re-cache will run)."""

    def __init__(self, cache: rk.KVCache, keep: bool):
        self.cache, self.keep, self.frames = cache, keep, {}

    def add(self, chunk: int, x0: torch.Tensor) -> None:
        """Chunk ``chunk``'s latents [B, C, U, H, W]; the frames the cache no longer holds go."""
        if self.keep:
            u = x0.shape[2]
            self.frames.update((chunk * u + i, x0[:, :, i]) for i in range(u))
            self.frames = {fr: self.frames[fr] for fr in self.cache.held_frames()}

    def __call__(self, frames: list[int]) -> torch.Tensor:
        return torch.stack([self.frames[fr] for fr in frames], dim=2)


class Rollout:
    """The chunks of a rollout, generated as they are iterated: ``for record, latents in Rollout(...)`` yields each
    chunk's record and latents [B, 16, U, H, W] (on the CPU), as :func:`rollout` collects them.

    Arguments as :func:`rollout`'s, checked at construction (ValueError / TypeError before any work), where the cache
    is made too; ``num_chunks`` None: no end, until the caller stops iterating. Attributes: ``cache``, ``memory``
    (:func:`memory_summary`), ``chunk_frames`` (U).
    """

    def __init__(self, model: CausalWanModel, policy_name: str, text: torch.Tensor, *, num_chunks: int | None,
                 seed: int = 0, backend: str = "reference", sampler: FlowMatchSampler | None = None,
                 timing: bool = True, progress: bool = False, process_group=None,
                 kv_dtype: torch.dtype | None = None, pool_device=None, context: torch.Tensor | None = None,
                 prompts: dict[int, torch.Tensor] | None = None, recache: str = "none"):
        if num_chunks is not None:
            check_count("num_chunks", num_chunks)
        if recache not in rk.RECACHE:
            raise ValueError(f"recache: expected one of {list(rk.RECACHE)}, got {recache!r}")
        cfg = model.cfg
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.model, self.policy_name, self.seed, self.progress = model, policy_name, seed, progress
        self.sampler = sampler or FlowMatchSampler.create()
        policy = make_policy(policy_name)
        self.chunk_frames = u = int(policy.chunk_frames)
        self.parallel = None if process_group is None else SequenceParallel(process_group)
        if self.parallel is not None:
            check_ranks(cfg, u, self.parallel.size)  # the same ValueError on every rank, before any collective
        first = model.embed_text(text)  # checks the text's shape
        self.batch = batch = first.shape[0]
        self.shape = (batch, cfg.in_dim, u, cfg.latent_height, cfg.latent_width)
        self.given = context_chunks(context, u, batch, self.shape, self.device, self.dtype)  # before the cache
        whole = sum(g.shape[2] == u for g in self.given)  # context chunks, before the num_chunks generated ones
        self.total = None if num_chunks is None else whole + num_chunks
        self.schedule = {chunk: first if states is text else model.embed_text(states)
                         for chunk, states in text_schedule(prompts, text, self.total).items()}
        self.recache = recache
        if self.parallel is not None and recache != "none" and len(self.schedule) > 1:
            check_ranks(cfg, 1, self.parallel.size)  # a rewrite may take one frame
        self.cache = make_cache(model, policy, batch, backend, process_group, kv_dtype, pool_device=pool_device)
        self.timer = SectionTimer(self.device) if timing else None
        if self.timer is not None:
            self.cache.profiler = self.timer.section
        self.memory = memory_summary(model, policy, batch, self.cache)

    def __iter__(self):
        model, cache, timer, device, u, batch = (self.model, self.cache, self.timer, self.device, self.chunk_frames,
                                                 self.batch)
        gen = torch.Generator().manual_seed(self.seed)

        def noise():
            return torch.randn(self.shape, generator=gen).to(device=device, dtype=self.dtype)

        sharded = {} if self.parallel is None else {"parallel": self.parallel}  # one process: the model as before
        prompt = 0

        def forward(x, t, _pass):
            return model(x, t, self.schedule[prompt], cache, timer, **sharded)

        held = HeldLatents(cache, self.recache != "none" and len(self.schedule) > 1)
        chunks = itertools.count() if self.total is None else range(self.total)
        bar = progress_bar(chunks, self.policy_name, self.progress)
        try:
            for i in bar:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                recached = []
                given = self.given[i] if i < len(self.given) else None
                with timer.section(CHUNK_SECTION) if timer is not None else contextlib.nullcontext():
                    if i in self.schedule and i:
                        prompt = i
                        recached = run_recache(cache, self.recache, held, forward, batch, device)
                    cache.begin_chunk()
                    x0 = denoise_chunk(forward, self.sampler, noise, batch, u, device, given)
                    cache.end_chunk()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                elapsed_ms = 1e3 * (time.perf_counter() - t0)
                plan = cache.last_plan
                record = {
                    "chunk": i,
                    "start_frame": i * u,
                    "frames": u,
                    "context_frames": 0 if given is None else given.shape[2],
                    "prompt": prompt,
                    "recached_frames": recached,
                    "time_ms": elapsed_ms,
                    "kv_bytes": int(cache.memory_bytes()),
                    "kv_live_bytes": int(cache.live_bytes()),
                    "plan": to_jsonable(plan),
                    # the chunk's work, which tells warm-up chunks from steady ones (report.steady_chunks)
                    "keys_attended": int(plan.total_keys()),
                    "selects": bool(plan.selects),
                    "selected_frames": to_jsonable(cache.selected_frames()),  # reads the device table: after the chunk
                }
                if timer is not None:
                    record["timing_ms"] = timer.collect()
                held.add(i, x0)
                if self.progress:
                    bar.set_postfix(ms=f"{elapsed_ms:.0f}", kv_mib=f"{record['kv_bytes'] / 2**20:.1f}")
                yield record, x0.cpu()
        finally:
            if self.progress:
                bar.close()  # ends the bar's line, on an interrupt too, so what is printed next starts a line


def progress_bar(it, desc: str, enabled: bool, unit: str = "chunk"):
    """``it`` wrapped in a tqdm bar when ``enabled``."""
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, unit=unit, dynamic_ncols=True)
