"""Which implementation of an op runs: one explicit backend table per op, one resolution rule.

Each op folder declares its table in ``op.py``, e.g. ::

    def _triton():  # imported on first use: only the Triton backends import triton
        from .triton import relax_select_triton
        return relax_select_triton

    BACKENDS = OpBackends("relax_select", reference=relax_select_ref, triton=_triton, cuda=relax_select_cuda)

The backend comes from the call's ``backend`` argument, else ``RELAXKV_BACKEND_<OP>`` (e.g.
``RELAXKV_BACKEND_SPARSE_KV_ATTENTION=triton``), else ``RELAXKV_BACKEND``, else ``auto`` (the variables are read
once per op and process: :func:`environment_backend`):

    reference  pure PyTorch, CPU and CUDA
    triton     CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``
    cuda       the compiled extension ``relaxkv_kernels._C`` (tensors of ``cuda_common.runtime``'s device type)
    auto       on CUDA the op's ``auto`` preference among the kernels it has, else the reference

A Triton or CUDA backend on a GPU the package has no code for (older than sm_80; for ``cuda``, one the extension
was not built for) raises ``relaxkv_kernels.targets.UnsupportedGPUError`` here, before any launch.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch

from ..availability import cuda_extension
from ..availability import interpreter_enabled
from ..availability import triton_available
from ..targets import require_gpu
from . import cuda_common

BACKENDS = ("auto", "reference", "triton", "cuda")


@functools.cache
def environment_backend(op: str) -> str:
    """The backend the environment names for ``op``: ``RELAXKV_BACKEND_<OP>``, else ``RELAXKV_BACKEND``, else
    ``"auto"``. Read once per op and process; ``environment_backend.cache_clear()`` reads the variables again
    (the tests that set them do)."""
    return os.environ.get(f"RELAXKV_BACKEND_{op.upper()}") or os.environ.get("RELAXKV_BACKEND", "auto")


class OpBackends:
    """The implementations of one op by backend.

    Args:
        op: the op name (``relaxkv::<op>``).
        reference: the pure-PyTorch implementation.
        triton: a loader returning the Triton launcher (imports triton), or None.
        cuda: the wrapper of the ``_C`` launcher, or None.
        auto: the kernels ``auto`` tries on CUDA, in order.
    """

    def __init__(self, op: str, *, reference: Callable, triton: Callable[[], Callable] | None = None,
                 cuda: Callable | None = None, auto: tuple[str, ...] = ("triton", "cuda")):
        self.op, self.reference, self.triton, self.cuda, self.auto = op, reference, triton, cuda, auto

    def resolve(self, device: torch.device, backend: str = "auto") -> str:
        """The backend that runs the op for tensors on ``device``."""
        op = f"relaxkv.{self.op}"
        if backend == "auto":
            backend = environment_backend(self.op)
        if backend not in BACKENDS:
            raise ValueError(f"{op}: backend: expected one of {BACKENDS}, got {backend!r}")
        if backend == "auto":
            backend = self._auto(device)
        if backend == "triton":
            if self.triton is None:
                raise RuntimeError(f"{op}: backend 'triton': no Triton kernel for this op (use 'cuda' or 'reference')")
            if not (triton_available() and (device.type == "cuda" or interpreter_enabled())):
                raise RuntimeError(f"{op}: backend 'triton' needs triton and a CUDA tensor (or TRITON_INTERPRET=1 "
                                   f"on CPU), got device {device}")
        if backend == "cuda" and (self.cuda is None or device.type != cuda_common.runtime.device_type):
            raise RuntimeError(f"{op}: backend 'cuda' needs a CUDA kernel for this op and CUDA tensors, got {device}")
        if backend != "reference" and device.type == "cuda":  # UnsupportedGPUError before any launch
            require_gpu(device, with_extension=backend == "cuda")
        return backend

    def _auto(self, device: torch.device) -> str:
        """On CUDA the first of the op's ``auto`` kernels that can run, else the reference."""
        if device.type == "cuda":
            for name in self.auto:
                if name == "triton" and self.triton is not None and triton_available():
                    return "triton"
                if name == "cuda" and self.cuda is not None and cuda_extension() is not None:
                    return "cuda"
        return "reference"

    def run(self, device: torch.device, backend: str, checked: bool, check: Callable, *args):
        """The op on ``args`` (the implementation's arguments): ``check(*args)`` first unless the caller has
        ``checked`` them, then the implementation for ``device`` and ``backend``."""
        if not checked:
            check(*args)
        return self.implementation(device, backend)(*args)

    def implementation(self, device: torch.device, backend: str = "auto") -> Callable:
        """The function that computes the op on ``device`` with ``backend``."""
        name = self.resolve(device, backend)
        if name == "reference":
            return self.reference
        if name == "triton":
            return self.triton()
        return self.cuda


def inference_only(name: str) -> None:
    """Make a backward through the functional custom op ``name`` (``relaxkv::<op>``) fail with a clear message.

    (Ops that mutate their arguments cannot carry an autograd formula; torch already refuses to
    differentiate through them, naming the op.)
    """

    def backward(ctx, *grads):
        raise RuntimeError(f"{name} is inference-only: the relaxkv ops have no backward (run them under "
                           "torch.no_grad() / torch.inference_mode())")

    torch.library.register_autograd(name, backward)
