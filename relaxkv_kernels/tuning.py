"""Which implementation of ``sparse_kv_attention`` to run (``impl="auto"``): a small table the benchmark writes.

``relaxkv_kernels/tuning.json``::

    {"version": 1,
     "entries": {"NVIDIA H100 80GB HBM3|d128|q8192|k16384": "gather", ...}}

Keys are ``<device name>|d<head_dim>|q<Nq bucket>|k<Nk bucket>``, buckets the next power of two
(``bucket``); values ``"fused"`` (the segment-table attention op) or ``"gather"`` (``gather_kv_rope`` then
a dense attention kernel). No entry: ``"fused"``. The lookup uses Python ints and strings only (the
file is read once per process), so it costs no host-device synchronisation. Resolve it outside
compiled regions (``KVCache.begin_chunk`` does) and pass ``impl`` explicitly into compiled code.

    >>> from relaxkv_kernels.tuning import choose_impl
    >>> choose_impl("cpu", 128, 4680, 10920)
    'fused'
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

IMPLS = ("fused", "gather")
DEFAULT_IMPL = "fused"
TUNING_PATH = Path(__file__).with_name("tuning.json")
_VERSION = 1


def bucket(n: int) -> int:
    """The next power of two >= n (n >= 1): 4680 -> 8192, 10920 -> 16384."""
    return 1 << max(0, int(n) - 1).bit_length()


def tuning_key(device_name: str, head_dim: int, n_q: int, n_k: int) -> str:
    """Table key of a problem: ``<device name>|d<head_dim>|q<bucket(n_q)>|k<bucket(n_k)>``."""
    return f"{device_name}|d{head_dim}|q{bucket(n_q)}|k{bucket(n_k)}"


@functools.cache
def load_table(path: str | None = None) -> dict[str, str]:
    """The entries of the tuning table at ``path`` (default ``TUNING_PATH``); {} when absent. Read once."""
    path = Path(path) if path is not None else TUNING_PATH
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    entries = data.get("entries", {}) if isinstance(data, dict) else {}
    return {str(k): v for k, v in entries.items() if v in IMPLS}


@functools.cache
def device_name(device: str) -> str:
    """``torch.cuda.get_device_name`` of a CUDA device string (a cached host query, no sync), else its type."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return dev.type
    return torch.cuda.get_device_name(dev)


def choose_impl(device: str, head_dim: int, n_q: int, n_k: int) -> str:
    """``"fused"`` or ``"gather"`` for attention of n_q queries over n_k keys on ``device`` (a string)."""
    return load_table().get(tuning_key(device_name(device), head_dim, n_q, n_k), DEFAULT_IMPL)


def record(choices: dict[str, str], path: str | Path | None = None) -> Path:
    """Merge {tuning_key(...): impl} into the table at ``path`` (default ``TUNING_PATH``); for the benchmark."""
    bad = {k: v for k, v in choices.items() if v not in IMPLS}
    if bad:
        raise ValueError(f"tuning.record: expected values in {IMPLS}, got {bad}")
    path = Path(path) if path is not None else TUNING_PATH
    data = json.loads(path.read_text()) if path.is_file() else {}
    entries = dict(data.get("entries", {}))
    entries.update(choices)
    path.write_text(json.dumps({"version": _VERSION, "entries": dict(sorted(entries.items()))}, indent=1) + "\n")
    load_table.cache_clear()
    return path
