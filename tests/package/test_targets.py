"""The GPU targets (relaxkv_kernels/targets.py): the table, whether a build has code for a GPU, the one named error.

Pure functions of a capability tuple, so the rules a GPU user meets are checked here without one; the dispatch
test feeds a capability through torch's query. setup.py's default build must hold every target of the table.
"""
import re

import pytest
import torch

import setup
from relaxkv_kernels.availability import cuda_extension
from relaxkv_kernels.ops.gather_kv_rope.op import BACKENDS as GATHER_KV_ROPE_BACKENDS
from relaxkv_kernels.targets import TARGETS
from relaxkv_kernels.targets import UnsupportedGPUError
from relaxkv_kernels.targets import check_gpu
from relaxkv_kernels.targets import runs_on
from relaxkv_kernels.targets import target_of

KIB = 1024
DEFAULT_BUILD = ["sm_80", "sm_86", "sm_89", "sm_90a", "sm_100a", "sm_120", "compute_120"]


def test_the_table_names_six_targets_with_their_limits():
    assert [t.arch for t in TARGETS] == ["sm_80", "sm_86", "sm_89", "sm_90a", "sm_100a", "sm_120"]
    assert [t.smem_per_block // KIB for t in TARGETS] == [163, 99, 99, 227, 227, 99]
    assert [t.fp8_tensor_cores for t in TARGETS] == [False, False, True, True, True, True]
    assert all(t.regs_per_thread == 255 and t.regs_per_block == 64 * KIB for t in TARGETS)
    assert [t.arch for t in TARGETS if t.measured] == ["sm_90a"]  # the only GPU measured so far: an H100


def test_setup_builds_every_target_plus_ptx_of_the_newest(monkeypatch):
    assert setup.DEFAULT_ARCHS.split(";") == [t.gencode for t in TARGETS[:-1]] + [TARGETS[-1].gencode + "+PTX"]
    monkeypatch.delenv("RELAXKV_CUDA_ARCHS", raising=False)
    assert setup.cuda_archs() == DEFAULT_BUILD
    monkeypatch.setenv("RELAXKV_CUDA_ARCHS", "8.0, 90a")
    assert setup.cuda_archs() == ["sm_80", "sm_90a"]
    assert setup.gencode_flags(["sm_90a", "compute_120"]) == ["-gencode=arch=compute_90a,code=sm_90a",
                                                             "-gencode=arch=compute_120,code=compute_120"]


def test_the_built_extension_names_what_it_holds():
    """_C.cuda_archs: the cubins and PTX of the build, as runs_on reads them (the default build: every target)."""
    ext = cuda_extension()
    if ext is None:
        pytest.skip("relaxkv_kernels._C not built (no nvcc at install time)")
    archs = ext.cuda_archs.split(";")
    assert archs and all(re.fullmatch(r"(sm|compute)_\d+a?", a) for a in archs), archs


@pytest.mark.parametrize("capability, arch", [
    ((8, 0), "sm_80"), ((8, 6), "sm_86"), ((8, 7), "sm_86"), ((8, 9), "sm_89"), ((9, 0), "sm_90a"),
    ((10, 0), "sm_100a"), ((10, 3), "sm_100a"), ((12, 0), "sm_120"), ((12, 1), "sm_120"),
], ids=lambda x: str(x))
def test_target_of_takes_the_entry_or_the_newest_older_one(capability, arch):
    assert target_of(capability).arch == arch


@pytest.mark.parametrize("capability, archs, runs", [
    ((8, 9), ["sm_80", "sm_86"], True),  # a cubin runs on later minors of its major
    ((8, 0), ["sm_86"], False),  # not on earlier ones
    ((9, 0), ["sm_80", "sm_86", "sm_89"], False),  # nor on another major
    ((9, 0), ["sm_90a"], True),
    ((10, 3), ["sm_100a"], False),  # an "a" cubin only on its own capability
    ((10, 3), ["sm_90a", "compute_90"], True),  # PTX on its own capability and every later one
    ((8, 6), ["compute_90"], False),
    ((12, 0), DEFAULT_BUILD, True),
    ((13, 0), DEFAULT_BUILD, True),  # a future GPU JITs the sm_120 PTX
    ((9, 0), [], False),
], ids=lambda x: str(x) if isinstance(x, tuple) else None)
def test_runs_on(capability, archs, runs):
    assert runs_on(capability, archs) is runs


def test_every_target_runs_the_default_build():
    for t in TARGETS:
        assert check_gpu(t.capability, t.gpus, DEFAULT_BUILD) is t


def test_one_named_error_before_sm_80_or_without_the_gpus_code():
    with pytest.raises(UnsupportedGPUError, match=r"Tesla T4 \(sm_75\) is not supported: .* sm_80, sm_86"):
        check_gpu((7, 5), "Tesla T4", None)
    with pytest.raises(UnsupportedGPUError, match=r"no code for NVIDIA GeForce RTX 5090 \(sm_120\): built for "
                                                  r"sm_90a\. Rebuild it .*RELAXKV_CUDA_ARCHS=\"120\""):
        check_gpu((12, 0), "NVIDIA GeForce RTX 5090", ["sm_90a"])
    assert check_gpu((12, 0), "NVIDIA GeForce RTX 5090", None).arch == "sm_120"  # the extension not used


def test_op_dispatch_on_an_unsupported_gpu_raises_before_any_launch(fake_gpu):
    pytest.importorskip("triton")
    cuda = torch.device("cuda", 0)
    fake_gpu((7, 5), "Tesla T4")
    with pytest.raises(UnsupportedGPUError, match="Tesla T4"):
        GATHER_KV_ROPE_BACKENDS.resolve(cuda, "triton")
    assert GATHER_KV_ROPE_BACKENDS.resolve(cuda, "reference") == "reference"  # the reference runs anywhere
    fake_gpu((12, 0), "NVIDIA GeForce RTX 5090")
    assert GATHER_KV_ROPE_BACKENDS.resolve(cuda, "triton") == "triton"
