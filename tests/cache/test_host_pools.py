"""KVCache with the K/V pools in host memory (``pool_device="cpu"``): the same outputs and selections as device pools.

On a CPU-only machine host pools are plain CPU tensors, so what these tests check is the code path: every chunk
stages (no pool-prefix attention, which reads the pools with the engines), the bytes are split by place, bad
requests fail before anything is allocated. On a GPU (tests/cache/test_gpu_step.py) the pools are page-locked and the
kernels read them in place through unified addressing.

- Every policy (dense, sink with re-rotation, Relax, Pack, a user's device-step policy), every attention mode, pools
  in the compute dtype and FP8, the reference backend and the Triton kernels (interpreter): outputs bitwise equal
  to the same cache with device pools over 9 chunks (past Relax's first selections and Pack's first compressed
  blocks), the segment tables equal at every chunk, the pools' held rows equal.
- ``device_bytes() + host_bytes() == memory_bytes()``, the pools counted on the host.
- Too little host memory, a failed allocation, a pool_device that is neither the device nor the host: named errors
  with nothing left allocated.
"""
import gc
import weakref

import pytest
import torch
from test_custom_policy import SinkNearest

import relaxkv_kernels as rk
from relaxkv_kernels.cache import storage as storage_module
from relaxkv_kernels.cache.storage import HostMemoryError

from helpers import FP8
from helpers import close
from helpers import held_rows
from helpers import run_side_by_side

POLICIES = {
    "dense": lambda: rk.DenseWindow(window=9),
    "sink-rerotate": lambda: rk.DenseWindow(window=9, sink=3, rerotate=True),
    "relax": lambda: rk.RelaxMemory(reservoir=30),
    "pack": lambda: rk.PackMemory(top_k=1, archive=3, q_stride=2),
    "custom": lambda: SinkNearest(by_query=True),
}
L, B, H, D, HH, WW = 2, 2, 2, 16, 4, 4


def _side_by_side(name: str, chunks: int = 9, passes: int = 2, dtype=torch.float32, **kw):
    """Device-pool and host-pool caches of ``name`` fed the same inputs; asserts equal outputs and tables at every
    call and chunk; returns both caches.

    Bitwise equal, except where the device-pool cache attends to its pools in place (the pool-prefix chunks of a
    dense window in the compute dtype, window and per_call modes): the host-pool cache stages those keys in the
    window's order [chunk | memory] instead of the pool's, so the softmax sums in another order (fp32 rounding).
    """
    caches = [rk.KVCache(POLICIES[name](), L, B, H, D, HH, WW, dtype=dtype, pool_device=where, **kw)
              for where in (None, "cpu")]
    mode = caches[0].attention_mode
    in_place = mode.name == "pool_prefix" or getattr(mode, "prefix", None) is not None

    def check(got, want, chunk, layer):
        if in_place and caches[0].active_mode.name == "pool_prefix":
            close(got, want, dtype, f"{name} chunk {chunk} layer {layer}")
        else:
            assert torch.equal(got, want), (name, chunk, layer)

    run_side_by_side(caches, chunks, passes, dtype, seed=5, check=check)
    return caches


def _assert_same_pools(device, host) -> None:
    rows = held_rows(device)
    for a, b in ((device.storage.k, host.storage.k), (device.storage.v, host.storage.v),
                 (device.storage.k_scale, host.storage.k_scale), (device.storage.v_scale, host.storage.v_scale)):
        if a is not None:
            assert torch.equal(a[:, :, rows].view(torch.uint8), b[:, :, rows].view(torch.uint8))


CASES = ([(name, "window", kv) for name in POLICIES for kv in (None, FP8)]  # the mode host pools are made for
         + [(name, "per_call", kv) for name in ("dense", "pack") for kv in (None, FP8)]
         + [(name, "segments", None) for name in ("relax", "custom")])


@pytest.mark.parametrize("name, attention, kv_dtype", CASES, ids=[
    f"{name}-{attention}-{'fp8' if kv else 'same'}" for name, attention, kv in CASES])
def test_host_pools_give_the_outputs_of_device_pools(name, attention, kv_dtype):
    device, host = _side_by_side(name, backend="reference", attention=attention, kv_dtype=kv_dtype)
    _assert_same_pools(device, host)
    assert device.last_plan.selects == (name not in ("dense", "sink-rerotate"))  # past the first selections
    assert host.storage.host and not device.storage.host
    if attention != "segments":  # the engines never read host pools: every chunk stages, none attends to the pool
        assert host.active_mode.name == attention


@pytest.mark.interpreter
@pytest.mark.parametrize("name, attention, kv_dtype", [("dense", "window", None), ("relax", "window", FP8),
                                                       ("relax", "segments", None)])
