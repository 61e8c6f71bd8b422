"""rope_append through the CUDA extension (kernel: csrc/rope_append.cuh, launcher: csrc/rope_append.cu)."""
from __future__ import annotations

import torch

from ..cuda_common import Launch
from ..cuda_common import check_written
from ..cuda_common import index
from ..cuda_common import rows
from ..cuda_common import scales
from ..cuda_common import unit_last_stride
from ..fp8 import is_fp8

_OP = "rope_append_cuda"


def rope_append_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, proto: torch.Tensor | None, frame_slot: torch.Tensor,
                     frame_pos: torch.Tensor, height: int, width: int, k_cache_scale: torch.Tensor | None = None,
                     v_cache_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Contract: :func:`relaxkv_kernels.ops.rope_append`.

    One launch on the current stream (plus a tiny one summing the prototypes when ``proto`` is given). Inverse
    frequencies built in float64 on the host; temporal angles in float64 reduced to [-pi, pi], the others in float32
    with the table rounded to float32; sincosf, rotation in float32, one rounding to the storage dtype. proto is summed
    in fp32 in a fixed order (per thread over heads, per block over its tokens, then over the blocks of the frame):
    deterministic, no atomics. FP8 caches (rope_append_fp8_kernel; the launcher reads a null scale pointer as "not
    FP8"): each written row and head's amax over D is reduced across the lanes of the token before its codes are
    written. q, k, v: any strides; caches and proto: stride(-1) == 1; scales: any strides. frame_slot is not checked on
    the device: the kernel skips the cache and proto writes of an out-of-range slot rather than write out of bounds.
    Returns q_rot contiguous.

    Example:
        >>> B, U, h, w, H, D = 1, 3, 30, 52, 12, 128  # doctest: +SKIP
        >>> q, k, v = (torch.randn(B, U * h * w, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        >>> k_cache = torch.empty(B, 8 * h * w, H, D, device="cuda", dtype=torch.bfloat16)
        >>> v_cache, proto = torch.empty_like(k_cache), torch.empty(B, 8, D, device="cuda")
        >>> slot = torch.tensor([5, 6, 7], device="cuda"); pos = torch.tensor([5, 6, 7], device="cuda")
        >>> q_rot = rope_append_cuda(q, k, v, k_cache, v_cache, proto, slot, pos, h, w)
    """
    b, n, h, d = q.shape
    f, u = height * width, frame_slot.numel()
    check_written(_OP, k_cache=k_cache, v_cache=v_cache, **({} if proto is None else {"proto": proto}))
    q, k, v = unit_last_stride(q), unit_last_stride(k), unit_last_stride(v)
    frame_slot, frame_pos = index(frame_slot), index(frame_pos)
    n_slots = k_cache.shape[1] // f if proto is None else min(proto.shape[1], k_cache.shape[1] // f)  # written slots
    q_rot = torch.empty((b, n, h, d), dtype=q.dtype, device=q.device)
    launch = Launch(_OP, q.device)
    fp8 = is_fp8(k_cache)
    ws = None if proto is None else torch.empty(b * u * launch.ext.rope_append_tiles(f, d, fp8) * d,
                                                dtype=torch.float32, device=q.device)  # per-tile sums of the keys
    with launch as (ext, stream):
        ext.rope_append_cuda(
            *rows(q), *rows(k), *rows(v), *rows(q_rot), *rows(k_cache), *rows(v_cache),
            *scales(k_cache_scale), *scales(v_cache_scale),
            0 if proto is None else proto.data_ptr(), *((0, 0) if proto is None else proto.stride()[:2]),
            0 if ws is None else ws.data_ptr(), frame_slot.data_ptr(), frame_pos.data_ptr(),
            b, u, height, width, h, d, k_cache.shape[1], n_slots, launch.code(q.dtype), stream,
        )
    return q_rot
