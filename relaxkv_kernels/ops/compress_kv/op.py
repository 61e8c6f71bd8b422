"""``relaxkv::compress_kv``: registration, fake, backend table, the argument checks and the public function.

``torch.ops.relaxkv.*`` takes the public arguments in order, then ``checked`` (see ``ops/checks.py``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ...geometry import POOL_T
from ...geometry import POOL_X
from ...geometry import POOL_Y
from ...geometry import compressed_grid
from ..checks import check_devices
from ..checks import check_index
from ..checks import check_int
from ..checks import check_qkv
from ..checks import check_tensor
from ..checks import checks_in_fake
from ..dispatch import OpBackends
from ..fp8 import check_kv_pools
from .cuda import compress_kv_cuda
from .reference import compress_kv_into_ref


def _triton():
    from .triton import compress_kv_triton

    return compress_kv_triton


BACKENDS = OpBackends("compress_kv", reference=compress_kv_into_ref, triton=_triton, cuda=compress_kv_cuda)


def _check(k, v, k_pool, v_pool, mean_key, block_slot, t0, row0, frames, height, width, k_pool_scale=None,
           v_pool_scale=None) -> None:
    """The checks of :func:`compress_kv` (public function and registered op)."""
    op = "relaxkv.compress_kv"
    check_devices(op, k=k, v=v, k_pool=k_pool, v_pool=v_pool, mean_key=mean_key, block_slot=block_slot, t0=t0)
    check_qkv(op, "k", k)
    for name, value in (("frames", frames), ("height", height), ("width", width)):
        check_int(op, name, value, low=1)
    if frames < POOL_T or height < POOL_Y or width < POOL_X:
        raise ValueError(f"{op}: block: expected at least {POOL_T}x{POOL_Y}x{POOL_X} (t, y, x) to pool, got "
                         f"{frames}x{height}x{width}")
    if k.shape[1] != frames * height * width:
        raise ValueError(f"{op}: k: expected {frames}*{height}*{width} = {frames * height * width} tokens, "
                         f"got {k.shape[1]}")
    check_tensor(op, "v", v, shape=tuple(k.shape), dtypes=(k.dtype,))
    check_kv_pools(op, "pool", k_pool, v_pool, k_pool_scale, v_pool_scale, k)
    b, _, h, d = k.shape
    check_tensor(op, "mean_key", mean_key, shape=(b, None, h, d), dtypes=(torch.float32,))
    nc = math.prod(compressed_grid(frames, height, width))
    check_int(op, "row0", row0, low=0, high=k_pool.shape[1] - nc)
    n_blocks = min(mean_key.shape[1], (k_pool.shape[1] - row0) // nc)
    check_index(op, "block_slot", block_slot, 1, 0, n_blocks - 1)
    check_index(op, "t0", t0, 1)


@torch.library.custom_op("relaxkv::compress_kv",
                         mutates_args=("k_pool", "v_pool", "mean_key", "k_pool_scale", "v_pool_scale"))
def compress_kv_op(k: Tensor, v: Tensor, k_pool: Tensor, v_pool: Tensor, mean_key: Tensor, block_slot: Tensor,
                   t0: Tensor, row0: int, frames: int, height: int, width: int, backend: str,
                   k_pool_scale: Optional[Tensor] = None, v_pool_scale: Optional[Tensor] = None,
                   checked: bool = False) -> None:
    BACKENDS.run(k.device, backend, checked, _check, k, v, k_pool, v_pool, mean_key, block_slot, t0, row0, frames,
                 height, width, k_pool_scale, v_pool_scale)


@compress_kv_op.register_fake
def compress_kv_fake(k, v, k_pool, v_pool, mean_key, block_slot, t0, row0, frames, height, width, backend,
                     k_pool_scale=None, v_pool_scale=None, checked=False):
    if checks_in_fake(checked, k):
        _check(k, v, k_pool, v_pool, mean_key, block_slot, t0, row0, frames, height, width, k_pool_scale,
               v_pool_scale)


def compress_kv(k: Tensor, v: Tensor, k_pool: Tensor, v_pool: Tensor, mean_key: Tensor, block_slot: Tensor,
                t0: Tensor, row0: int, frames: int, height: int, width: int, backend: str = "auto",
                k_pool_scale: Optional[Tensor] = None, v_pool_scale: Optional[Tensor] = None) -> None:
    """PackForcing compression: 2x4x4 average pooling of a block's K and V into compressed pool rows.

    With Nc = (frames // 2) * (height // 4) * (width // 4) compressed tokens c = (tc, yc, xc), pk and pv the float32
    means of k and v over c's 2x4x4 (t, y, x) window, and slot = block_slot[0]:

        k_pool[b, row0 + slot * Nc + c] = rope(pk) at its window centre (t0 + 2 tc + 0.5, 4 yc + 1.5, 4 xc + 1.5)
        v_pool[b, row0 + slot * Nc + c] = pv
        mean_key[b, slot]               = mean over c of pk   (float32, pre-RoPE: the block's key for the affinity)

    rope is Wan's 3D RoPE (as in :func:`rope_append`, at fractional positions). Windows past the floors (an odd frame,
    rows / columns past a multiple of 4) are dropped.

    Args:
        k, v: [B, frames * F, H, D] pre-RoPE block keys / values (F = height * width; fp32 / fp16 / bf16).
        k_pool, v_pool: [B, n_rows, H, D] in the dtype of k, or both float8_e4m3fn (FP8 pools); rows
            row0 + slot * Nc .. + Nc - 1 are written.
        mean_key: float32 [B, n_blocks, H, D]; entry ``slot`` receives the mean pooled pre-RoPE key (float32,
            computed before any quantization: the same with FP8 pools).
        block_slot, t0: int32/int64 [1] archive slot and first-frame position (device tensors: no host sync).
        row0: first pool row of the compressed region. frames, height, width: the block's token grid (>= 2x4x4).
        backend: "auto", "reference", "triton" or "cuda".
        k_pool_scale, v_pool_scale: float32 [B, n_rows, H] scales of FP8 pools (ops/fp8.py), written in place with
            their rows: each written row and head is quantized from its float32 value (the rotated pooled key, the
            pooled value), never rounded to the compute dtype first. None for pools in the compute dtype.

    Returns:
        None (the pools, their scales and mean_key are written in place).

    Example:
        >>> k, v = torch.randn(1, 4 * 64, 2, 16), torch.randn(1, 4 * 64, 2, 16)  # a block of 4 frames of 8 x 8 tokens
        >>> pool, mean_key = torch.zeros(1, 64, 2, 16), torch.zeros(1, 4, 2, 16)  # Nc = 2 * 2 * 2 = 8 rows a block
        >>> compress_kv(k, v, pool, pool.clone(), mean_key, torch.tensor([1]), torch.tensor([12]), 32, 4, 8, 8)
    """
    _check(k, v, k_pool, v_pool, mean_key, block_slot, t0, row0, frames, height, width, k_pool_scale, v_pool_scale)
    torch.ops.relaxkv.compress_kv(k, v, k_pool, v_pool, mean_key, block_slot, t0, row0, frames, height, width, backend,
                                  k_pool_scale, v_pool_scale, checked=True)
