"""One setup shared by the speed and memory benchmarks: shapes, environment record, timer, bf16 peak, writers.

Every figure a benchmark writes carries the device it was measured on. On a CPU the timer is a plain
``perf_counter`` median and every result is flagged ``"cpu_timing": true`` and printed as
"CPU time, not a GPU measurement": those numbers only show that the harness runs end to end.

Call :func:`configure_triton` before anything imports triton (the benchmark scripts do it first thing):
without CUDA it sets ``TRITON_INTERPRET=1`` so the Triton rows can run, slowly, on CPU tensors.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict
from dataclasses import dataclass
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
CPU_LABEL = "CPU time, not a GPU measurement"
EVENTS_MS = 20.0  # calls longer than this are timed with CUDA events (see measure)


def configure_triton() -> None:
    """Without CUDA, run Triton kernels in the interpreter; must run before triton is imported."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


# ----------------------------------------------------------------------------------------------------
# shapes


@dataclass(frozen=True)
class Shape:
    """Model geometry of a benchmark run (Wan2.1-1.3B: docs/pages/design.md; relaxkv_kernels/geometry.py)."""

    name: str
    layers: int
    passes: int
    batch: int
    heads: int
    head_dim: int
    height: int
    width: int
    dtype: str

    @property
    def frame_tokens(self) -> int:
        return self.height * self.width

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


SHAPES = {
    # Wan2.1-T2V-1.3B at 832x480: 30 layers x (4 denoising + 1 refresh) passes, 30x52 grid, bf16
    "wan": Shape("wan", layers=30, passes=5, batch=1, heads=12, head_dim=128, height=30, width=52, dtype="bfloat16"),
    # CI on CPU: a 4x4 grid still holds one 2x4x4 PackForcing pooling window per 2 frames
    "tiny": Shape("tiny", layers=2, passes=2, batch=1, heads=2, head_dim=32, height=4, width=4, dtype="float32"),
}


def shape_from_args(name: str, layers: int | None = None, passes: int | None = None, dtype: str | None = None) -> Shape:
    """``SHAPES[name]`` with optional overrides of layers, passes and dtype."""
    s = asdict(SHAPES[name])
    for key, value in (("layers", layers), ("passes", passes), ("dtype", dtype)):
        if value is not None:
            s[key] = value
    return Shape(**s)


def attention_flop(nq: int, nk: int, heads: int, head_dim: int, layers: int, passes: int) -> int:
    """Attention FLOP of one chunk: 4 * Nq * Nk * H * D * layers * passes (QK^T and PV, 2 FLOP per MAC)."""
    return 4 * nq * nk * heads * head_dim * layers * passes


