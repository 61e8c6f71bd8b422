"""``relaxkv::quantize_frames``: registration, fake, backend table, the argument checks and the public function.

``torch.ops.relaxkv.*`` takes the public arguments in order, then ``checked`` (see ``ops/checks.py``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..checks import check_devices
from ..checks import check_index
from ..checks import check_int
from ..checks import check_qkv
from ..checks import checks_in_fake
from ..dispatch import OpBackends
from ..fp8 import FP8_DTYPES
from ..fp8 import check_pool_format
from .reference import quantize_frames_ref


def _triton():
    from .triton import quantize_frames_triton

    return quantize_frames_triton


BACKENDS = OpBackends("quantize_frames", reference=quantize_frames_ref, triton=_triton, auto=("triton",))


def _check(x, pool, pool_scale, frame_slot, frame_tokens) -> None:
    """The checks of :func:`quantize_frames` (public function and registered op)."""
    op = "relaxkv.quantize_frames"
    check_devices(op, x=x, pool=pool, pool_scale=pool_scale, frame_slot=frame_slot)
    check_qkv(op, "x", x)
    if pool.dtype not in FP8_DTYPES:
        raise TypeError(f"{op}: pool: expected an FP8 pool ({[str(d) for d in FP8_DTYPES]}), got {pool.dtype}")
    check_pool_format(op, "pool", pool, pool_scale, x)
    check_int(op, "frame_tokens", frame_tokens, low=1)
    check_index(op, "frame_slot", frame_slot)
    u = frame_slot.numel()
    if x.shape[1] != u * frame_tokens:  # a wrong frame_tokens would cut frames at the wrong rows
        raise ValueError(f"{op}: x: expected U * frame_tokens = {u} * {frame_tokens} rows (U = frame_slot entries: "
                         f"the chunk's rows, frame after frame), got {x.shape[1]}")
    n_slots = pool.shape[1] // frame_tokens
    if n_slots < 1:
        raise ValueError(f"{op}: pool: expected room for one frame slot of {frame_tokens} rows, got {pool.shape[1]}")
    check_index(op, "frame_slot", frame_slot, u, 0, n_slots - 1, distinct=True)


@torch.library.custom_op("relaxkv::quantize_frames", mutates_args=("pool", "pool_scale"))
def quantize_frames_op(x: Tensor, pool: Tensor, pool_scale: Tensor, frame_slot: Tensor, frame_tokens: int,
                       backend: str, checked: bool = False) -> None:
    BACKENDS.run(x.device, backend, checked, _check, x, pool, pool_scale, frame_slot, frame_tokens)


@quantize_frames_op.register_fake
def quantize_frames_fake(x, pool, pool_scale, frame_slot, frame_tokens, backend, checked=False):
    if checks_in_fake(checked, x):
        _check(x, pool, pool_scale, frame_slot, frame_tokens)


def quantize_frames(x: Tensor, pool: Tensor, pool_scale: Tensor, frame_slot: Tensor, frame_tokens: int,
                    backend: str = "auto") -> None:
    """Quantize a chunk's rows into the frame slots of an FP8 pool (``relaxkv_kernels/ops/fp8.py``).

    Row ``u * F + i`` of ``x`` goes to pool row ``frame_slot[u] * F + i`` (F = frame_tokens), each head's D values
    as e4m3 codes with one power-of-two fp32 scale. The cache commits a chunk's window rows this way at
    ``end_chunk`` (every layer in one call: leading dims flattened).

    Args:
        x: [N, U * F, H, D] float rows (fp32 / fp16 / bf16, any strides): exactly the chunk's frames.
        pool: float8_e4m3fn [N, n_rows, H, D], written in place. pool_scale: float32 [N, n_rows, H], written in
            place.
        frame_slot: int32/int64 [U] slot of each frame, distinct. frame_tokens: F.

    Example:
        >>> quantize_frames(window_k[:, :3 * 1560], k_pool, k_scale, torch.tensor([4, 5, 6]), 1560)
    """
    _check(x, pool, pool_scale, frame_slot, frame_tokens)
    torch.ops.relaxkv.quantize_frames(x, pool, pool_scale, frame_slot, frame_tokens, backend, checked=True)
