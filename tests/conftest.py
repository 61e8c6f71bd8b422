"""Test setup: Triton interpreter on CPU-only machines, NaN-poisoned allocations inside the package, the
tiers of the csrc/ kernel tests.

Every ``torch.empty*`` called from package code (``relaxkv_kernels``) returns memory filled with NaN
(floating dtypes) or with an out-of-range sentinel (integer dtypes), so a kernel that forgets to write
part of its output fails its comparison instead of passing on leftover zeros.

Tiers: reference and Triton (interpreter) tests run everywhere; ``kernel_device`` runs a csrc kernel test
on the GPU (marker ``gpu``, skipped without one) and emulated on the CPU (tests/cuda_emu/). Markers:
``gpu``, ``csrc`` (runs csrc kernels), ``cuda_graph`` (captures a graph). Shared helpers: tests/helpers.py.
"""
import functools
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is imported

from helpers import INT_POISON  # noqa: E402  (tests/ is on sys.path: this file's directory)

_PACKAGES = ("relaxkv_kernels", "relaxkv_gen")


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point() or t.is_complex():
        return t.fill_(float("nan"))
    if t.dtype != torch.bool:
        return t.fill_(INT_POISON)
    return t


def _poisoning(fn):
    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        if torch.compiler.is_compiling():
            return out
        caller = sys._getframe(1).f_globals.get("__name__", "")
        is_fake = isinstance(out, torch._subclasses.FakeTensor)
        if caller.startswith(_PACKAGES) and not is_fake and out.device.type != "meta":
            _poison(out)
        return out

    return wrapper


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    """Fill package-made torch.empty* allocations with NaN for every test."""
    for name in ("empty", "empty_like", "empty_strided"):
        monkeypatch.setattr(torch, name, _poisoning(getattr(torch, name)))
    yield


@pytest.fixture(autouse=True)
def fresh_backend_environment():
    """Every test starts by reading RELAXKV_BACKEND* afresh (the package reads them once: ``environment_backend``)."""
    from relaxkv_kernels.ops.dispatch import environment_backend

    environment_backend.cache_clear()


@pytest.fixture
def backend_env(monkeypatch):
    """``backend_env(name, value)``: the environment variable ``name`` (a RELAXKV_BACKEND*) set to ``value`` for this
    test (``value`` None: unset), read again by the next op call."""
    from relaxkv_kernels.ops.dispatch import environment_backend

    def set_env(name: str, value: str | None) -> None:
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
        environment_backend.cache_clear()

    return set_env


def pytest_configure(config):
    config.addinivalue_line("markers", "csrc: runs the csrc/ CUDA kernels (on the GPU, or emulated on the CPU)")
    config.addinivalue_line("markers", "cuda_graph: captures a CUDA graph (needs PyTorch's caching allocator)")


@functools.cache
def _emulated_runtime():
    from cuda_emu import emulator

    return emulator.EmulatedRuntime(emulator.load(emulator.build()))


@pytest.fixture(params=[pytest.param("gpu", marks=[pytest.mark.gpu, pytest.mark.csrc]),
                        pytest.param("emulated", marks=pytest.mark.csrc)])
def kernel_device(request, monkeypatch) -> str:
    """Where a test of the csrc/ kernels runs: ``"cuda"`` (relaxkv_kernels._C on the GPU) or ``"cpu"``.

    ``"cpu"`` runs the same launchers and kernels compiled for the CPU emulation of tests/cuda_emu/
    (built once per session). Both tiers are advertised, so a missing tool fails the test with what to
    install: no g++ or pybind11 (emulated), no built extension on a GPU machine (unless the install
    skipped it on purpose, RELAXKV_SKIP_CUDA_BUILD=1). Without a GPU the gpu tier is skipped (see
    pytest_collection_modifyitems).
    """
    if request.param == "gpu":
        from relaxkv_kernels.availability import cuda_extension

        if cuda_extension() is None:
            if os.environ.get("RELAXKV_SKIP_CUDA_BUILD") == "1":
                pytest.skip("relaxkv_kernels._C not built (RELAXKV_SKIP_CUDA_BUILD=1)")
            pytest.fail("relaxkv_kernels._C is not built: install with nvcc on PATH (pip install "
                        "--no-build-isolation -e .), or set RELAXKV_SKIP_CUDA_BUILD=1 to skip the GPU kernel tier",
                        pytrace=False)
        return "cuda"
    from cuda_emu import emulator

    missing = emulator.missing_tools()
    if missing:
        pytest.fail(f"emulated CUDA kernel tests need {' and '.join(missing)}", pytrace=False)
    from relaxkv_kernels.ops import cuda_common

    monkeypatch.setattr(cuda_common, "runtime", _emulated_runtime())
    return "cpu"


@pytest.fixture
def fake_gpu(monkeypatch):
    """``fake_gpu(capability, name)``: torch reports one CUDA device of that capability and name (no GPU needed), for
    the rules of relaxkv_kernels.targets (dispatch, KVCache) that read it."""
    from relaxkv_kernels import targets

    def set_gpu(capability: tuple[int, int], name: str) -> None:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: name)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        targets.device_target.cache_clear()

    yield set_gpu
    targets.device_target.cache_clear()


def pytest_collection_modifyitems(config, items):
    """GPU tests are skipped cleanly when no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
