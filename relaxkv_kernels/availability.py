"""Which implementations can run here: lazy, import-safe detection.

Nothing is probed at import time (no ``torch.cuda`` query, no ``import triton``), so importing the
package and collecting tests work on CPU-only machines.

    >>> from relaxkv_kernels.availability import backends
    >>> backends()  # doctest: +SKIP
    {'reference': True, 'triton': False, 'cuda_extension': True, 'cuda_device': False}
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from types import ModuleType

import torch

_EXTENSION = "relaxkv_kernels._C"
_extension_error: str | None = None


@functools.cache
def cuda_extension() -> ModuleType | None:
    """The compiled ``relaxkv_kernels._C`` module, or None when it is not built (never raises)."""
    global _extension_error
    try:
        return importlib.import_module(_EXTENSION)
    except ImportError as exc:  # not built, or built for an incompatible runtime
        _extension_error = f"{type(exc).__name__}: {exc}"
        return None


def require_cuda_extension(op: str) -> ModuleType:
    """``relaxkv_kernels._C`` for CUDA op ``op``; RuntimeError saying how to build it otherwise."""
    ext = cuda_extension()
    if ext is None:
        raise RuntimeError(
            f"relaxkv {op}: the CUDA extension {_EXTENSION} is not built ({_extension_error}). "
            "Install with nvcc on PATH (or CUDA_HOME set) and RELAXKV_SKIP_CUDA_BUILD unset: "
            "pip install --no-build-isolation -e ."
        )
    return ext


@functools.cache
def triton_available() -> bool:
    """Whether triton is installed; checked without importing it (TRITON_INTERPRET is read at import)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """Whether Triton kernels run in the interpreter (``TRITON_INTERPRET=1``, e.g. on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def backends() -> dict[str, bool]:
    """What can run here: reference (always), triton, cuda_extension (built), cuda_device."""
    cuda_device = torch.cuda.is_available()
    return {
        "reference": True,
        "triton": triton_available() and (cuda_device or interpreter_enabled()),
        "cuda_extension": cuda_extension() is not None,
        "cuda_device": cuda_device,
    }
