"""Which attention engine runs dense attention on contiguous K/V: a small table the benchmark writes.

``tuning.json`` beside this file::

    {"version": 3,
     "entries": {"NVIDIA H100 80GB HBM3|d128|q8192|k16384": "sdpa_cudnn", ...}}

Keys are ``<device name>|d<head_dim>|q<Nq bucket>|k<Nk bucket>``, buckets a quarter octave wide
(``bucket``); values are engines of ``engines.py``. ``python -m benchmarks chunk
--write-tuning`` times every engine at the chunk shapes on the device it runs on and records the
fastest. Without an entry: ``sdpa_cudnn`` on the GPUs of a target measured on hardware (``measured`` in
``relaxkv_kernels.targets``: sm_90a, H100, 2026-11-27: cuDNN 506 TFLOP/s against 310 for the flash backend at Wan
relax shapes) with a cuDNN newer than 9.15.0, torch's own SDPA dispatch elsewhere (a safe default: it runs on every
GPU); a GPU with no row at all is named in one warning per process, which says how to measure it. The lookup uses
Python ints and strings only (the file is
read once per process), so it costs no host-device synchronisation; resolve it outside compiled regions
(``KVCache.begin_chunk`` does) and pass the engine into compiled code.

    >>> from relaxkv_kernels.ops.dense_attention.tuning import choose_engine
    >>> choose_engine("cpu", 128, 4680, 10920)
    'sdpa'
"""
from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path

import torch

from ...targets import OLDEST
from ...targets import target_of
from .engines import ENGINES

TUNING_PATH = Path(__file__).with_name("tuning.json")
_VERSION = 3


def bucket(n: int) -> int:
    """n rounded up to a quarter octave (4, 5, 6 or 7 times a power of two; n itself below 8), so the Wan chunks
    keep apart: 4680 -> 5120, 6240 -> 7168, 10920 -> 12288, 27872 -> 28672, 32760 -> 32768."""
    step = 1 << max(0, int(n).bit_length() - 3)
    return -(-int(n) // step) * step


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
    if not isinstance(data, dict) or data.get("version") != _VERSION:
        return {}
    return {str(k): v for k, v in data.get("entries", {}).items() if v in ENGINES}


@functools.cache
def device_name(device: str) -> str:
    """``torch.cuda.get_device_name`` of a CUDA device string (a cached host query, no sync), else its type."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return dev.type
    return torch.cuda.get_device_name(dev)


CUDNN_MIN = 91501  # torch itself avoids cuDNN attention up to 9.15.0 (out-of-bounds reads and CUDA-graph
# failures when the query length is not a multiple of 128, as 4680 is: pytorch #169849, #167101)


def default_for(capability: tuple[int, int], cudnn: int) -> str:
    """The engine without a table entry on a GPU of ``capability`` with cuDNN ``cudnn`` (``torch.backends.cudnn.
    version()``): cuDNN first where a GPU of that target was measured (an H100: sm_90a) and cuDNN is newer than
    9.15.0, else torch's own dispatch."""
    if tuple(capability) >= OLDEST and target_of(capability).measured and cudnn >= CUDNN_MIN:
        return "sdpa_cudnn"
    return "sdpa"


@functools.cache
def default_engine(device: str) -> str:
    """:func:`default_for` the CUDA ``device``; torch's own dispatch off CUDA."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return "sdpa"
    return default_for(torch.cuda.get_device_capability(dev), torch.backends.cudnn.version() or 0)


@functools.cache
def warn_unmeasured(name: str, engine: str) -> None:
    """The one warning of a process for a GPU ``name`` the table has no row for."""
    warnings.warn(f"relaxkv dense_attention: {name} has no row in {TUNING_PATH.name} (never measured): engine "
                  f"'auto' runs {engine!r}, a safe default, not a measured choice. Run `python "
                  "-m benchmarks chunk --shapes wan --write-tuning` on this GPU to record the fastest engines.",
                  stacklevel=3)


def choose_engine(device: str, head_dim: int, n_q: int, n_k: int) -> str:
    """The attention engine for n_q queries over n_k contiguous keys on ``device`` (a string): the table's, else
    :func:`default_engine` (with :func:`warn_unmeasured` on a GPU the table has no row for)."""
    name = device_name(device)
    table = load_table()
    engine = table.get(tuning_key(name, head_dim, n_q, n_k))
    if engine is not None:
        return engine
    engine = default_engine(device)
    if torch.device(device).type == "cuda" and not any(key.startswith(f"{name}|") for key in table):
        warn_unmeasured(name, engine)
    return engine


def record(choices: dict[str, str], path: str | Path | None = None) -> Path:
    """Merge {tuning_key(...): engine} into the table at ``path`` (default ``TUNING_PATH``); for the benchmark."""
    bad = {k: v for k, v in choices.items() if v not in ENGINES}
    if bad:
        raise ValueError(f"tuning.record: expected engines in {ENGINES}, got {bad}")
    path = Path(path) if path is not None else TUNING_PATH
    data = json.loads(path.read_text()) if path.is_file() else {}
    entries = dict(data.get("entries", {})) if data.get("version") == _VERSION else {}
    entries.update(choices)
    path.write_text(json.dumps({"version": _VERSION, "entries": dict(sorted(entries.items()))}, indent=1) + "\n")
    load_table.cache_clear()
    return path
