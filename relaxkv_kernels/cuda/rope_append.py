"""rope_append through the CUDA extension (kernel: csrc/rope_append.cuh, launcher: csrc/rope_append.cu)."""
from __future__ import annotations

import functools

import torch

from ._launch import (DTYPE_CODES, check, check_cuda_tensors, check_index, check_written, device_guard, require_device,
                      stream, unit_last_stride)

_OP = "rope_append_cuda"
_check = functools.partial(check, _OP)


def rope_append_cuda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    proto: torch.Tensor,
    frame_slot: torch.Tensor,
    frame_pos: torch.Tensor,
    height: int,
    width: int,
) -> torch.Tensor:
    r"""Rotate a chunk's queries, and write its keys, values and frame prototypes into the cache.

    One launch (plus a tiny kernel zeroing the written proto rows) on the current stream. With
    F = height * width tokens per frame, token n = u * F + y * width + x of chunk frame u:

        q_rot[b, n]                    = rope(q[b, n])  at (frame_pos[u], y, x)
        k_cache[b, frame_slot[u]*F + i] = rope(k[b, u*F + i]) at the same positions
        v_cache[b, frame_slot[u]*F + i] = v[b, u*F + i]
        proto[b, frame_slot[u]]         = mean_{i < F, h < H} k[b, u*F + i, h]   (pre-RoPE, fp32,
                                                                              not normalised)

    rope is Wan's 3D RoPE (relaxkv_kernels/reference/rope.py): inverse frequencies built in float64
    on the host and rounded to float32, angle = position * inv_freq in float32, sincosf, rotation in
    float32, one rounding to the storage dtype. proto is accumulated with fp32 atomics (summation
    order varies: ~1e-7 relative run-to-run noise).

    Args:
        q, k, v: [B, U*F, H, D], float16 / bfloat16 / float32, any strides.
        k_cache, v_cache: [B, n_rows, H, D], dtype of k, stride(-1) == 1; slot s is rows
            s*F .. s*F+F-1, so n_rows >= n_slots * F. Written in place.
        proto: [B, n_slots, D] float32, stride(-1) == 1. Rows frame_slot[u] written in place.
        frame_slot: int32/int64 [U], cache slot of each chunk frame, distinct, in [0, n_slots). Not checked
            on the host (that would synchronise); the kernel skips the cache and proto writes of an
            out-of-range slot rather than write out of bounds.
        frame_pos: int32/int64 [U], temporal RoPE position of each chunk frame.
        height, width: token grid of one frame.

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
    ext = require_device(_OP)

    _check(q.dim() == 4, f"q: expected [B, U*F, H, D], got shape {tuple(q.shape)}")
    B, N, H, D = q.shape
    U, F = frame_slot.numel(), height * width
    _check(height >= 1 and width >= 1, f"height, width: expected >= 1, got {height}, {width}")
    _check(k.shape == q.shape and v.shape == q.shape,
           f"k, v: expected the shape of q {tuple(q.shape)}, got {tuple(k.shape)}, {tuple(v.shape)}")
    _check(N == U * F, f"q: expected U * F = {U} * {F} = {U * F} tokens (U = frame_slot.numel()), got {N}")
    frame_slot, frame_pos = check_index(_OP, "frame_slot", frame_slot, U), check_index(_OP, "frame_pos", frame_pos, U)
    _check(q.dtype in DTYPE_CODES, f"q: expected float16, bfloat16 or float32, got {q.dtype}")
    _check(all(t.dtype == q.dtype for t in (k, v, k_cache, v_cache)),
           f"k, v, k_cache, v_cache: expected dtype {q.dtype}, got "
           f"{k.dtype}, {v.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    _check(k_cache.dim() == 4 and k_cache.shape[0] == B and k_cache.shape[2:] == (H, D),
           f"k_cache: expected [{B}, n_rows, {H}, {D}], got {tuple(k_cache.shape)}")
    _check(v_cache.shape == k_cache.shape,
           f"v_cache: expected the shape of k_cache {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    _check(proto.dim() == 3 and proto.shape[0] == B and proto.shape[2] == D and proto.dtype == torch.float32,
           f"proto: expected float32 [{B}, n_slots, {D}], got {proto.dtype} {tuple(proto.shape)}")
    _check(proto.shape[1] * F <= k_cache.shape[1],
           f"k_cache: expected n_rows >= n_slots * F = {proto.shape[1] * F}, got {k_cache.shape[1]}")
    _check(D % 2 == 0 and 2 <= D <= 512, f"head_dim: expected an even number in [2, 512], got {D}")
    tensors = {"q": q, "k": k, "v": v, "k_cache": k_cache, "v_cache": v_cache, "proto": proto,
               "frame_slot": frame_slot, "frame_pos": frame_pos}
    check_cuda_tensors(_OP, q.device, **tensors)
    check_written(_OP, k_cache=k_cache, v_cache=v_cache, proto=proto)
    q, k, v = unit_last_stride(q), unit_last_stride(k), unit_last_stride(v)

    q_rot = torch.empty((B, N, H, D), dtype=q.dtype, device=q.device)
    with device_guard(q.device):
        ext.rope_append_cuda(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), q_rot.data_ptr(), k_cache.data_ptr(),
            v_cache.data_ptr(), proto.data_ptr(), frame_slot.data_ptr(), frame_pos.data_ptr(),
            B, U, height, width, H, D, k_cache.shape[1], proto.shape[1],
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *q_rot.stride()[:3],
            *k_cache.stride()[:3], *v_cache.stride()[:3], *proto.stride()[:2],
            frame_slot.stride(0), frame_pos.stride(0),
            DTYPE_CODES[q.dtype], stream(q.device),
        )
    return q_rot
