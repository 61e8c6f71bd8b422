"""FP8 pools (relaxkv_kernels/ops/fp8.py): the power-of-two scales and e4m3 codes every backend writes.

The reference against its literal definition (smallest power of two with amax / scale <= 448, torch's
round-to-nearest-even cast, e4m3's 2^-4 relative error); the Triton building blocks, run in a tiny kernel
under the interpreter, against the reference bit for bit, on every e4m3 value, every rounding tie and
rows of magnitudes from 2^-140 to 2^100; the software decode of GPUs without FP8 units against torch's conversion
on all 256 codes; the pool-format check's named errors.
"""
import math

import pytest
import torch
import triton
import triton.language as tl

from relaxkv_kernels.ops.fp8 import FP8_MAX
from relaxkv_kernels.ops.fp8 import check_pool_format
from relaxkv_kernels.ops.fp8 import dequantize_fp8
from relaxkv_kernels.ops.fp8 import fp8_room
from relaxkv_kernels.ops.fp8 import fp8_scale
from relaxkv_kernels.ops.fp8 import quantize_fp8
from relaxkv_kernels.ops.triton_common import _fp8_encode
from relaxkv_kernels.ops.triton_common import _fp8_limit
from relaxkv_kernels.ops.triton_common import _fp8_scale
from relaxkv_kernels.ops.triton_common import _fp8_values

from helpers import DEVICE
from helpers import FP8
from helpers import gen
from helpers import need_triton


def _rows(g: torch.Generator) -> torch.Tensor:
    """[R, 16] rows: random ones over 2^-140 .. 2^100, every e4m3 value, midpoints between neighbours, zeros."""
    r = torch.randn(256, 16, generator=g) * torch.exp2(torch.randint(-140, 100, (256, 1), generator=g).float())
    values = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    values = values[values.isfinite()]
    mids = (values.sort().values[1:] + values.sort().values[:-1]) / 2  # ties: round to the even code
    exact = torch.cat([values, mids, torch.zeros(16 - (values.numel() + mids.numel()) % 16)]).view(-1, 16)
    return torch.cat([r, exact, torch.zeros(2, 16)])


def test_scale_is_the_smallest_power_of_two_that_fits():
    g = gen(0)
    amax = torch.cat([torch.rand(4096, generator=g) * torch.exp2(torch.randint(-100, 120, (4096,), generator=g)),
                      torch.tensor([448.0, 448.0 * (1 + 2**-23), 1.75, 1.75 * (1 + 2**-23), 1.0, 2.0**-20])])
    scale = fp8_scale(amax)
    k = torch.log2(scale)
    assert torch.equal(k, k.round()), "scales must be powers of two"
    assert bool((amax / scale <= FP8_MAX).all())
    assert bool((amax / (scale / 2) > FP8_MAX).all()), "a smaller power of two would have fitted"
    assert fp8_scale(torch.zeros(1)).item() == 2.0**-126  # a zero row: codes 0, any scale


def test_quantize_is_torch_rounding_within_e4m3_error():
    x = _rows(gen(1))
    codes, scale = quantize_fp8(x)
    assert codes.dtype == FP8 and scale.dtype == torch.float32 and scale.shape == x.shape[:-1]
    assert torch.equal(codes.view(torch.uint8), (x / scale[:, None]).to(FP8).view(torch.uint8))
    back = dequantize_fp8(codes, scale)
    normal = (x / scale[:, None]).abs() >= 2.0**-6
    err = (back - x).abs()
    assert bool((err[normal] <= 2.0**-4 * x.abs()[normal]).all()), "e4m3 normal codes: relative error <= 2^-4"
    assert bool((err[~normal] <= 2.0**-10 * scale[:, None].expand_as(x)[~normal]).all()), "subnormal: half a step"
    # exact e4m3 values in a row whose amax is 448 are kept exactly
    exact = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    exact = exact[exact.isfinite()].view(-1, 2)
    exact[:, 0] = FP8_MAX
    assert torch.equal(dequantize_fp8(*quantize_fp8(exact)), exact)


def test_quantize_keeps_nan():
    x = torch.ones(2, 8)
    x[0, 3] = float("nan")
    codes, scale = quantize_fp8(x)
    assert dequantize_fp8(codes, scale)[0, 3].isnan()


TOP = {torch.float16: 65000.0, torch.bfloat16: 3.3e38, torch.float32: 3.3e38}  # in each dtype's top binade


def _top_rows(dtype: torch.dtype) -> torch.Tensor:
    """Rows of ``dtype`` whose amax lies in its top binade (where rounding up would pass its largest finite
    value), signs and smaller values mixed in, and rows of ordinary values (16 dims)."""
    g = gen(4)
    top = TOP[dtype] * torch.tensor([1.0, -1.0, 0.99, -0.97]).repeat(4, 1)
    rows = torch.cat([top, torch.randn(4, 12, generator=g) * TOP[dtype] / 8], dim=1)
    return torch.cat([rows, torch.randn(4, 16, generator=g)]).to(dtype)


