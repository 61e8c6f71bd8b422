"""The CUDA extension relaxkv_kernels._C: built when nvcc exists, importable and safe without a GPU.

Every launcher of csrc/launchers.h is exposed, the dtype codes come from its C++ enum, and without a device
the launchers and the Python wrappers raise a clear RuntimeError instead of crashing. The kernels
themselves are tested per op in tests/ops/ (on a GPU, or emulated on the CPU).
"""
import os
import re
from pathlib import Path

import pytest
import torch

from relaxkv_kernels import availability
from relaxkv_kernels.ops.compress_kv.cuda import compress_kv_cuda
from relaxkv_kernels.ops.gather_kv_rope.cuda import gather_kv_rope_cuda
from relaxkv_kernels.ops.mid_select.cuda import mid_select_cuda
from relaxkv_kernels.ops.relax_select.cuda import relax_select_cuda
from relaxkv_kernels.ops.rope_append.cuda import rope_append_cuda
from setup import find_nvcc  # the search the build itself uses

from helpers import gen
from helpers import randn

ROOT = Path(__file__).resolve().parents[2]

CUDA_WRAPPERS = {  # op -> its Python wrapper of the CUDA launcher (relaxkv_kernels/ops/<op>/cuda.py)
    "rope_append": rope_append_cuda,
    "relax_select": relax_select_cuda,
    "mid_select": mid_select_cuda,
    "compress_kv": compress_kv_cuda,
    "gather_kv_rope": gather_kv_rope_cuda,
}
CUDA_OPS = list(CUDA_WRAPPERS)


def _extension():
    ext = availability.cuda_extension()
    if ext is None:
        pytest.skip("relaxkv_kernels._C not built (no nvcc at install time)")
    return ext


def _declared_launchers() -> list[str]:
    """The launchers csrc/launchers.h declares (the one declaration of each)."""
    return re.findall(r"\bvoid\s+(\w+_cuda)\s*\(", (ROOT / "csrc" / "launchers.h").read_text())


def _null_arguments(launcher) -> list:
    """Zero for every parameter of a pybind11 launcher (pointers, sizes, dtype, stream; [0] * n for stride
    tuples), read from its signature: a call that would fault on a device."""
    sig = launcher.__doc__.split("\n", 1)[0]
    params, depth, current = [], 0, ""
    for ch in sig[sig.index("(") + 1:sig.rindex(") ->")] + ",":
        if ch == "," and depth == 0:
            params.append(current)
            current = ""
            continue
        depth += (ch in "[(") - (ch in "])")
        current += ch
    return [[0] * int(m[1]) if (m := re.search(r"FixedSize\((\d+)\)", p)) else 0 for p in params]


@pytest.mark.skipif(find_nvcc() is None or os.environ.get("RELAXKV_SKIP_CUDA_BUILD") == "1",
                    reason="nvcc not found (or RELAXKV_SKIP_CUDA_BUILD=1): pure-Python install")
def test_extension_built_when_nvcc_present():
    assert availability.cuda_extension() is not None, availability._extension_error
    assert availability.backends()["cuda_extension"]


def test_backends_report():
    report = availability.backends()
    assert set(report) == {"reference", "triton", "cuda_extension", "cuda_device"}
    assert report["reference"] is True
    assert report["cuda_device"] == torch.cuda.is_available()
    assert report["cuda_extension"] == (availability.cuda_extension() is not None)


def test_device_count():
    n = _extension().device_count()
    assert isinstance(n, int) and n >= 0
    if torch.cuda.is_available():
        assert n == torch.cuda.device_count()


def test_extension_exposes_every_declared_launcher():
    ext = _extension()
    declared = _declared_launchers()
    assert sorted(declared) == sorted(f"{op}_cuda" for op in CUDA_OPS)
    for name in declared:
        assert callable(getattr(ext, name)), name
    assert ext.mid_select_splits(780) == 13 and ext.mid_select_splits(1) == 1 and ext.mid_select_splits(10**6) == 32


def test_dtype_codes_come_from_the_cpp_enum():
    """Python reads the codes from the module: the same dict in the GPU build and in the emulated one."""
    assert _extension().dtype_codes == {"float32": 0, "float16": 1, "bfloat16": 2}
    enum = re.search(r"enum DType : int \{([^}]*)\}", (ROOT / "csrc" / "launchers.h").read_text())[1]
    assert [int(v) for v in re.findall(r"= (\d+)", enum)] == [0, 1, 2]


@pytest.mark.parametrize("op", CUDA_OPS)
def test_raw_launcher_without_device_raises(op):
    ext = _extension()
    if ext.device_count() > 0:
        pytest.skip("a CUDA device is present: null pointers would fault")
    name = f"{op}_cuda"
    with pytest.raises(RuntimeError, match=f"relaxkv {name}: no CUDA device available"):
        getattr(ext, name)(*_null_arguments(getattr(ext, name)))


def _wrapper_args(op: str) -> list:
    """Small valid CPU arguments of ``<op>_cuda`` (what the public op would pass)."""
    g = gen(0)
    r = lambda *s: randn(g, *s)  # noqa: E731
    seg = torch.zeros(2, 6, 3, dtype=torch.int32)
    if op == "rope_append":  # 2 frames of 4x4 tokens into slots 3 and 1 of 4
        return [r(2, 32, 2, 16), r(2, 32, 2, 16), r(2, 32, 2, 16), r(2, 64, 2, 16), r(2, 64, 2, 16), r(2, 4, 16),
                torch.tensor([3, 1]), torch.tensor([7, 8]), 4, 4]
    if op == "relax_select":
        return [r(2, 8, 16), torch.arange(8), torch.tensor([0, 1]), torch.tensor([7]), torch.tensor([3, 4, 5]), seg, 2,
                torch.tensor([20]), 16, 2.0, False, False]
    if op == "mid_select":
        return [r(2, 32, 4, 16), r(2, 6, 4, 16), torch.tensor([1, 2, 3]), torch.arange(6), seg, 1, torch.tensor([9]),
                100, 8, 2]
    if op == "compress_kv":
        return [r(2, 64, 2, 16), r(2, 64, 2, 16), r(2, 40, 2, 16), r(2, 40, 2, 16), r(2, 3, 2, 16), torch.tensor([1]),
                torch.tensor([4]), 8, 2, 4, 8]
    return [r(2, 40, 2, 16), r(2, 40, 2, 16), torch.tensor([[[0, 5, 1]], [[3, 5, 0]]], dtype=torch.int32),
            r(2, 5, 2, 16), r(2, 5, 2, 16)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CUDA-less error path")
@pytest.mark.parametrize("op", CUDA_OPS)
def test_cuda_wrapper_without_gpu_raises(op):
    _extension()
    wrapper = CUDA_WRAPPERS[op]
    with pytest.raises(RuntimeError, match=f"relaxkv {op}_cuda: no CUDA device available"):
        wrapper(*_wrapper_args(op))
