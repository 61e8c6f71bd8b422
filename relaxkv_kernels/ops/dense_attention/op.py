"""``relaxkv::dense_attention``: attention over contiguous K/V with a chosen engine (registration, checks).

``torch.ops.relaxkv.dense_attention`` is the public function with ``scale`` given, then ``checked`` (see
``ops/checks.py``); it resolves ``engine="auto"`` itself (a cached host lookup) unless ``checked``, so callers
that pass ``checked=True`` pass a resolved engine (:func:`resolve_engine`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..checks import check_devices
from ..checks import check_finite
from ..checks import check_pool
from ..checks import check_qkv
from ..checks import check_tensor
from ..checks import checks_in_fake
from ..dispatch import inference_only
from . import engines
from . import tuning
from .reference import dense_attention_ref


@torch.compiler.assume_constant_result  # host-side table lookup: a constant of the compiled graph
def resolve_engine(engine: str, device: torch.device, dtype: torch.dtype, head_dim: int, n_q: int, n_k: int) -> str:
    """``engine``, or for ``"auto"`` the tuning table's choice for this device and shape (an available one)."""
    if engine not in ("auto", *engines.ENGINES):
        raise ValueError(f"relaxkv.dense_attention: engine: expected one of {('auto', *engines.ENGINES)}, "
                         f"got {engine!r}")
    if engine == "auto":
        engine = tuning.choose_engine(str(device), head_dim, n_q, n_k)
        if not engines.available(engine, device, dtype):
            engine = tuning.default_engine(str(device))
    elif not engines.available(engine, device, dtype):
        raise RuntimeError(f"relaxkv.dense_attention: engine {engine!r} cannot run here ({dtype} on {device}: "
                           "package not installed, wrong device or dtype)")
    return engine


def _check(q, k, v, scale, engine) -> tuple[float, str]:
    """The checks of :func:`dense_attention` (public function and registered op); returns the scale (D ** -0.5
    for None) and the engine (``"auto"`` resolved)."""
    op = "relaxkv.dense_attention"
    check_devices(op, q=q, k=k, v=v)
    check_qkv(op, "q", q)
    check_pool(op, "k", k, q)
    check_tensor(op, "v", v, shape=tuple(k.shape), dtypes=(q.dtype,))
    if k.shape[1] == 0:
        raise ValueError(f"{op}: k: expected at least one key row, got shape {tuple(k.shape)}")
    scale = q.shape[-1] ** -0.5 if scale is None else check_finite(op, "scale", scale)
    return scale, resolve_engine(engine, q.device, q.dtype, q.shape[-1], q.shape[1], k.shape[1])


@torch.library.custom_op("relaxkv::dense_attention", mutates_args=())
def dense_attention_op(q: Tensor, k: Tensor, v: Tensor, scale: float, engine: str, checked: bool = False) -> Tensor:
    if not checked:
        scale, engine = _check(q, k, v, scale, engine)
    if engine == "reference":
        return dense_attention_ref(q, k, v, scale)
    return engines.run(engine, q, k, v, scale)


@dense_attention_op.register_fake
def dense_attention_fake(q, k, v, scale, engine, checked=False):
    if checks_in_fake(checked, q):
        _check(q, k, v, scale, engine)
    return q.new_empty(q.shape)


inference_only("relaxkv::dense_attention")


def dense_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, engine: str = "auto") -> Tensor:
    """Softmax attention of q over contiguous, already rotated K/V: ``softmax(q k^T * scale) v``, no mask.

    Args:
        q: [B, Nq, H, D]; k, v: [B, Nk, H, D] (Nk >= 1), same dtype and device; any strides with a
            unit last dim for the SDPA / flash-attn engines.
        scale: softmax scale, default D ** -0.5.
        engine: one of ``engines.ENGINES`` or ``"auto"`` (the tuning table's choice for this device and
            shape; resolve it outside torch.compile and pass it in).

    Returns:
        [B, Nq, H, D] in q.dtype.

    Example:
        >>> out = dense_attention(q, k_window, v_window, engine="sdpa_cudnn")
    """
    scale, engine = _check(q, k, v, scale, engine)
    return dense_attention_op(q, k, v, scale, engine, checked=True)