@pytest.mark.parametrize("dtype", list(TOP), ids=str)
def test_a_finite_row_stays_finite_in_its_compute_dtype(dtype):
    """65000 in fp16 (3.3e38 in fp32 and bf16) no longer rounds up to inf: the codes saturate one e4m3 step below,
    within e4m3's rounding bound (2^-4 relative) of the input; rows below the top binade get the unclamped codes."""
    x = _top_rows(dtype)
    codes, scale = quantize_fp8(x)
    back = dequantize_fp8(codes, scale)
    assert bool(back.isfinite().all()) and bool(back.to(dtype).isfinite().all())
    big = x.float().abs() >= TOP[dtype] / 2
    assert bool(((back - x.float()).abs()[big] <= 2.0**-4 * x.float().abs()[big]).all())
    plain = (x.float()[4:] / scale[4:, None]).to(FP8)
    assert torch.equal(codes[4:].view(torch.uint8), plain.view(torch.uint8))
    unclamped = dequantize_fp8((x.float()[:4] / scale[:4, None]).to(FP8), scale[:4])  # what it was
    assert not bool(unclamped.to(dtype).isfinite().all())


@triton.jit
def _quantize_kernel(x, codes, scale, D: tl.constexpr, ROOM: tl.constexpr):
    """One row of D per program: the Triton building blocks as the kernels use them."""
    o = tl.program_id(0) * D + tl.arange(0, D)
    b_x = tl.load(x + o).to(tl.float32)
    s, inv = _fp8_scale(tl.max(tl.abs(b_x), 0))
    tl.store(scale + tl.program_id(0), s)
    tl.store(codes + o, _fp8_encode(b_x * inv, _fp8_limit(inv, ROOM)))


@pytest.mark.parametrize("rows", ["random", "top-fp16", "top-fp32"])
def test_triton_scale_and_codes_equal_the_reference(rows):
    need_triton()
    x = {"random": lambda: _rows(gen(2)), "top-fp16": lambda: _top_rows(torch.float16),
         "top-fp32": lambda: _top_rows(torch.float32)}[rows]().to(DEVICE)
    codes = torch.full(x.shape, float("nan"), dtype=FP8, device=DEVICE)
    scale = torch.full(x.shape[:-1], float("nan"), device=DEVICE)
    _quantize_kernel[(x.shape[0],)](x, codes.view(torch.uint8), scale, D=x.shape[1], ROOM=fp8_room(x.dtype))
    want_codes, want_scale = quantize_fp8(x)
    assert torch.equal(scale, want_scale)
    assert torch.equal(codes.view(torch.uint8), want_codes.view(torch.uint8))


@triton.jit
def _decode_kernel(codes, out, N: tl.constexpr):
    o = tl.arange(0, N)
    tl.store(out + o, _fp8_values(tl.load(codes + o)))


def test_triton_software_decode_equals_torch_on_every_code():
    """uint8 codes (how sm_80 / sm_86 load FP8 pools: decoded from the bits) give torch's float32 values bit for bit
    on the 254 finite codes (both zeros, 14 subnormals, the normals up to +-448), NaN on 0x7F and 0xFF. (The
    converter path, fp8e4nv loads, is the GPU's: the interpreter's emulation of it is not checked here.)"""
    need_triton()
    codes = torch.arange(256, dtype=torch.uint8, device=DEVICE)
    out = torch.full((256,), 1.0, device=DEVICE)
    _decode_kernel[(1,)](codes, out, N=256)
    want = codes.view(FP8).float()
    nan = want.isnan()
    assert nan.sum() == 2 and torch.equal(out[nan].isnan(), torch.ones(2, dtype=torch.bool, device=DEVICE))
    assert torch.equal(out[~nan].view(torch.int32), want[~nan].view(torch.int32))


def test_pool_format_errors_name_the_argument():
    like = torch.zeros(2, 3, 4, 8, dtype=torch.bfloat16)
    pool = torch.zeros(2, 10, 4, 8, dtype=FP8)
    scale = torch.zeros(2, 10, 4)
    check_pool_format("op", "k_pool", pool, scale, like)
    check_pool_format("op", "k_pool", pool.to(torch.bfloat16), None, like)
    cases = [
        (pool, None, ValueError, "k_pool_scale: expected the float32"),
        (pool.to(torch.bfloat16), scale, ValueError, "k_pool_scale: expected None"),
        (pool, scale[:, :9], ValueError, "k_pool_scale: expected shape"),
        (pool, scale.double(), TypeError, "k_pool_scale: expected dtype"),
        (pool.to(torch.float16), None, TypeError, "k_pool: expected dtype"),
        (pool.to(torch.float8_e5m2), scale, TypeError, "k_pool: expected dtype"),
    ]
    for p, s, exc, match in cases:
        with pytest.raises(exc, match=match):
            check_pool_format("op", "k_pool", p, s, like)
    with pytest.raises(ValueError, match="k_pool_scale: expected a tensor on"):
        check_pool_format("op", "k_pool", pool, scale.to("meta"), like)


def test_fp8_pool_holds_half_the_bytes_plus_scales():
    d = 128
    ratio = (d * 1 + 4) / (d * 2)  # codes + one fp32 scale per row and head, against bf16
    assert math.isclose(ratio, 0.515625) and ratio <= 0.53