# ----------------------------------------------------------------------------------------------------
# environment


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def git_commit() -> str:
    """``git rev-parse HEAD`` of the repository (with ``+dirty`` when the tree has changes); ``$RELAXKV_COMMIT``
    where the tree is a copy without git (a lent GPU machine: run_gpu.sh passes it); else 'unknown'."""
    if os.environ.get("RELAXKV_COMMIT"):
        return os.environ["RELAXKV_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_DIR, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_DIR,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def env_info(device: torch.device) -> dict:
    """Device name, library versions, git commit and date of this run."""
    try:
        import triton  # noqa: PLC0415 (after configure_triton)

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = props.name
        extra = {"gpu_memory_gib": round(props.total_memory / 2**30, 1), "sm_count": props.multi_processor_count,
                 "capability": f"{props.major}.{props.minor}"}
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
        extra = {"torch_threads": torch.get_num_threads()}
    return {
        "device": name,
        "device_type": device.type,
        "cpu_timing": device.type != "cuda",
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "python": platform.python_version(),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


# ----------------------------------------------------------------------------------------------------
# timing


def plan_shape(plan) -> tuple:
    """What makes one chunk's host and device work differ from the next: the plan's sizes and the lengths of its
    index lists (``plan.index``: a dataclass of lists and host scalars; a dict of lists in older trees, which
    ``bench_host.py --baseline`` measures)."""
    index = plan.index or {}
    items = index.items() if isinstance(index, dict) else vars(index).items()
    return (plan.selects, plan.total_keys(), plan.memory_keys(), plan.pool_prefix() is None, len(plan.segments),
            tuple(sorted((name, len(values)) for name, values in items if isinstance(values, list))))


def steady_chunk(policy, height: int, width: int, horizon: int = 400) -> int:
    """First chunk from which the policy's plans keep their shapes (:func:`plan_shape`), found by running its host
    planner alone (no device work). Before it, chunks attend to different numbers of keys (the dense window fills,
    Pack adds mid blocks) and index buffers change shape, so a captured graph could not replay; from it on every
    chunk costs the same. RuntimeError when the plans still change in the second half of ``horizon`` chunks."""
    planner = policy.planner(height, width)
    shapes = [plan_shape(planner.plan(n)) for n in range(horizon)]
    last = max((n for n in range(1, horizon) if shapes[n] != shapes[n - 1]), default=0)
    if last > horizon // 2:
        raise RuntimeError(f"{type(policy).__name__}: plans still change shape at chunk {last}: no steady state "
                           f"within {horizon} chunks")
    return last


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def text_table(head: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a left-aligned plain-text table: the header, then one line per row."""
    widths = [max(len(h), *(len(r[j]) for r in rows)) for j, h in enumerate(head)] if rows else [len(h) for h in head]
    return ["  ".join(v.ljust(w) for v, w in zip(line, widths)) for line in [head, *rows]]


def generator_setup(args):
    """A whole-model benchmark's (device, model config, dtype): wan-1.3b in bf16 on CUDA, tiny in fp32 on a CPU,
    unless ``args.preset`` says; ``args.backend`` defaults to the generator's (fused on CUDA, else reference)."""
    from relaxkv_gen import get_preset
    from relaxkv_gen.rollout import default_backend

    device = default_device()
    args.backend = args.backend or default_backend()
    cfg = get_preset(args.preset or ("wan-1.3b" if device.type == "cuda" else "tiny"))
    return device, cfg, torch.bfloat16 if device.type == "cuda" else torch.float32


def target_lines(targets: list[dict], where) -> list[str]:
    """One line per target: what, where (``where(target)``), the value, and whether it is met (not judged on a CPU)."""
    verdict = {True: "met", False: "NOT met", None: "not judged (CPU)"}
    return [f"target {g['target']} [{where(g)}]: {fmt(g['value'])} -> {verdict[g['met']]}" for g in targets]


class ChunkRun:
    """A model path with one policy's KV cache, driven whole chunks at a time: ``forward(x, t, i)`` -> flow for
    latents x ``shape`` = [B, C, U, H, W], per-frame timesteps t [B, U] and pass index i.

    Noise comes from a generator on ``device`` seeded with ``seed``: paths seeded alike hold the same K/V after the
    same chunks (up to rounding)."""

    def __init__(self, forward, cache, shape: tuple, device: torch.device, dtype: torch.dtype, seed: int):
        from relaxkv_gen import FlowMatchSampler

        self.forward, self.cache, self.shape, self.device, self.dtype = forward, cache, shape, device, dtype
        self.batch, self.frames = shape[0], shape[2]
        self.sampler = FlowMatchSampler.create()
        self.gen = torch.Generator(device=device).manual_seed(seed)

    def noise(self) -> torch.Tensor:
        return torch.randn(self.shape, generator=self.gen, device=self.device, dtype=self.dtype)

    def warm_up(self, chunks: int, desc: str, progress: bool) -> None:
        """``chunks`` chunks of one pass each: the refresh pass alone writes a chunk's K/V."""
        from relaxkv_gen.rollout import progress_bar

        refresh_t = torch.zeros(self.batch, self.frames, device=self.device)
        for _ in progress_bar(range(chunks), desc, progress):
            self.cache.begin_chunk()
            self.forward(self.noise(), refresh_t, 0)
            self.cache.end_chunk()

    def chunk(self, forward=None) -> None:
        """One whole chunk through ``forward`` (default: the path's own): the denoising passes and the refresh
        pass, sampler included."""
        from relaxkv_gen import denoise_chunk

        self.cache.begin_chunk()
        denoise_chunk(forward or self.forward, self.sampler, self.noise, self.batch, self.frames, self.device)
        self.cache.end_chunk()

    def flows_of_chunk(self, forwards: list) -> list[list[torch.Tensor]]:
        """The flows of the next chunk through each forward, all from the same state and noise."""
        from relaxkv_gen import denoise_chunk

        noises = [self.noise() for _ in range(self.sampler.num_steps)]
        out = []
        for forward in forwards:
            self.cache.begin_chunk()  # the same chunk planned again
            flows, it = [], iter(noises)

            def keep(x, t, i, forward=forward, flows=flows):
                flow = forward(x, t, i)
                flows.append(flow.clone())
                return flow

            denoise_chunk(keep, self.sampler, lambda it=it: next(it), self.batch, self.frames, self.device)
            out.append(flows)
        self.cache.end_chunk()
        return out


def first_pass_flows(runs: list[ChunkRun], seed: int) -> list[torch.Tensor]:
    """Each run's flow (fp32) for one input, the next chunk's first pass from its state (the chunk is planned again
    by the next ``begin_chunk``): what two paths of one model should agree on."""
    first = runs[0]
    gen = torch.Generator(device=first.device).manual_seed(seed + 1)
    x = torch.randn(first.shape, generator=gen, device=first.device, dtype=first.dtype)
    t = first.sampler.timesteps[0].to(first.device).expand(first.batch, first.frames)
    flows = []
    for run in runs:
        run.cache.begin_chunk()
        flows.append(run.forward(x, t, 0).float())
    return flows


def timed_calls(fn, device: torch.device, reps: int) -> list[float]:
    """``reps`` calls of ``fn()``, each timed in ms: CUDA events on a GPU, ``perf_counter`` elsewhere."""
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def comparison_parser(doc: str, policies: tuple[str, ...], what: str) -> argparse.ArgumentParser:
    """The flags of a benchmark timing two model paths per policy in interleaved rounds (``what``: a path's name)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["tiny", "wan-1.3b"], help="default: wan-1.3b on CUDA, tiny on a CPU")
    p.add_argument("--policies", default=",".join(policies), help=f"comma-separated (default: {','.join(policies)})")
    p.add_argument("--backend", choices=["reference", "fused"], help="KV memory backend (default: fused on CUDA)")
    p.add_argument("--reps", type=int, default=3, help=f"timed chunks per {what} and round")
    p.add_argument("--rounds", type=int, default=3, help=f"interleaved rounds (each {what} measured once per round)")
    p.add_argument("--budget-s", type=float, default=10.0, help="cap on the timed reps of one measurement (seconds)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="JSON path (CSV beside it)")
    p.add_argument("--no-progress", action="store_true")
    return p


def parse_comparison_args(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """``p``'s arguments, ``--policies`` as a list of the generator's policy names (usage error otherwise)."""
    from relaxkv_gen.rollout import POLICY_NAMES

    args = p.parse_args(argv)
    args.policies = [s for s in args.policies.split(",") if s]
    bad = [s for s in args.policies if s not in POLICY_NAMES]
    if bad or not args.policies:
        p.error(f"unknown policies {bad} (expected some of {list(POLICY_NAMES)})")
    if args.reps < 1 or args.rounds < 1:
        p.error(f"--reps and --rounds: expected >= 1, got {args.reps} and {args.rounds}")
    return args


def free_memory(device: torch.device) -> None:
    """Collect what the last measurement left (its caches, models) and hand the CUDA cache back, so the next one
    starts from the same memory."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class Timing:
    """Median time of one call of a benchmarked function."""

    ms: float
    reps: int
    method: str
    cpu_timing: bool

    def as_dict(self, prefix: str = "") -> dict:
        return {f"{prefix}ms": self.ms, f"{prefix}reps": self.reps, f"{prefix}method": self.method}


def measure(fn, device: torch.device, warmup: int = 1, reps: int = 5, budget_s: float = 30.0) -> Timing:
    """Median wall time of ``fn()`` in milliseconds.

    CUDA: one untimed call (compilation, autotuning), then ``triton.testing.do_bench`` (median, L2
    flushed between reps) when one call takes under ``EVENTS_MS``; longer calls (whole chunks: 100 ms and
    more) are timed with CUDA events, ``reps`` times after ``warmup`` calls, so a chunk row costs
    1 + warmup + reps calls instead of do_bench's ~11 (an L2 flush is noise against a chunk's
    gigabytes). ``budget_s`` caps the reps either way.
    CPU: ``warmup`` untimed calls, then the median of ``reps`` ``perf_counter`` intervals (flagged
    ``cpu_timing``).
    """
    if device.type == "cuda":
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        first_ms = (time.perf_counter() - t0) * 1e3
        reps = max(1, min(reps, int(budget_s * 1e3 / max(first_ms, 1e-3))))
        if first_ms < EVENTS_MS:
            from triton.testing import do_bench  # noqa: PLC0415

            rep_ms = min(max(100.0, reps * first_ms), budget_s * 1e3)
            ms = do_bench(fn, warmup=min(25.0, 2 * first_ms + 1), rep=rep_ms, return_mode="median")
            return Timing(float(ms), max(1, int(rep_ms / max(first_ms, 1e-3))), "triton.testing.do_bench median", False)
        for _ in range(max(0, warmup - 1)):
            fn()
        return Timing(statistics.median(timed_calls(fn, device, reps)), reps, "cuda events median", False)
    for _ in range(warmup):
        fn()
    times = []
    deadline = time.perf_counter() + budget_s
    for i in range(max(1, reps)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() > deadline:
            break
    return Timing(statistics.median(times), len(times), "perf_counter median (" + CPU_LABEL + ")", True)


def bf16_matmul_peak(device: torch.device, n: int | None = None, budget_s: float = 10.0) -> dict:
    """Achieved bf16 matmul throughput (n x n x n, TFLOP/s) on ``device``, measured in this run.

    On CUDA this is the ceiling the attention rows are compared with (n = 8192 by default). On CPU it
    is reported (n = 512) but labelled: it is CPU bf16 matmul speed, not a GPU figure.
    """
    n = n or (8192 if device.type == "cuda" else 512)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)
    t = measure(lambda: a @ b, device, warmup=1, reps=5, budget_s=budget_s)
    tflops = 2 * n**3 / (t.ms * 1e-3) / 1e12
    out = {"n": n, "ms": t.ms, "tflops": tflops, "method": t.method, "cpu_timing": t.cpu_timing}
    if t.cpu_timing:
        out["label"] = f"bf16 matmul on the CPU ({CPU_LABEL})"
    return out


def throughput(flop: int | None, ms: float | None, peak_tflops: float | None) -> tuple[float | None, float | None]:
    """(achieved TFLOP/s, fraction of the measured bf16 peak) for ``flop`` done in ``ms``."""
    if not flop or not ms or not math.isfinite(ms):
        return None, None
    tflops = flop / (ms * 1e-3) / 1e12
    return tflops, (tflops / peak_tflops if peak_tflops else None)


# ----------------------------------------------------------------------------------------------------
# results


def default_out(kind: str, shape: str, device: torch.device) -> Path:
    tag = "cpu" if device.type != "cuda" else torch.cuda.get_device_name(device).lower().replace(" ", "_")
    return RESULTS_DIR / f"{kind}_{shape}_{tag}.json"


def write_results(path: str | os.PathLike, payload: dict, rows: list[dict]) -> tuple[Path, Path]:
    """Write ``payload`` (with ``rows``) as JSON at ``path`` and the rows as CSV beside it (same stem)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = dict(payload, rows=rows)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    csv_path = path.with_suffix(".csv")
    env = payload.get("env", {})
    stamp = {k: env.get(k) for k in ("device", "torch", "triton", "cuda", "commit", "date", "cpu_timing")}
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields and not isinstance(row[k], (dict, list))]
    fields += [k for k in stamp if k not in fields]
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**stamp, **row})
    return path, csv_path


def fmt(x, digits: int = 3) -> str:
    """Short human format for tables: None -> '-', floats with ``digits`` significant digits."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:.0f}"
    return str(x)
