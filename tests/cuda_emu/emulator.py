"""Run the csrc/ CUDA launchers and kernels on the CPU: a g++ build against an emulation of the CUDA model.

The same sources that nvcc compiles for the GPU are compiled with g++ against ``include/`` next to this
file (threads, blocks, barriers, warp shuffles, dynamic shared memory and the few runtime calls csrc
uses; see README.md and the header for what is checked and what cannot be). Two textual rewrites come
first, since g++ cannot parse them: kernel launches and ``extern __shared__`` declarations.

:class:`EmulatedRuntime` replaces :class:`relaxkv_kernels.ops.cuda_common.CudaRuntime`; tests install it
with ``monkeypatch.setattr(cuda_common, "runtime", ...)`` (the ``kernel_device`` fixture of
tests/conftest.py): the Python wrappers then compute strides and call the emulated launchers on CPU
tensors, exactly as they do on a GPU.

This tests the kernels' logic (indexing, strides, reductions, top-k, rounding, barriers, shuffles). It
says nothing about speed, coalescing or the GPU memory model: the GPU tests remain the authority.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import importlib.util
import os
import re
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

import torch

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
EMU_INCLUDE = Path(__file__).resolve().parent / "include"
BUILD = ROOT / "build" / "cuda_emu"
FLAGS = ["-std=c++20", "-O2", "-fPIC", "-fvisibility=hidden", "-fno-strict-aliasing", "-pthread",
         "-Wall", "-Wno-unknown-pragmas", "-Werror=return-type"]
# RELAXKV_EMU_SANITIZE=address: an AddressSanitizer build, the CPU analogue of compute-sanitizer memcheck.
# Run under it with tests/run_emulated_asan.sh (libasan must be preloaded into python).
SANITIZE = [f"-fsanitize={s}" for s in os.environ.get("RELAXKV_EMU_SANITIZE", "").split(",") if s]
_ALL_FLAGS = FLAGS + SANITIZE + (["-fno-omit-frame-pointer", "-g"] if SANITIZE else [])

# kernel<T, A>   <<<grid, block[, smem[, stream]]>>>   (args);
_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;]*>)?)\s*<<<(.*?)>>>\s*\((.*?)\)\s*;", re.S)
_SHARED = re.compile(r"extern\s+__shared__\s+(?:alignas\(\d+\)\s+)?([\w:]+)\s+(\w+)\s*\[\s*\]\s*;")


def _launch(m: re.Match) -> str:
    args = m[3].strip()
    return f"::relaxkv_emu::Launch({m[2]}).run({m[1]}{', ' + args if args else ''});"  # no args: run(kernel)


def translate(source: str) -> str:
    """The two rewrites g++ needs; everything else of the CUDA source is compiled as is."""
    out = _LAUNCH.sub(_launch, source)
    out = _SHARED.sub(lambda m: f"{m[1]}* {m[2]} = ::relaxkv_emu::dynamic_shared<{m[1]}>();", out)
    for token in ("<<<", "__shared__"):
        if token in out:
            raise ValueError(f"cuda_emu: a {token} that the rewrites do not cover is left")
    return out


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def missing_tools() -> list[str]:
    """What the emulated build needs and this machine lacks (empty: g++ and pybind11 are here)."""
    missing = []
    if compiler() is None:
        missing.append(f"a C++20 compiler ({os.environ.get('CXX', 'g++')} not on PATH; set $CXX)")
    if importlib.util.find_spec("pybind11") is None:
        missing.append("pybind11 (pip install pybind11)")
    return missing


def _require_compiler() -> str:
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("cuda_emu: no C++ compiler (g++, or $CXX)")
    return cxx


def compile_cuda(source: Path, output: Path, *args: str) -> Path:
    """g++ one translated CUDA source against the emulation headers into ``output`` (an object with ``-c``)."""
    cxx = _require_compiler()
    cmd = [cxx, "-x", "c++", str(source), "-o", str(output), *_ALL_FLAGS, f"-I{EMU_INCLUDE}", *args]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"cuda_emu: {' '.join(cmd)}\n{res.stderr}")
    return output


def _sources() -> list[Path]:
    return sorted(CSRC.glob("*.cu")) + sorted(CSRC.glob("*.cuh")) + sorted(CSRC.glob("*.h")) + [CSRC / "bindings.cpp"]


def build() -> Path:
    """Compile the emulated extension (cached under build/cuda_emu/<hash of sources, header, flags>)."""
    import pybind11

    cxx = _require_compiler()
    digest = hashlib.sha256()
    for path in _sources() + sorted(EMU_INCLUDE.glob("*.h")):
        digest.update(path.name.encode() + path.read_bytes())
    digest.update(" ".join([cxx, *_ALL_FLAGS]).encode())
    out_dir = BUILD / digest.hexdigest()[:16]
    lib = out_dir / "_C.so"
    if lib.exists():
        return lib
    src_dir = out_dir / "src"
    src_dir.mkdir(parents=True, exist_ok=True)
    for path in _sources():
        (src_dir / path.name).write_text(translate(path.read_text()))
    includes = [f"-I{d}" for d in (src_dir, pybind11.get_include(), sysconfig.get_paths()["include"])]
    units = [src_dir / p.name for p in _sources() if p.suffix in (".cu", ".cpp")]

    def compile_one(src: Path) -> str:
        return str(compile_cuda(src, out_dir / (src.name + ".o"), "-c", *includes))

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        objs = list(pool.map(compile_one, units))
    tmp = out_dir / f"_C.{os.getpid()}.so"
    subprocess.run([cxx, "-shared", "-pthread", *SANITIZE, *objs, "-o", str(tmp)], check=True, capture_output=True)
    tmp.replace(lib)  # atomic: a concurrent build never sees half a library
    return lib


def load(lib: Path) -> ModuleType:
    """Import the emulated extension (its init function is PyInit__C, like relaxkv_kernels._C)."""
    loader = importlib.machinery.ExtensionFileLoader("_C", str(lib))
    spec = importlib.util.spec_from_file_location("_C", str(lib), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


class EmulatedRuntime:
    """Stands in for ``relaxkv_kernels.ops.cuda_common.runtime``: the emulated extension on CPU tensors."""

    device_type = "cpu"

    def __init__(self, module: ModuleType):
        self.module = module

    def extension(self, op: str) -> ModuleType:
        return self.module

    def guard(self, device: torch.device) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def stream(self, device: torch.device) -> int:
        return 0
