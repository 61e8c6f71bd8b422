"""relaxkv::dense_attention: softmax(q k^T * scale) v over contiguous K/V, run by a chosen engine.

Every engine that runs on this machine (CPU: reference, SDPA, and the Triton kernel under the interpreter;
on a GPU also the SDPA backends and flash-attn where installed) against a float64 literal in fp32 and
fp16, with a custom scale and non-contiguous K/V; registration (opcheck per engine, fake, the raw op's "auto") and
bad inputs (public function and raw op alike). The tuning table's engine choice is in test_dispatch.py.
"""
import pytest
import torch

import relaxkv_kernels as rk
from relaxkv_kernels.ops.dense_attention import engines

from helpers import DEVICE
from helpers import assert_2x_rule
from helpers import assert_checked_matches_default
from helpers import assert_raw_op_raises_like_public
from helpers import gen
from helpers import randn
from helpers import replace
from helpers import run_on_fakes

B, NQ, NK, H, D = 2, 13, 37, 3, 32  # D >= 16: the Triton engine's tl.dot tiles
ENGINES = [e for e in engines.ENGINES if engines.available(e, torch.device(DEVICE), torch.float16)]


def _args(g: torch.Generator, dtype=torch.float32) -> list:
    return [randn(g, B, NQ, H, D, dtype=dtype, device=DEVICE), randn(g, B, NK, H, D, dtype=dtype, device=DEVICE),
            randn(g, B, NK, H, D, dtype=dtype, device=DEVICE)]


def _literal(q, k, v, scale, dtype=torch.float64):
    """softmax(q k^T * scale) v per batch element and head, computed in ``dtype``: [B, Nq, H, D]."""
    qt, kt, vt = (x.to(dtype).transpose(1, 2) for x in (q, k, v))  # [B, H, N, D]
    return ((qt @ kt.transpose(-1, -2) * scale).softmax(-1) @ vt).transpose(1, 2)


def _check(out, q, k, v, scale, what):
    assert out.shape == q.shape and out.dtype == q.dtype, what
    truth = _literal(q, k, v, scale)
    if q.dtype == torch.float32:  # fp32 math against float64: a few ulps of O(1) outputs
        torch.testing.assert_close(out.double(), truth, rtol=1e-5, atol=1e-5, msg=what)
    else:  # the 2x rule against torch's fp16 computation (~1e-3 here); + 2e-4: a few fp16 ulps of the outputs
        assert_2x_rule(out, truth, _literal(q, k, v, scale, q.dtype), 2e-4, what)


