"""Argument checks at the Python boundary: shapes, dtypes, devices and index ranges.

Every check raises ``ValueError`` (or ``TypeError`` for a wrong type) that names the op, the argument,
what was expected and what was given, before any kernel runs.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def require(op: str, cond: bool, message: str) -> None:
    """ValueError ``<op>: <message>`` when ``cond`` is false (the kernels' launchers use it for their checks)."""
    if not cond:
        raise ValueError(f"{op}: {message}")


def index_arg(op: str, name: str, t: torch.Tensor, length: int | None = None,
              device: torch.device | None = None) -> torch.Tensor:
    """A 1-D int32/int64 index tensor (of ``length`` entries, on ``device``, when given) as int64: int32 is
    widened on its device, without a host sync. The kernels' launchers take the index dtypes the public ops accept."""
    require(op, isinstance(t, torch.Tensor) and t.dim() == 1 and t.dtype in INDEX_DTYPES
            and (length is None or t.numel() == length) and (device is None or t.device == device),
            f"{name}: expected int32/int64 [{'n' if length is None else length}]"
            f"{'' if device is None else f' on {device}'}, got {getattr(t, 'dtype', type(t).__name__)} "
            f"{tuple(getattr(t, 'shape', ()))} on {getattr(t, 'device', None)}")
    return t.long()


def check_tensor(
    op: str,
    name: str,
    t,
    *,
    shape: Sequence[int | None] | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Check a tensor argument; ``None`` entries of ``shape`` match any size."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name}: expected a torch.Tensor, got {type(t).__name__}")
    if shape is not None:
        if t.dim() != len(shape):
            raise ValueError(f"{op}: {name}: expected rank {len(shape)} {_fmt(shape)}, got shape {tuple(t.shape)}")
        for want, got in zip(shape, t.shape):
            if want is not None and want != got:
                raise ValueError(f"{op}: {name}: expected shape {_fmt(shape)}, got {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{op}: {name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name}: expected a tensor on {device}, got one on {t.device}")
    return t


def check_head_dim(op: str, name: str, head_dim: int) -> None:
    if head_dim % 2 or head_dim <= 0:
        raise ValueError(f"{op}: {name}: head_dim must be a positive even number (RoPE pairs), got {head_dim}")


def check_int(op: str, name: str, value, *, low: int | None = None, high: int | None = None) -> int:
    """Check a Python int argument lies in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name}: expected an int, got {type(value).__name__}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{op}: {name}: expected an int in [{low}, {high}], got {value}")
    return value


def check_finite(op: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name}: expected a float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{op}: {name}: expected a finite number, got {value}")
    return float(value)


def can_inspect(t: torch.Tensor) -> bool:
    """True where reading index values costs no device synchronisation (CPU tensor, eager mode)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def check_index_range(op: str, name: str, t: torch.Tensor, low: int, high: int) -> None:
    """Check every value of an index tensor lies in [low, high] (CPU tensors only: no host sync)."""
    if can_inspect(t) and t.numel() and (int(t.min()) < low or int(t.max()) > high):
        raise ValueError(f"{op}: {name}: expected values in [{low}, {high}], got [{int(t.min())}, {int(t.max())}]")


def check_segments(op: str, seg: torch.Tensor, n_rows: int) -> None:
    """Check a segment table's rows lie inside the pool and lengths are non-negative (CPU tables only)."""
    if not can_inspect(seg) or not seg.numel():
        return
    start, length = seg[..., 0].long(), seg[..., 1].long()
    if int(length.min()) < 0:
        raise ValueError(f"{op}: seg: expected lengths >= 0, got {int(length.min())}")
    used = length > 0
    if used.any() and (int(start[used].min()) < 0 or int((start + length)[used].max()) > n_rows):
        raise ValueError(
            f"{op}: seg: expected rows inside the pool [0, {n_rows}), got start {int(start[used].min())}"
            f" .. end {int((start + length)[used].max())}"
        )
    if bool((length.sum(-1) == 0).any()):
        raise ValueError(f"{op}: seg: expected at least one key row per batch element, got an empty table")


def _fmt(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
