"""relaxkv::quantize_frames: a chunk's rows quantized into the frame slots of an FP8 pool (the window commit).

The reference against quantize_fp8 applied row by row at the slots' rows; the Triton kernel against the
reference bit for bit (same power-of-two scales, same rounding), strided inputs as the cache passes them
(a window's first rows, every layer flattened), rows outside the slots untouched; registration, fakes
and bad inputs (public function and raw op alike).
"""
import pytest
import torch

import relaxkv_kernels as rk
from relaxkv_kernels.ops.fp8 import quantize_fp8
from relaxkv_kernels.ops.quantize_frames.reference import quantize_frames_ref

from helpers import DEVICE
from helpers import FP8
from helpers import assert_fp8_equal
from helpers import assert_public_op_matches_registered
from helpers import fp8_pool
from helpers import gen
from helpers import need_triton
from helpers import randn
from helpers import raw_op_tests
from helpers import run_on_fakes

N, H, D, F = 3, 2, 16, 6


def _args(g: torch.Generator, dtype=torch.float32, device="cpu"):
    x = randn(g, N, 2 * F, H, D, dtype=dtype, device=device) * 3
    pool, scale = fp8_pool(g, N, 5 * F, H, D, device=device)
    return [x, pool, scale, torch.tensor([3, 1], device=device), F]


def test_reference_quantizes_each_frame_into_its_slot():
    x, pool, scale, slots, f = _args(gen(0))
    before_pool, before_scale = pool.clone(), scale.clone()
    quantize_frames_ref(x, pool, scale, slots, f)
    for u, slot in enumerate(slots.tolist()):
        want_codes, want_scale = quantize_fp8(x[:, u * f:(u + 1) * f])
        assert_fp8_equal(pool[:, slot * f:(slot + 1) * f], scale[:, slot * f:(slot + 1) * f], want_codes, want_scale)
    untouched = torch.ones(pool.shape[1], dtype=torch.bool)
    for slot in slots.tolist():
        untouched[slot * f:(slot + 1) * f] = False
    assert_fp8_equal(pool[:, untouched], scale[:, untouched], before_pool[:, untouched], before_scale[:, untouched])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_matches_reference_on_a_strided_window(dtype):
    need_triton()
    g = gen(1)
    layers, batch, max_keys = 2, 2, 3 * F
    window = randn(g, layers, batch, max_keys, H, D, dtype=dtype, device=DEVICE) * 5
    x = window[:, :, : 2 * F].flatten(0, 1)  # the cache's commit: the chunk rows of every layer's window
    pool, scale = fp8_pool(g, layers * batch, 4 * F, H, D, device=DEVICE)
    pool[:, : F] = float("nan")  # slot 0 is written: poisoned before the call
    scale[:, : F] = float("nan")
    slots = torch.tensor([2, 0], device=DEVICE)
    want_pool, want_scale = pool.clone(), scale.clone()
    quantize_frames_ref(x, want_pool, want_scale, slots, F)
    rk.quantize_frames(x, pool, scale, slots, F, backend="triton")
    assert_fp8_equal(pool, scale, want_pool, want_scale, "every row: the written slots and the untouched ones")


def test_public_op_matches_registered_and_fakes():
    args = _args(gen(2))
    assert_public_op_matches_registered("quantize_frames", args)
    out, _ = run_on_fakes("quantize_frames", args)
    assert out is None


test_bad_input, test_scalar_type, test_checked_true = raw_op_tests(
    "quantize_frames", _args,
    [
        (1, torch.zeros(N, 5 * F, H, D, dtype=torch.bfloat16), TypeError, "pool: expected an FP8 pool"),
        (2, torch.zeros(N, 5 * F, H + 1), ValueError, "pool_scale: expected shape"),
        (2, torch.zeros(N, 5 * F, H, dtype=torch.float64), TypeError, "pool_scale: expected dtype"),
        (1, torch.zeros(N, 5 * F, H + 1, D, dtype=FP8), ValueError, "pool: expected shape"),
        (3, torch.tensor([3, 5]), ValueError, r"frame_slot: expected values in \[0, 4\]"),
        (3, torch.tensor([3.0, 1.0]), TypeError, "frame_slot: expected dtype"),
        (0, torch.zeros(N, F, H, D), ValueError, "x: expected U \\* frame_tokens = 2 \\* 6 rows"),
        (4, F // 2, ValueError, "x: expected U \\* frame_tokens = 2 \\* 3 rows"),  # frames cut at the wrong rows
        (3, torch.tensor([1, 1]), ValueError, r"frame_slot: expected distinct values .* got \[1, 1\]"),
    ],
    scalar=(4, 6.0, "frame_tokens"),
)
