"""Compile every Triton launch the package makes, for every GPU target, on any machine (no GPU needed).

Rollouts of KVCache at Wan2.1-1.3B shapes (B = 1, H = 12, D = 128, 30x52 tokens a frame, bf16; one layer: every
layer launches the same kernels) run on CPU tensors with the Triton backend while the launches are captured, not
run (no output is computed, none is read: a chunk never syncs with the host). Each distinct launch (kernel,
argument dtypes, the JIT's alignment and value specialisations, constexprs, launch options; one per autotune
config) is then compiled for each target of ``relaxkv_kernels.targets.TARGETS`` under a stand-in Triton driver that
reports that target, exactly as the JIT would compile it on that GPU, and ptxas (``-v``, Triton's flags) reports its
registers and spills; shared memory comes from the compiled kernel's metadata.

A row fails when it does not compile, or needs more shared memory or registers than its target has (unless the
autotuner prunes that config there), or spills in the window-mode hot path (``HOT``).

    python -m benchmarks target_report                      # the full matrix: every policy, mode and kv_dtype
    python -m benchmarks target_report --targets sm_80,sm_120 --policies relax --modes window
    python -m benchmarks target_report --json benchmarks/results/targets.json

Run it without TRITON_INTERPRET=1 (the interpreter replaces the jitted kernels this compiles).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction
from triton.runtime.jit import MockTensor

import relaxkv_kernels as rk
from benchmarks.common import git_commit
from benchmarks.reports.cuda_resource_report import ptxas_usage
from benchmarks.reports.cuda_resource_report import report as cuda_report
from relaxkv_kernels import availability
from relaxkv_kernels.availability import interpreter_enabled
from relaxkv_kernels.ops import dispatch
from relaxkv_kernels.targets import TARGETS
from relaxkv_kernels.targets import Target

ROOT = Path(__file__).resolve().parents[2]

POLICIES = {"dense": rk.DenseWindow, "relax": rk.RelaxMemory, "pack": rk.PackMemory}
MODES = ("window", "per_call", "segments")
KV_DTYPES = {"bf16": None, "fp8": torch.float8_e4m3fn}
WAN = {"batch": 1, "num_heads": 12, "head_dim": 128, "height": 30, "width": 52}
# the window-mode hot path: staging (gather_kv_rope), rope_append, the window commit (quantize_frames), the engines'
# Triton kernel (sparse_kv_attention over one segment): no spill allowed there
HOT = ("_gather_kv_rope_kernel", "_rope_append_kernel", "_quantize_frames_kernel", "_sparse_kv_attention_kernel")


class Pointer(MockTensor):
    """A captured tensor argument as the JIT specialises it (dtype, address alignment), without its storage."""

    def __init__(self, t: torch.Tensor):
        super().__init__(t.dtype)
        self.address = t.data_ptr()

    def data_ptr(self):
        return self.address


@dataclass
class Launch:
    """One captured launch: the jitted function, its arguments (tensors as :class:`Pointer`), its autotune configs
    (None: not autotuned) and where it was seen."""

    fn: JITFunction
    args: tuple
    kwargs: dict
    autotuner: Autotuner | None
    seen: set = field(default_factory=set)

    @property
    def kernel(self) -> str:
        return self.fn.__name__

    def configs(self) -> list[triton.Config | None]:
        return [None] if self.autotuner is None else list(self.autotuner.configs)

    def pruned(self) -> list[triton.Config | None]:
        """The configs the autotuner keeps on the target the active driver reports."""
        if self.autotuner is None or self.autotuner.early_config_prune is None:
            return self.configs()
        nargs = dict(zip(self.autotuner.arg_names, self.args))
        return list(self.autotuner.early_config_prune(self.autotuner.configs, nargs, **self.kwargs))


def _stand_in(arg):
    return Pointer(arg) if isinstance(arg, torch.Tensor) else arg


def _key(fn, args, kwargs) -> tuple:
    """What the JIT specialises a launch on: dtypes, 16-byte alignment of addresses, ints equal to 1 or divisible by
    16, constexprs and options (a coarse superset of its cache key: never merges two launches it compiles apart)."""
    def spec(a):
        if isinstance(a, Pointer):
            return (str(a.dtype), a.address % 16 == 0)
        if isinstance(a, bool) or a is None or isinstance(a, (float, str)):
            return (type(a).__name__, a if not isinstance(a, float) else None)
        if isinstance(a, int):
            return ("int", a == 1, a % 16 == 0, -2**31 <= a < 2**31)
        return repr(a)
    return (fn.__name__, tuple(spec(a) for a in args), tuple(sorted((k, spec(v)) for k, v in kwargs.items())))


@contextlib.contextmanager
def capturing(where: list[str]):
    """Record every Triton launch (into the yielded dict, deduplicated) instead of running it; ops take the Triton
    backend on CPU tensors meanwhile. ``where[0]`` labels the launches seen (the rollout running)."""
    kernel_files = sorted((ROOT / "relaxkv_kernels" / "ops").glob("*/triton.py"))
    for name in ["triton_attention", *(f"{path.parent.name}.triton" for path in kernel_files)]:  # imported first:
        importlib.import_module(f"relaxkv_kernels.ops.{name}")  # they read the real interpreter_enabled
    launches: dict[tuple, Launch] = {}
    jit_run, tuner_run = JITFunction.run, Autotuner.run
    checks = (dispatch.interpreter_enabled, availability.interpreter_enabled)

    def record(fn, autotuner, args, kwargs):
        kwargs = {k: _stand_in(v) for k, v in kwargs.items() if k not in ("grid", "warmup")}
        args = tuple(_stand_in(a) for a in args)
        launch = launches.setdefault(_key(fn, args, kwargs), Launch(fn, args, kwargs, autotuner))
        launch.seen.add(where[0])

    def run_jit(self, *args, grid, warmup, **kwargs):
        if warmup:
            return jit_run(self, *args, grid=grid, warmup=warmup, **kwargs)
        record(self, None, args, kwargs)

    def run_tuner(self, *args, **kwargs):
        record(self.fn, self, args, kwargs)

    JITFunction.run, Autotuner.run = run_jit, run_tuner
    dispatch.interpreter_enabled = availability.interpreter_enabled = lambda: True  # Triton on CPU tensors
    try:
        yield launches
    finally:
        JITFunction.run, Autotuner.run = jit_run, tuner_run
        dispatch.interpreter_enabled, availability.interpreter_enabled = checks


def rollout(policy: str, attention: str, kv_dtype: str, chunks: int) -> None:
    """``chunks`` chunks of 5 passes (4 denoising + refresh) of one layer at Wan shapes on CPU tensors, every op on
    the Triton backend (launches captured by :func:`capturing`, which must be active)."""
    pol = POLICIES[policy]()
    engine = "auto" if attention == "segments" else "triton"
    cache = rk.KVCache(pol, 1, **WAN, dtype=torch.bfloat16, device="cpu", backend="triton", attention=attention,
                       engine=engine, kv_dtype=KV_DTYPES[kv_dtype])
    shape = (WAN["batch"], pol.chunk_frames * WAN["height"] * WAN["width"], WAN["num_heads"], WAN["head_dim"])
    q, k, v = (torch.empty(shape, dtype=torch.bfloat16) for _ in range(3))
    for _ in range(chunks):
        cache.begin_chunk()
        for _ in range(5):
            cache.attend(0, q, k, v)
        cache.end_chunk()


def capture(policies, modes, kv_dtypes, chunks: int) -> list[Launch]:
    """The distinct launches of the rollouts of every (policy, mode, kv_dtype)."""
    where = [""]
    with capturing(where) as launches:
        for policy in policies:
            for mode in modes:
                for kv in kv_dtypes:
                    where[0] = f"{policy}/{mode}/{kv}"
                    rollout(policy, mode, kv, chunks)
    return list(launches.values())


class StandInDriver:
    """A Triton driver that reports ``target`` and launches nothing: the JIT binds and compiles for it."""

    def __init__(self, target: Target, device: int):
        self.target, self.device = target, device  # the relaxkv target, read by active_target()

    def get_current_target(self) -> GPUTarget:
        major, minor = self.target.capability
        return GPUTarget("cuda", major * 10 + minor, 32)

    def get_current_device(self) -> int:
        return self.device  # one JIT cache per target

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


@contextlib.contextmanager
def stand_in(target: Target):
    previous = triton.runtime.driver._active  # None where no GPU driver was ever needed (reset_active would fail)
    triton.runtime.driver.set_active(StandInDriver(target, TARGETS.index(target)))
    try:
        yield
    finally:
        triton.runtime.driver.set_active(previous)


@functools.lru_cache(maxsize=None)
def ptxas_resources(ptx: str, target: Target) -> dict:
    """Registers and spill bytes ptxas gives the kernel of ``ptx`` for ``target`` (Triton's own ptxas and flags)."""
    capability = target.capability[0] * 10 + target.capability[1]
    arch = f"sm_{capability}" + ("a" if capability >= 90 else "")  # as Triton names it
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        cmd = [get_ptxas(capability).path, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", str(src),
               "-o", str(Path(tmp) / "k.cubin")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    (row,) = ptxas_usage(log)
    return {k: row[k] for k in ("registers", "stack", "spill_stores", "spill_loads")}


def ptxas_local_memory(kernel) -> int:
    """``ops.triton_attention.local_memory`` for a kernel compiled for the stand-in target: ptxas's stack frame
    (the local memory the GPU would report), in Triton's 4-byte words."""
    return ptxas_resources(kernel.asm["ptx"], active_target())["stack"] // 4


def active_target() -> Target:
    return triton.runtime.driver.active.target


def compile_row(launch: Launch, config, target: Target, kept: bool) -> dict:
    """One launch and config compiled for ``target``: resources and verdict."""
    opts = {} if config is None else config.all_kwargs()
    codes = (torch.float8_e4m3fn, torch.uint8)  # FP8 pools as the kernels take them (converted / decoded)
    row = {"kernel": launch.kernel, "target": target.arch, "config": _config_name(config, launch),
           "fp8": any(isinstance(a, Pointer) and a.dtype in codes for a in launch.args),
           "kept": kept, "hot": launch.kernel in HOT and any("/window/" in w for w in launch.seen),
           "seen": sorted(launch.seen)}
    t0 = time.perf_counter()
    try:
        with stand_in(target):
            ck = launch.fn.warmup(*launch.args, grid=(1,), **launch.kwargs, **opts)
    except Exception as e:  # noqa: BLE001  (a failed compile is a row of the table, not the end of the report)
        row.update(compiled=False, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
        return row
    ptx = ck.asm["ptx"]
    row.update(compiled=True, smem=ck.metadata.shared, num_warps=ck.metadata.num_warps,
               cp_async="cp.async" in ptx, wgmma="wgmma" in ptx, **ptxas_resources(ptx, target))
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    return row


def _config_name(config, launch: Launch) -> str:
    if config is None:
        warps = launch.kwargs.get("num_warps", 4)
        return f"w{warps}"
    kw = "".join(f"{k[6:] if k.startswith('BLOCK_') else k}{v}" for k, v in config.kwargs.items())
    return f"{kw} w{config.num_warps} s{config.num_stages}"


def verdict(row: dict, target: Target) -> list[str]:
    """Why a row fails (empty: it passes)."""
    if not row["compiled"]:
        return [f"does not compile: {row['error']}"]
    bad = []
    if row["kept"] and row["smem"] > target.smem_per_block:
        bad.append(f"shared memory {row['smem']} B > {target.smem_per_block} B")
    if row["kept"] and row["registers"] * 32 * row["num_warps"] > target.regs_per_block:
        bad.append(f"{row['registers']} registers x {32 * row['num_warps']} threads > {target.regs_per_block}")
    if row["kept"] and row["hot"] and row["spill_stores"] + row["spill_loads"] > 0:
        bad.append(f"spills {row['spill_stores']} B in the window hot path")
    return bad


def report(targets: list[Target], policies, modes, kv_dtypes, chunks: int) -> list[dict]:
    """One row per distinct launch, autotune config and target. The rollouts are captured under each target's
    stand-in driver: what a launcher decides from the target (FP8 codes read as uint8 on sm_80 / sm_86) and what the
    autotuner prunes there are what that GPU would get."""
    from relaxkv_kernels.ops import triton_attention as attention

    rows = []
    attention.local_memory = ptxas_local_memory  # the autotuner's pruning reads ptxas here, not a GPU
    for target in targets:
        with stand_in(target):
            launches = capture(policies, modes, kv_dtypes, chunks)
            kept = {id(launch): {id(c) for c in launch.pruned()} for launch in launches}
        for launch in launches:
            for config in launch.configs():
                row = compile_row(launch, config, target, id(config) in kept[id(launch)])
                row["fails"] = verdict(row, target)
                rows.append(row)
    return rows


def summary(rows: list[dict], cuda: dict[str, list[dict]]) -> list[str]:
    """The table of docs/pages/supported-gpus.md (markdown) from the rows of a run and the CUDA kernels' per target."""
    lines = ["| target | GPUs | shared memory / block | FP8 pools | Triton launches compiled | hot path: max "
             "registers, spills, shared memory | attention configs kept (bf16 / FP8 pools) | CUDA kernels: max "
             "registers, spills | measured on hardware |", "|" + "---|" * 9]
    for t in TARGETS:
        mine = [r for r in rows if r["target"] == t.arch]
        if not mine:
            continue
        hot = [r for r in mine if r["hot"] and r["kept"] and r["compiled"]]
        kept = {}
        for r in mine:
            if r["kernel"] == "_sparse_kv_attention_kernel" and r["kept"]:
                kept.setdefault("FP8" if r["fp8"] else "bf16", set()).add(r["config"])
        attention = " / ".join(", ".join(sorted(kept.get(k, ()))) or "-" for k in ("bf16", "FP8"))
        ck = cuda.get(t.arch)
        cuda_cell = (f"{max(r['registers'] for r in ck)}, {max(r['spill_stores'] for r in ck)} B" if ck else "-")
        lines.append(
            f"| {t.arch} | {t.gpus} | {t.smem_per_block // 1024} KiB | "
            f"{'converted in hardware' if t.fp8_tensor_cores else 'decoded in software'} | "
            f"{sum(r['compiled'] for r in mine)}/{len(mine)} | {max(r['registers'] for r in hot)}, "
            f"{max(r['spill_stores'] for r in hot)} B, {max(r['smem'] for r in hot) // 1024} KiB | {attention} | "
            f"{cuda_cell} | {t.measured or 'no (compiled and checked only)'} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default=",".join(t.arch for t in TARGETS))
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--kv-dtypes", default=",".join(KV_DTYPES))
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--cuda", action="store_true", help="also report the csrc/ kernels per target (nvcc, minutes)")
    args = ap.parse_args(argv)
    if interpreter_enabled():
        raise SystemExit("target_report: unset TRITON_INTERPRET (it replaces the jitted kernels this compiles)")
    targets = [t for t in TARGETS if t.arch in args.targets.split(",")]
    t0 = time.perf_counter()
    rows = report(targets, args.policies.split(","), args.modes.split(","), args.kv_dtypes.split(","), args.chunks)
    for r in rows:
        res = (f"regs {r['registers']:3d} spill {r['spill_stores']:5d} smem {r['smem'] // 1024:3d} KiB"
               if r["compiled"] else "-")
        print(f"{r['target']:8} {r['kernel']:32} {r['config']:22} {'kept' if r['kept'] else 'pruned':6} "
              f"{'hot' if r['hot'] else '   '} {res}  {'; '.join(r['fails']) or 'ok'}")
    failed = [r for r in rows if r["fails"]]
    cuda = {t.arch: cuda_report(t.arch) for t in targets} if args.cuda else {}
    table = summary(rows, cuda)
    print("\n".join(table))
    print(f"{len(rows)} compiles, {len(failed)} failing, {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"triton": triton.__version__, "torch": torch.__version__,
                                         "commit": git_commit(), "summary": table, "rows": rows, "cuda": cuda},
                                        indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
