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
    r"""Rotate a chunk's queries, and write its keys, values and frame prototypes into the cache.

    One launch on the current stream (plus a tiny one summing the prototypes when ``proto`` is given). With
    F = height * width tokens per frame, token n = u * F + y * width + x of chunk frame u:

        q_rot[b, n]                    = rope(q[b, n])  at (frame_pos[u], y, x)
        k_cache[b, frame_slot[u]*F + i] = rope(k[b, u*F + i]) at the same positions
        v_cache[b, frame_slot[u]*F + i] = v[b, u*F + i]
        proto[b, frame_slot[u]]         = mean_{i < F, h < H} k[b, u*F + i, h]   (pre-RoPE, fp32,
                                                                              not normalised)

    rope is Wan's 3D RoPE (relaxkv_kernels/geometry.py): inverse frequencies built in float64
    on the host, angle = position * inv_freq (temporal pairs in float64 reduced to [-pi, pi]; the others with
    the table rounded to float32, in float32), sincosf, rotation in
    float32, one rounding to the storage dtype. proto is summed in fp32 in a fixed order (per thread over
    heads, per block over its tokens, then over the blocks of the frame): deterministic, no atomics.
    FP8 caches (rope_append_fp8_kernel; the launcher reads a null scale pointer as "not FP8"): each written
    (row, head) is quantized from its fp32 value (ops/fp8.py), K from the fp32 rotation, V from v: its amax
    over D reduced across the lanes of the token before the codes are written.

    Args:
        q, k, v: [B, U*F, H, D], float16 / bfloat16 / float32, any strides.
        k_cache, v_cache: [B, n_rows, H, D], dtype of k or both float8_e4m3fn, stride(-1) == 1; slot s is
            rows s*F .. s*F+F-1, so n_rows >= n_slots * F. Written in place.
        proto: [B, n_slots, D] float32, stride(-1) == 1. Rows frame_slot[u] written in place. None: no
            prototypes (the kernel skips the sums).
        frame_slot: int32/int64 [U], cache slot of each chunk frame, distinct, in [0, n_slots). Not checked
            on the host (that would synchronise); the kernel skips the cache and proto writes of an
            out-of-range slot rather than write out of bounds.
        frame_pos: int32/int64 [U], temporal RoPE position of each chunk frame.
        height, width: token grid of one frame.
        k_cache_scale, v_cache_scale: float32 [B, n_rows, H] (any strides) scales of FP8 caches, written in place
            with their rows; None for caches in k's dtype.

    Returns:
        q_rot: [B, U*F, H, D] contiguous, dtype of q.

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
