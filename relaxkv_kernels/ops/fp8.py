"""FP8 K/V pools: the quantization every backend implements, its pure-PyTorch reference, and the pool checks.

A pool in ``float8_e4m3fn`` stores each row's K (or V) per head as 8-bit codes with one fp32 scale per
(batch, row, head): ``x ~= code * scale``. The scale of a row and head is the smallest power of two with
``amax / scale <= 448`` (e4m3's largest finite value), where ``amax`` is the row's largest magnitude over
the head dim. A power of two makes quantizing (``x / scale``) and dequantizing (``code * scale``) exact
fp32 operations, so the only rounding is e4m3's own (round to nearest even, 3 mantissa bits: relative
error at most 2^-4 for normal codes): every backend writes bit-identical codes. Compared with the
tightest scale ``amax / 448`` it keeps e4m3's relative precision and gives up less than one binade of
range at the small end (docs/pages/guides/fp8-pools.md measures both).

Scales are computed from bits, as the kernels do: ``amax = f * 2^E`` with ``f`` in [1, 2);
``scale = 2^(E - 8)`` when ``f <= 1.75`` (448 = 1.75 * 2^8), else ``2^(E - 7)``; the exponent is clamped to
[-126, 127] (a zero row gets ``2^-126`` and codes 0). NaN inputs give the NaN code.

A finite input stays finite: a row in the top binade of its compute dtype would round up past that dtype's largest
finite value (65000 in fp16: 253.9 * 2^8 rounds to 256 * 2^8 = 65536, inf in fp16; 3.3e38 in fp32 to 2^128), so
``x / scale`` is first clamped to the largest e4m3 value whose product with the scale is finite in the compute dtype
(:func:`fp8_limit`; 448 for every row below that binade). Such a value loses at most one e4m3 step (2^-4 relative),
as any rounding does.
"""
from __future__ import annotations

import torch

from .checks import check_tensor

FP8_DTYPES = (torch.float8_e4m3fn,)
FP8_MAX = 448.0
_MANT_1_75 = 0x600000  # fp32 mantissa bits of 1.75


def is_fp8(t: torch.Tensor) -> bool:
    return t.dtype in FP8_DTYPES


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """The power-of-two fp32 scale of rows whose largest magnitude is ``amax`` (fp32, any shape)."""
    bits = amax.float().contiguous().view(torch.int32)
    exp = ((bits >> 23) & 0xFF) - 127 - 8 + ((bits & 0x7FFFFF) > _MANT_1_75).int()
    return ((exp.clamp(-126, 127) + 127) << 23).view(torch.float32)


def fp8_room(dtype: torch.dtype) -> float:
    """``dtype``'s largest finite value rounded down to 3 mantissa bits (an e4m3 mantissa), as an fp32 number (inf for
    float64): 61440 for fp16, 1.875 * 2^127 for bf16 and fp32. The Triton kernels take it as a constant, the CUDA
    kernels have it as ``finite_max_e4m3<T>`` (csrc/common.cuh)."""
    top = torch.tensor(torch.finfo(dtype).max, dtype=torch.float32)  # inf for float64
    return float((top.view(torch.int32) & ~0xFFFFF).view(torch.float32))


def fp8_limit(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The largest e4m3 value ``y`` (at most 448) with ``y * scale`` finite in ``dtype``: ``fp8_room(dtype) / scale``
    (exact: the scales are powers of two; inf past fp32), as the kernels compute it (fp32 scales, any shape)."""
    return (fp8_room(dtype) / scale.double()).float().clamp(max=FP8_MAX)


def quantize_fp8(x: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and scales of ``x`` [..., D] (any float dtype), one scale per row of D; every finite value dequantizes
    to a finite value of ``dtype``, the compute dtype the rows came from (default: ``x``'s own).

    Returns:
        (codes float8_e4m3fn [..., D], scale float32 [...]) with ``codes.float() * scale[..., None] ~= x``.
    """
    limit_dtype = dtype or x.dtype
    x = x.float()
    scale = fp8_scale(x.abs().amax(-1))
    y, lim = x / scale.unsqueeze(-1), fp8_limit(scale, limit_dtype).unsqueeze(-1)
    y = torch.where(y.abs() > lim, lim.copysign(y), y)  # NaN compares false: kept
    return y.to(torch.float8_e4m3fn), scale


def dequantize_fp8(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 ``codes * scale`` (codes [..., D], scale [...])."""
    return codes.float() * scale.unsqueeze(-1)


def pool_values(pool: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """A pool's rows as numbers: dequantized (fp32) for an FP8 pool, the pool itself otherwise."""
    return pool if scale is None else dequantize_fp8(pool, scale)


def write_rows(pool: torch.Tensor, scale: torch.Tensor | None, dim: int, rows: torch.Tensor,
               x: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """``pool.index_copy_(dim, rows, x)`` in the pool's format: quantized into the codes and ``scale`` of an FP8
    pool (the scale is indexed like the pool without its last dim; ``dtype``: the compute dtype whose finite range
    the codes keep, see :func:`quantize_fp8`), cast otherwise."""
    if scale is None:
        pool.index_copy_(dim, rows, x.to(pool.dtype))
        return
    codes, s = quantize_fp8(x, dtype)
    pool.view(torch.uint8).index_copy_(dim, rows, codes.view(torch.uint8))  # torch has no fp8 index_copy_
    scale.index_copy_(dim, rows, s)


def check_pool_format(op: str, name: str, pool: torch.Tensor, scale, like: torch.Tensor) -> None:
    """``pool`` [B, n_rows, H, D] holds rows of ``like`` ([B, *, H, D], the compute dtype): in ``like``'s dtype with
    ``scale`` None, or FP8 with ``scale`` fp32 [B, n_rows, H] on its device (``<name>_scale``)."""
    b, _, h, d = like.shape
    check_tensor(op, name, pool, shape=(b, None, h, d), dtypes=(like.dtype, *FP8_DTYPES))
    scale_name = f"{name}_scale"
    if not is_fp8(pool):
        if scale is not None:
            raise ValueError(f"{op}: {scale_name}: expected None for a {pool.dtype} {name} (scales belong to FP8 "
                             f"pools), got a tensor")
        return
    if scale is None:
        raise ValueError(f"{op}: {scale_name}: expected the float32 [B, n_rows, H] scales of the {pool.dtype} {name}, "
                         "got None")
    check_tensor(op, scale_name, scale, shape=tuple(pool.shape[:3]), dtypes=(torch.float32,), device=pool.device)


def check_kv_pools(op: str, name: str, k_pool: torch.Tensor, v_pool: torch.Tensor, k_scale, v_scale,
                   like: torch.Tensor) -> None:
    """An op's ``k_<name>`` and ``v_<name>`` pools: each through :func:`check_pool_format` against ``like``, and one
    format for both (``v_<name>`` has ``k_<name>``'s shape and dtype)."""
    check_pool_format(op, f"k_{name}", k_pool, k_scale, like)
    check_tensor(op, f"v_{name}", v_pool, shape=tuple(k_pool.shape), dtypes=(k_pool.dtype,))
    check_pool_format(op, f"v_{name}", v_pool, v_scale, like)


def scale_strides(scale: torch.Tensor | None) -> tuple[int, ...]:
    """The B, N, H strides of an FP8 pool's scales [B, n_rows, H] as the kernels take them; zeros for a pool without
    scales (the kernels' FP8 path is off, and the strides unused)."""
    return (0, 0, 0) if scale is None else scale.stride()

