"""compress_kv through the CUDA extension (kernels: csrc/compress_kv.cuh, launcher: csrc/compress_kv.cu)."""
from __future__ import annotations

import torch

from ._launch import (DTYPE_CODES, check, check_cuda_tensors, check_index, check_written, device_guard, require_device,
                      stream, unit_last_stride)

_OP = "compress_kv_cuda"


def compress_kv_cuda(
    k: torch.Tensor,
    v: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    mean_key: torch.Tensor,
    block_slot: torch.Tensor,
    t0: torch.Tensor,
    row0: int,
    frames: int,
    height: int,
    width: int,
) -> None:
    r"""PackForcing compression of one block into the compressed pool rows: two launches, no host sync.

    For compressed token c = (tc, yc, xc) of the (frames // 2, height // 4, width // 4) grid, with
    pk, pv the fp32 means of k, v over its 2x4x4 window and slot = block_slot[0]:

        k_pool[b, row0 + slot * Nc + c] = rope(pk) at (t0 + 2 tc + 0.5, 4 yc + 1.5, 4 xc + 1.5)
        v_pool[b, row0 + slot * Nc + c] = pv
        mean_key[b, slot]               = mean_c pk        (fp32, pre-RoPE; deterministic, no atomics)

    Wan RoPE as in rope_append (fp64 inverse-frequency table rounded to fp32, fp32 angles, sincosf).

    Args:
        k, v: [B, frames * height * width, H, D] pre-RoPE block keys / values, any strides.
        k_pool, v_pool: [B, n_rows, H, D] (dtype of k), stride(-1) == 1, written in place.
        mean_key: float32 [B, n_blocks, H, D], written in place.
        block_slot, t0: int [1] device tensors: archive slot (in [0, n_blocks); out of range: nothing
            is written) and the block's first-frame position, read by the kernel.
        row0: first compressed pool row. frames, height, width: the block's token grid (>= 2x4x4).

    Example:
        >>> k = torch.randn(1, 4 * 1560, 12, 128, device="cuda", dtype=torch.bfloat16)  # doctest: +SKIP
        >>> pool = torch.empty(1, 30000, 12, 128, device="cuda", dtype=torch.bfloat16)
        >>> mk = torch.empty(1, 8, 12, 128, device="cuda")
        >>> one = lambda x: torch.tensor([x], device="cuda")
        >>> compress_kv_cuda(k, k, pool, pool.clone(), mk, one(3), one(40), 24960, 4, 30, 52)
    """
    ext = require_device(_OP)
    check(_OP, k.dim() == 4 and k.dtype in DTYPE_CODES, f"k: expected float [B, N, H, D], got {k.dtype} {tuple(k.shape)}")
    b, n, h, d = k.shape
    dev = k.device
    check_cuda_tensors(_OP, dev, k=k, v=v, k_pool=k_pool, v_pool=v_pool, mean_key=mean_key, block_slot=block_slot, t0=t0)
    check(_OP, n == frames * height * width, f"k: expected {frames}*{height}*{width} = {frames * height * width} tokens, got {n}")
    check(_OP, v.shape == k.shape and v.dtype == k.dtype, f"v: expected {k.dtype} {tuple(k.shape)}, got {v.dtype} {tuple(v.shape)}")
    check(_OP, k_pool.dim() == 4 and k_pool.shape[0] == b and k_pool.shape[2:] == (h, d) and k_pool.dtype == k.dtype,
          f"k_pool: expected {k.dtype} [{b}, n_rows, {h}, {d}], got {k_pool.dtype} {tuple(k_pool.shape)}")
    check(_OP, v_pool.shape == k_pool.shape and v_pool.dtype == k.dtype,
          f"v_pool: expected {k.dtype} {tuple(k_pool.shape)}, got {v_pool.dtype} {tuple(v_pool.shape)}")
    check(_OP, mean_key.dim() == 4 and mean_key.shape[0] == b and mean_key.shape[2:] == (h, d)
          and mean_key.dtype == torch.float32,
          f"mean_key: expected float32 [{b}, n_blocks, {h}, {d}], got {mean_key.dtype} {tuple(mean_key.shape)}")
    check_written(_OP, k_pool=k_pool, v_pool=v_pool)
    k, v = unit_last_stride(k), unit_last_stride(v)
    block_slot, t0 = check_index(_OP, "block_slot", block_slot, 1), check_index(_OP, "t0", t0, 1)
    nc = (frames // 2) * (height // 4) * (width // 4)
    ws = torch.empty((b, nc, h, d), dtype=torch.float32, device=dev)
    with device_guard(dev):
        ext.compress_kv_cuda(
            k.data_ptr(), v.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), mean_key.data_ptr(), ws.data_ptr(),
            block_slot.data_ptr(), t0.data_ptr(), b, frames, height, width, h, d, k_pool.shape[1], row0,
            mean_key.shape[1], *k.stride()[:3], *v.stride()[:3], *k_pool.stride()[:3], *v_pool.stride()[:3],
            *mean_key.stride(), DTYPE_CODES[k.dtype], stream(dev),
        )
