"""compress_kv through the CUDA extension (kernels: csrc/compress_kv.cuh, launcher: csrc/compress_kv.cu)."""
from __future__ import annotations

import math

import torch

from ...geometry import compressed_grid
from ..cuda_common import Launch
from ..cuda_common import check_written
from ..cuda_common import index
from ..cuda_common import rows
from ..cuda_common import scales
from ..cuda_common import unit_last_stride

_OP = "compress_kv_cuda"


def compress_kv_cuda(k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                     mean_key: torch.Tensor, block_slot: torch.Tensor, t0: torch.Tensor, row0: int, frames: int,
                     height: int, width: int, k_pool_scale: torch.Tensor | None = None,
                     v_pool_scale: torch.Tensor | None = None) -> None:
    """Contract: :func:`relaxkv_kernels.ops.compress_kv` (two launches, no host sync).

    Wan RoPE as in rope_append (temporal angles in fp64 reduced to [-pi, pi], the others in fp32, sincosf); mean_key
    summed in a fixed order (deterministic, no atomics). k, v: any strides; pools: stride(-1) == 1; scales: any strides
    (a null pointer to the launcher: pools in the compute dtype). block_slot out of [0, n_blocks): nothing is written.

    Example:
        >>> k = torch.randn(1, 4 * 1560, 12, 128, device="cuda", dtype=torch.bfloat16)  # doctest: +SKIP
        >>> pool = torch.empty(1, 30000, 12, 128, device="cuda", dtype=torch.bfloat16)
        >>> mk = torch.empty(1, 8, 12, 128, device="cuda")
        >>> one = lambda x: torch.tensor([x], device="cuda")
        >>> compress_kv_cuda(k, k, pool, pool.clone(), mk, one(3), one(40), 24960, 4, 30, 52)
    """
    b, n, h, d = k.shape
    check_written(_OP, k_pool=k_pool, v_pool=v_pool)
    k, v = unit_last_stride(k), unit_last_stride(v)
    block_slot, t0 = index(block_slot), index(t0)
    nc = math.prod(compressed_grid(frames, height, width))
    ws = torch.empty((b, nc, h, d), dtype=torch.float32, device=k.device)
    launch = Launch(_OP, k.device)
    with launch as (ext, stream):
        ext.compress_kv_cuda(
            *rows(k), *rows(v), *rows(k_pool), *rows(v_pool), *scales(k_pool_scale), *scales(v_pool_scale),
            mean_key.data_ptr(), mean_key.stride(), ws.data_ptr(),
            block_slot.data_ptr(), t0.data_ptr(), b, frames, height, width, h, d, k_pool.shape[1], row0,
            mean_key.shape[1], launch.code(k.dtype), stream,
        )
