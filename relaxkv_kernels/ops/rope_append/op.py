"""``relaxkv::rope_append``: registration, fake, backend table, the argument checks and the public function.

``torch.ops.relaxkv.*`` takes the public arguments in order, then ``checked`` (see ``ops/checks.py``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..checks import check_devices
from ..checks import check_index
from ..checks import check_int
from ..checks import check_qkv
from ..checks import check_tensor
from ..checks import checks_in_fake
from ..dispatch import OpBackends
from ..fp8 import check_kv_pools
from .cuda import rope_append_cuda
from .reference import rope_append_ref


def _triton():
    from .triton import rope_append_triton

    return rope_append_triton


BACKENDS = OpBackends("rope_append", reference=rope_append_ref, triton=_triton, cuda=rope_append_cuda)


def _check(q, k, v, k_cache, v_cache, proto, frame_slot, frame_pos, height, width, k_cache_scale=None,
           v_cache_scale=None) -> None:
    """The checks of :func:`rope_append` (public function and registered op)."""
    op = "relaxkv.rope_append"
    protos = {} if proto is None else {"proto": proto}
    check_devices(op, q=q, k=k, v=v, k_cache=k_cache, v_cache=v_cache, **protos, frame_slot=frame_slot,
                  frame_pos=frame_pos)
    check_qkv(op, "q", q)
    check_int(op, "height", height, low=1)
    check_int(op, "width", width, low=1)
    check_index(op, "frame_slot", frame_slot)
    f, u = height * width, frame_slot.numel()
    if q.shape[1] != u * f:
        raise ValueError(f"{op}: q: expected U * height * width = {u} * {height} * {width} = {u * f} tokens "
                         f"(U = frame_slot entries), got {q.shape[1]}")
    check_tensor(op, "k", k, shape=tuple(q.shape), dtypes=(q.dtype,))
    check_tensor(op, "v", v, shape=tuple(q.shape), dtypes=(q.dtype,))
    check_kv_pools(op, "cache", k_cache, v_cache, k_cache_scale, v_cache_scale, k)
    n_slots = k_cache.shape[1] // f
    if proto is not None:
        check_tensor(op, "proto", proto, shape=(q.shape[0], None, q.shape[-1]), dtypes=(torch.float32,))
        n_slots = min(n_slots, proto.shape[1])
    if n_slots < 1:
        protos = "" if proto is None else f" and {proto.shape[1]} prototype slots"
        raise ValueError(f"{op}: k_cache, proto: expected room for at least one frame slot of {f} rows, got "
                         f"{k_cache.shape[1]} rows{protos}")
    check_index(op, "frame_slot", frame_slot, u, 0, n_slots - 1, distinct=True)
    check_index(op, "frame_pos", frame_pos, u)


@torch.library.custom_op("relaxkv::rope_append",
                         mutates_args=("k_cache", "v_cache", "proto", "k_cache_scale", "v_cache_scale"))
def rope_append_op(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, proto: Optional[Tensor],
                   frame_slot: Tensor, frame_pos: Tensor, height: int, width: int, backend: str,
                   k_cache_scale: Optional[Tensor] = None, v_cache_scale: Optional[Tensor] = None,
                   checked: bool = False) -> Tensor:
    return BACKENDS.run(q.device, backend, checked, _check, q, k, v, k_cache, v_cache, proto, frame_slot, frame_pos,
                        height, width, k_cache_scale, v_cache_scale)


@rope_append_op.register_fake
def rope_append_fake(q, k, v, k_cache, v_cache, proto, frame_slot, frame_pos, height, width, backend,
                     k_cache_scale=None, v_cache_scale=None, checked=False):
    if checks_in_fake(checked, q):
        _check(q, k, v, k_cache, v_cache, proto, frame_slot, frame_pos, height, width, k_cache_scale, v_cache_scale)
    return q.new_empty(q.shape)


def rope_append(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, proto: Tensor | None,
                frame_slot: Tensor, frame_pos: Tensor, height: int, width: int, backend: str = "auto",
                k_cache_scale: Tensor | None = None, v_cache_scale: Tensor | None = None) -> Tensor:
    """Rotate a chunk's Q and K with Wan 3D RoPE and append K (rotated), V and prototypes to the cache.

    Token i of chunk frame u (y = i // width, x = i % width) is rotated at (frame_pos[u], y, x);
    ``k_cache[:, frame_slot[u] * F + i]`` receives the rotated key, ``v_cache`` the value and
    ``proto[:, frame_slot[u]]`` the frame's mean pre-RoPE key (over tokens, then heads; fp32, not normalised).

    Args:
        q, k, v: [B, U * F, H, D] after q/k norm, before RoPE (F = height * width).
        k_cache, v_cache: [B, n_rows, H, D], both in k's dtype or both float8_e4m3fn; frame slot s owns rows
            s*F .. s*F+F-1.
        proto: float32 [B, n_slots, D], receives each frame's mean pre-RoPE key (not normalised); None:
            no prototypes (only policies that score frames need them, and only at one layer).
        frame_slot: int32/int64 [U] slot per chunk frame, distinct; frame_pos: int32/int64 [U] temporal position per
            frame.
        backend: "auto", "reference", "triton" or "cuda".
        k_cache_scale, v_cache_scale: float32 [B, n_rows, H], the per-row-and-head scales of FP8 caches (None for
            caches in k's dtype), written in place with the rows: each written row and head is quantized from its
            fp32 value (``ops/fp8.py``), K from the fp32 rotation (never rounded to k's dtype first), V from v.

    Returns:
        Q rotated at (frame_pos[u], y, x), [B, U * F, H, D], dtype of q (the same whatever the cache format).
        The caches, their scales and proto are written in place.

    Example:
        >>> q = rope_append(q, k, v, kc, vc, proto, torch.tensor([4, 5, 6]), torch.tensor([9, 10, 11]), 30, 52)
    """
    _check(q, k, v, k_cache, v_cache, proto, frame_slot, frame_pos, height, width, k_cache_scale, v_cache_scale)
    return torch.ops.relaxkv.rope_append(q, k, v, k_cache, v_cache, proto, frame_slot, frame_pos, height, width,
                                         backend, k_cache_scale, v_cache_scale, checked=True)