def test_cpu_engines_are_available():
    """The CPU tier runs the reference, SDPA and (interpreter) Triton engines: none is skipped silently."""
    if DEVICE == "cpu":
        assert {"reference", "sdpa", "triton"} <= set(ENGINES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("engine", ENGINES)
def test_engine_matches_literal(engine, dtype):
    q, k, v = _args(gen(1), dtype)
    before = [t.clone() for t in (q, k, v)]
    out = rk.dense_attention(q, k, v, engine=engine)
    _check(out, q, k, v, D**-0.5, engine)
    assert all(torch.equal(t, t0) for t, t0 in zip((q, k, v), before)), "inputs of a non-mutating op changed"


@pytest.mark.parametrize("engine", ENGINES)
def test_engine_with_a_custom_scale(engine):
    """scale 0.05 flattens the softmax (default D^-0.5 = 0.18): a scale ignored or applied twice shows."""
    q, k, v = _args(gen(2))
    _check(rk.dense_attention(q, k, v, 0.05, engine=engine), q, k, v, 0.05, engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_engine_with_non_contiguous_kv(engine):
    """K and V interleaved in one buffer (unit last stride, other strides doubled), q every other token."""
    g = gen(3)
    q = randn(g, B, 2 * NQ, H, D, device=DEVICE)[:, ::2]
    k, v = randn(g, B, NK, H, 2, D, device=DEVICE).unbind(3)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    _check(rk.dense_attention(q, k, v, engine=engine), q, k, v, D**-0.5, engine)


def test_triton_engine_refuses_head_dim_below_16():
    """Backend-specific: the Triton kernel's tl.dot tiles need head_dim >= 16 (the op takes any even D); the public
    function and the raw op name the op, the argument and the constraint."""
    if "triton" not in ENGINES:
        pytest.skip("the Triton engine cannot run here")
    g = gen(4)
    q, k = randn(g, 1, 4, 1, 8, device=DEVICE), randn(g, 1, 6, 1, 8, device=DEVICE)
    assert_raw_op_raises_like_public("dense_attention", [q, k, k, 8**-0.5, "triton"], ValueError,
                                     "relaxkv.dense_attention: q: expected head_dim >= 16 for the Triton kernel")
    torch.testing.assert_close(rk.dense_attention(q, k, k, engine="reference"), _literal(q, k, k, 8**-0.5).float())


# ------------------------------------------------------------------------------------------ registration


@pytest.mark.parametrize("engine", ENGINES)
def test_opcheck(engine):
    torch.library.opcheck(torch.ops.relaxkv.dense_attention.default, (*_args(gen(5)), D**-0.5, engine))


def test_public_op_matches_registered_op():
    q, k, v = (t.cpu() for t in _args(gen(6)))
    out = rk.dense_attention(q, k, v, engine="reference")
    assert torch.equal(out, torch.ops.relaxkv.dense_attention(q, k, v, D**-0.5, "reference"))


def test_fake_shape():
    out, _ = run_on_fakes("dense_attention", _args(gen(7)), 0.25)  # engine "reference"
    assert out.shape == (B, NQ, H, D) and out.dtype == torch.float32


def test_raw_op_resolves_auto():
    """engine "auto" is resolved inside the op, eagerly and under torch.compile(fullgraph=True): the raw op runs
    the public function's choice."""
    q, k, v = (t.cpu() for t in _args(gen(11)))
    want = rk.dense_attention(q, k, v)

    def raw(q, k, v):
        return torch.ops.relaxkv.dense_attention(q, k, v, D**-0.5, "auto")

    assert torch.equal(raw(q, k, v), want)
    assert torch.equal(torch.compile(raw, fullgraph=True, backend="eager")(q, k, v), want)


def test_checked_true_matches_default():
    assert_checked_matches_default("dense_attention", [*(t.cpu() for t in _args(gen(12))), 0.3, "reference"])


# ------------------------------------------------------------------------------------------- bad input

BAD = [  # (argument index, replacement, error type, message fragment)
    pytest.param(0, torch.randn(B, NQ, H), ValueError, "q: expected rank 4", id="q_rank"),
    pytest.param(0, torch.randn(B, NQ, H, D).double(), TypeError, "q: expected dtype", id="q_float64"),
    pytest.param(0, torch.randn(B, NQ, H, 7), ValueError, "q: head_dim must be a positive even", id="q_odd_head_dim"),
    pytest.param(1, torch.randn(B, NK, H + 1, D), ValueError, "k: expected shape", id="k_heads"),
    pytest.param(1, torch.randn(B + 1, NK, H, D), ValueError, "k: expected shape", id="k_batch"),
    pytest.param(1, torch.randn(B, NK, H, D // 2), ValueError, "k: expected shape", id="k_head_dim"),
    pytest.param(2, torch.randn(B, NK, H, D).half(), TypeError, "v: expected dtype", id="v_dtype"),
    pytest.param(2, torch.randn(B, NK - 1, H, D), ValueError, "v: expected shape", id="v_rows"),
    pytest.param(2, torch.randn(B, NK, H, D, device="meta"), ValueError, "v: expected tensors on", id="v_device"),
    pytest.param(3, float("inf"), ValueError, "scale: expected a finite number", id="scale_inf"),
    pytest.param(4, "x", ValueError,
                 "relaxkv.dense_attention: engine: expected one of \\('auto', 'reference', .*\\), got 'x'",
                 id="unknown_engine"),
    pytest.param(4, "sdpa_cudnn", RuntimeError, "engine 'sdpa_cudnn' cannot run here", id="cuda_engine_on_cpu"),
]


@pytest.mark.parametrize("index, value, exc, match", BAD)
def test_bad_input_raises_before_any_kernel(index, value, exc, match):
    """The public function and the raw op (torch.ops.relaxkv.dense_attention) raise the same error."""
    args = replace([*(t.cpu() for t in _args(gen(8))), D**-0.5, "auto"], index, value)
    assert_raw_op_raises_like_public("dense_attention", args, exc, match)


def test_no_keys():
    q = randn(gen(10), B, NQ, H, D)
    assert_raw_op_raises_like_public("dense_attention", [q, q[:, :0], q[:, :0], D**-0.5, "auto"], ValueError,
                                     "k: expected at least one key row")
