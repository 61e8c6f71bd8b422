"""Shared pieces of the Python launchers of ``relaxkv_kernels._C``: extension/device checks, dtype codes, streams.

Everything device-specific goes through ``runtime`` (a :class:`CudaRuntime`): the extension module, which
tensors it accepts, the device guard and the stream. ``tests/cuda_emulator.py`` replaces it with a CPU build
of the same ``csrc/`` sources to run the launchers and kernels without a GPU.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from types import ModuleType

import torch

from relaxkv_kernels.availability import require_cuda_extension
from relaxkv_kernels.validate import index_arg, require

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


class CudaRuntime:
    """The launchers' device: ``relaxkv_kernels._C`` on CUDA tensors, the current torch stream."""

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


def require_device(op: str) -> ModuleType:
    """The extension for ``op`` (see :meth:`CudaRuntime.extension`)."""
    return runtime.extension(op)


def device_guard(device: torch.device) -> AbstractContextManager:
    return runtime.guard(device)


def stream(device: torch.device) -> int:
    return runtime.stream(device)


def check(op: str, cond: bool, message: str) -> None:
    """ValueError ``relaxkv <op>: <message>`` when ``cond`` is false."""
    require(f"relaxkv {op}", cond, message)


def check_cuda_tensors(op: str, device: torch.device, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        check(op, isinstance(t, torch.Tensor) and t.device.type == runtime.device_type and t.device == device,
              f"{name}: expected a {runtime.device_type.upper()} tensor on {device}, "
              f"got {getattr(t, 'device', type(t).__name__)}")


def unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """A read-only input as the kernels load it, rows of unit stride: ``t`` itself, or a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def check_written(op: str, **tensors: torch.Tensor) -> None:
    """Tensors a kernel writes in place must have a unit last stride (a copy would not be written back)."""
    for name, t in tensors.items():
        check(op, t.stride(-1) == 1, f"{name}: expected a contiguous last dim (stride(-1) == 1) for a tensor "
              f"written in place, got strides {t.stride()}")


def check_index(op: str, name: str, t: torch.Tensor, length: int | None = None) -> torch.Tensor:
    """:func:`relaxkv_kernels.validate.index_arg` with the launcher's ``relaxkv <op>`` prefix."""
    return index_arg(f"relaxkv {op}", name, t, length)