def test_host_pools_with_the_triton_kernels(name, attention, kv_dtype):
    """fp16 compute (the interpreter's bf16 is broken), one pass per chunk, 6 chunks (past Relax's first selection):
    the fused backend on host pools (a dense window staged where device pools are read in place; staging and the
    quantizing window commit on FP8 pools; the segment-table kernel). Pack's compress_kv on FP8 pools is the
    reference's in tests/cache/test_fp8_cache.py, and Pack on host pools in the reference test above."""
    device, host = _side_by_side(name, chunks=6, passes=1, dtype=torch.float16, backend="fused",
                                 attention=attention, kv_dtype=kv_dtype)
    _assert_same_pools(device, host)


@pytest.mark.parametrize("kv_dtype", [None, FP8], ids=["same", "fp8"])
@pytest.mark.parametrize("name", list(POLICIES))
def test_bytes_are_split_by_place(name, kv_dtype):
    """Meta tensors as on CUDA (window mode): the pools and their scales are the host bytes, the rest the device's."""
    kw = dict(dtype=torch.bfloat16, device="meta", attention="window", kv_dtype=kv_dtype)
    device = rk.KVCache(POLICIES[name](), L, B, H, D, HH, WW, **kw)
    host = rk.KVCache(POLICIES[name](), L, B, H, D, HH, WW, pool_device="cpu", **kw)
    assert device.host_bytes() == 0 and device.device_bytes() == device.memory_bytes()
    assert host.host_bytes() == host.pool_bytes() == device.pool_bytes() > 0
    assert host.device_bytes() + host.host_bytes() == host.memory_bytes()
    assert host.device_bytes() == host.memory_bytes() - device.pool_bytes()
    if name == "dense" and kv_dtype is None:  # windows where the device pools were read directly
        assert host.device_bytes() > device.device_bytes() - device.pool_bytes()


def test_host_pools_that_do_not_fit_fail_before_any_allocation(monkeypatch):
    made = []
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: made.append(1) or real_empty(*a, **k))
    monkeypatch.setattr(storage_module, "available_host_bytes", lambda: 1000)
    with pytest.raises(HostMemoryError, match=r"KVCache: pool_device='cpu': the K/V pools need 0\.00 GiB \(\d+ "
                                              r"bytes\) of host memory, 0\.00 GiB \(1000 bytes\) are available"):
        rk.KVCache(rk.RelaxMemory(reservoir=30), L, B, H, D, HH, WW, dtype=torch.float32, pool_device="cpu")
    assert not made


def test_a_failed_host_allocation_frees_what_it_allocated(monkeypatch):
    """The third pool (the K scales of FP8 pools) fails: the two allocated before it are freed, one named error."""
    alive = []
    allocate = storage_module._allocate_host

    def failing(*args):
        if len(alive) == 2:
            raise RuntimeError("cudaHostRegister failed: cudaError.memoryAllocation\nmore lines")
        t = allocate(*args)
        alive.append(weakref.ref(t))
        return t

    monkeypatch.setattr(storage_module, "_allocate_host", failing)
    with pytest.raises(HostMemoryError, match=r"allocating 0\.00 GiB \(\d+ bytes\) of host memory failed with .* "
                                              r"available: cudaHostRegister failed: cudaError.memoryAllocation$"):
        rk.KVCache(rk.PackMemory(top_k=1, archive=3), L, B, H, D, HH, WW, dtype=torch.float32, pool_device="cpu",
                   kv_dtype=FP8)
    gc.collect()
    assert len(alive) == 2 and all(ref() is None for ref in alive)


@pytest.mark.parametrize("pool_device, match", [
    ("meta", "expected None \\(the pools on cpu\\) or 'cpu' \\(host memory\\), got 'meta'"),
    ("gpu", "expected None or 'cpu', got 'gpu'"),
    (3.5, "expected None or 'cpu', got 3.5"),
])
def test_a_pool_device_that_is_neither_the_device_nor_the_host_is_a_named_error(pool_device, match):
    with pytest.raises(ValueError, match=f"KVCache: pool_device: {match}"):
        rk.KVCache(rk.RelaxMemory(), L, B, H, D, HH, WW, pool_device=pool_device)


def test_device_names_are_compared_as_torch_places_tensors():
    """``cpu:0`` is where torch puts CPU tensors (``cpu``): a cache made with it takes them (diffusers' CPU offload
    hands it such a device)."""
    cache = rk.KVCache(rk.RelaxMemory(reservoir=30), L, B, H, D, HH, WW, dtype=torch.float32, device="cpu:0",
                       pool_device="cpu:0")
    assert cache.device == torch.device("cpu") and cache.storage.host
    cache.begin_chunk()
    x = torch.randn(B, cache.policy.chunk_frames * HH * WW, H, D)
    for layer in range(L):
        assert cache.attend(layer, x, x, x).shape == x.shape
    cache.end_chunk()
