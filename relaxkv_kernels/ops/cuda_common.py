"""Shared pieces of the CUDA wrappers (``ops/<op>/cuda.py``): the runtime seam, dtype codes, stride rules.

Everything device-specific goes through ``runtime`` (a :class:`CudaRuntime`): the extension module, which
tensors it accepts, the device guard and the stream. ``tests/cuda_emu/emulator.py`` replaces it with a CPU
build of the same ``csrc/`` sources to run the wrappers and kernels without a GPU.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from types import ModuleType

import torch

from ..availability import require_cuda_extension
from .checks import require
from .fp8 import scale_strides


class CudaRuntime:
    """The wrappers' device: ``relaxkv_kernels._C`` on CUDA tensors, the current torch stream."""

    device_type = "cuda"

    def extension(self, op: str) -> ModuleType:
        """The extension for ``op``; RuntimeError (not a crash) when it is not built or no GPU is present."""
        ext = require_cuda_extension(op)
        if not torch.cuda.is_available():
            raise RuntimeError(f"relaxkv {op}: no CUDA device available (torch.cuda.is_available() is False)")
        return ext

    def guard(self, device: torch.device) -> AbstractContextManager:
        """Makes ``device`` current for the launch."""
        return torch.cuda.device(device)

    def stream(self, device: torch.device) -> int:
        """The current stream of ``device`` as the integer the launchers take."""
        return torch.cuda.current_stream(device).cuda_stream


runtime = CudaRuntime()


class Launch:
    """What a wrapper needs for one launch: the extension, the device guard, the stream, dtype codes.

    ``with Launch(op, device) as (ext, stream): ext.<op>(..., launch.code(dtype), stream)``.
    """

    def __init__(self, op: str, device: torch.device):
        self.op, self.device = op, device
        self.ext = runtime.extension(op)

    def code(self, dtype: torch.dtype) -> int:
        """The extension's code for ``dtype`` (its ``dtype_codes``: the C++ enum is the one source)."""
        codes = self.ext.dtype_codes
        name = str(dtype).removeprefix("torch.")
        require(f"relaxkv {self.op}", name in codes, f"dtype: expected one of {sorted(codes)}, got {name}")
        return codes[name]

    def __enter__(self) -> tuple[ModuleType, int]:
        self._guard = runtime.guard(self.device)
        self._guard.__enter__()
        return self.ext, runtime.stream(self.device)

    def __exit__(self, *exc) -> None:
        self._guard.__exit__(*exc)


def rows(t: torch.Tensor) -> tuple[int, tuple[int, ...]]:
    """A [B, N, H, D] tensor (unit last stride) as the launchers take it: its address and its B, N, H strides."""
    return t.data_ptr(), t.stride()[:3]


def scales(t: torch.Tensor | None) -> tuple[int, tuple[int, ...]]:
    """An FP8 pool's fp32 scales [B, n_rows, H] as the launchers take them: address and B, N, H strides;
    ``(0, (0, 0, 0))`` for a pool in the compute dtype (no scales)."""
    return (0 if t is None else t.data_ptr()), scale_strides(t)


def index(t: torch.Tensor) -> torch.Tensor:
    """An index tensor as the launchers read it, through a bare pointer: contiguous int64 (a no-op when it is)."""
    return t.to(torch.int64).contiguous()


def unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """A read-only input as the kernels load it, rows of unit stride: ``t`` itself, or a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def check_written(op: str, **tensors: torch.Tensor) -> None:
    """Tensors a kernel writes in place must have a unit last stride (a copy would not be written back)."""
    for name, t in tensors.items():
        require(f"relaxkv {op}", t.stride(-1) == 1, f"{name}: expected a contiguous last dim (stride(-1) == 1) "
                f"for a tensor written in place, got strides {t.stride()}")
