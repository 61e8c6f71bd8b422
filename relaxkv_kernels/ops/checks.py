"""Argument checks of the ops, run once per call before any kernel runs.

Each ``ops/<op>/op.py`` gathers its op's checks in one private ``_check``. The public function runs it
and calls the registered op with ``checked=True``; a direct ``torch.ops.relaxkv.<op>(...)`` call (default
``checked=False``) runs it in the op body, so both raise the same errors. ``checked=True`` (callers that
have checked already, e.g. the cache, once where the arguments enter) costs the op one bool test. Torch
runs an op's registered fake, not its body, for meta tensors: there the fake checks (:func:`checks_in_fake`).

Every check raises ``ValueError`` (``TypeError`` for a wrong type) naming the op, the argument, what
was expected and what was given. Index *values* are checked where that costs no device synchronisation
(CPU tensors, outside torch.compile; skipped for CUDA and meta tensors); device tables come from the
host-side planner, which checks them before uploading. Backend wrappers check only what is specific to
them (strides, alignment, size limits), with :func:`require`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch._subclasses.fake_tensor import FakeTensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)
_NO_INDEX = ("cpu", "meta")  # device types whose tensors report no index


def canonical_device(device) -> torch.device:
    """``device`` as tensors report it: ``"cuda"`` becomes the current CUDA device (``cuda:<index>``), and a device
    type whose tensors carry no index drops the one given (``"cpu:0"`` is ``cpu``, where torch puts such tensors).

    Tensors on CUDA always carry an index (``cuda:0``) while ``torch.device("cuda")`` has none, and CPU tensors
    never do while ``torch.device("cpu:0")`` has one, so a device that enters the package from a user goes through
    here once before any comparison.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    if device.type in _NO_INDEX and device.index is not None:
        return torch.device(device.type)
    return device


def require(op: str, cond: bool, message: str) -> None:
    """ValueError ``<op>: <message>`` when ``cond`` is false (backend-specific checks of the kernel wrappers)."""
    if not cond:
        raise ValueError(f"{op}: {message}")


def check_devices(op: str, **tensors: torch.Tensor) -> torch.device:
    """The one device of all ``tensors``; ValueError naming the ones that are elsewhere (the odd ones out)."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name}: expected a torch.Tensor, got {type(t).__name__}")
    devices = [t.device for t in tensors.values()]
    common = max(dict.fromkeys(devices), key=devices.count)  # the majority; ties: the first argument's
    odd = [name for name, t in tensors.items() if t.device != common]
    if odd:
        others = ", ".join(name for name in tensors if name not in odd)
        got = ", ".join(f"{name} on {tensors[name].device}" for name in odd)
        raise ValueError(f"{op}: {', '.join(odd)}: expected tensors on {common} like {others}, got {got}")
    return common


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
    if device is not None and t.device != canonical_device(device):
        raise ValueError(f"{op}: {name}: expected a tensor on {canonical_device(device)}, got one on {t.device}")
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


def check_qkv(op: str, name: str, t) -> torch.Tensor:
    """A float [B, N, H, D] activation with an even head_dim."""
    check_tensor(op, name, t, shape=(None, None, None, None), dtypes=FLOAT_DTYPES)
    check_head_dim(op, name, t.shape[-1])
    return t


def check_pool(op: str, name: str, pool, like: torch.Tensor) -> torch.Tensor:
    """A cache pool [B, n_rows, H, D] matching ``like`` [B, *, H, D] in batch, heads, head_dim and dtype."""
    b, _, h, d = like.shape
    return check_tensor(op, name, pool, shape=(b, None, h, d), dtypes=(like.dtype,))


def checks_in_fake(checked: bool, t: torch.Tensor) -> bool:
    """Whether an op's registered fake runs the op's checks: ``checked`` is False and ``t`` (a tensor argument)
    is real, i.e. torch ran the fake for a call with meta tensors instead of the op body. While tracing (fake
    tensors: torch.compile, opcheck) the fake does not check: the op body checks when the graph runs."""
    return not checked and not isinstance(t, FakeTensor)


def can_inspect(t: torch.Tensor) -> bool:
    """True where reading index values costs no device synchronisation and is possible: a real CPU tensor in
    eager mode (not under torch.compile, not a fake tensor of a tracing or shape-propagation pass)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling() and not isinstance(t, FakeTensor)


def check_index(op: str, name: str, t, length: int | None = None, low: int | None = None,
                high: int | None = None, distinct: bool = False) -> torch.Tensor:
    """A 1-D int32/int64 index tensor of ``length`` entries whose values lie in [low, high] and, with ``distinct``,
    differ from each other (values are checked on CPU tensors)."""
    check_tensor(op, name, t, shape=(length,), dtypes=INDEX_DTYPES)
    if not can_inspect(t):
        return t
    if low is not None and t.numel() and (int(t.min()) < low or int(t.max()) > high):
        raise ValueError(f"{op}: {name}: expected values in [{low}, {high}], got [{int(t.min())}, {int(t.max())}]")
    if distinct and t.unique().numel() != t.numel():
        raise ValueError(f"{op}: {name}: expected distinct values (one slot per frame: two frames written to one "
                         f"slot would race), got {t.tolist()}")
    return t


def check_seg(op: str, seg, batch: int, n_rows: int | None = None) -> torch.Tensor:
    """A segment table int32 [B, n_seg >= 1, 3] of (start_row, length, delta) rows.

    With ``n_rows`` (tables read by attention / gather), a CPU table's rows must lie inside the pool and
    every batch element must have at least one key row.
    """
    check_tensor(op, "seg", seg, shape=(batch, None, 3), dtypes=(torch.int32,))
    if seg.shape[1] == 0:
        raise ValueError(f"{op}: seg: expected at least one segment row, got an empty table {tuple(seg.shape)}")
    if n_rows is None or not can_inspect(seg):
        return seg
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
    return seg


def check_seg_slice(op: str, seg, batch: int, seg_index: int, count: int) -> None:
    """Rows seg_index .. seg_index + count - 1 of a segment table exist (the rows a selection writes)."""
    check_seg(op, seg, batch)
    check_int(op, "seg_index", seg_index, low=0, high=seg.shape[1] - count)


def check_total(op: str, seg: torch.Tensor, total: int) -> None:
    """``total`` = keys per batch element = sum of the table's lengths (checked for CPU tables)."""
    check_int(op, "total", total, low=1)
    if can_inspect(seg):
        rows = seg[..., 1].long().clamp_min(0).sum(-1)
        if bool((rows != total).any()):
            raise ValueError(f"{op}: total: expected sum(length) of every batch element, {rows.tolist()}, got {total}")


def _fmt(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
