"""Self-test of the CUDA emulation (emulator.py): its semantics are CUDA's and its checks fire.

selftest.cu (next to this file) holds small kernels and one launch (or a few) per case. It is translated and
compiled into an executable once per module, then run once per case: ``selftest CASE`` prints the
launch's cudaGetLastError() (name and message), cudaGetLastError() again (it must be reset by the first
read) and the case's result.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from cuda_emu import emulator

SELFTEST = Path(__file__).resolve().parent / "selftest.cu"


@pytest.fixture(scope="module")
def selftest(tmp_path_factory) -> Path:
    """selftest.cu, translated and compiled with the flags of the emulated extension (no compiler: an error)."""
    if emulator.compiler() is None:
        pytest.fail("CUDA emulation self-test: no C++ compiler (g++ not on PATH; set $CXX)", pytrace=False)
    out = tmp_path_factory.mktemp("cuda_emu")
    src = out / "selftest.cu"
    src.write_text(emulator.translate(SELFTEST.read_text()))
    return emulator.compile_cuda(src, out / "selftest")


def run_case(exe: Path, case: str) -> tuple[str, str, str]:
    """(error name, error message, result) of one case. A hang or a crash fails the test."""
    res = subprocess.run([str(exe), case], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, f"selftest {case}: exit status {res.returncode}\n{res.stderr}"
    fields = dict(line.split(": ", 1) for line in res.stdout.splitlines())
    assert fields["after"] == "cudaSuccess", "cudaGetLastError() did not reset the error it returned"
    return fields["error"], fields["message"], fields["result"]


def numbers(result: str) -> list[float]:
    return [float(x) for x in result.split()]


def _indices() -> list[int]:
    """Per global id (CUDA's linear order), blockIdx, threadIdx, gridDim, blockDim; then the write count."""
    out = []
    for block in range(3 * 2 * 2):
        for t in range(8 * 5):
            out += [block % 3, block // 3 % 2, block // 6, t % 8, t // 8, 0, 3, 2, 2, 8, 5, 1]
    return out + [3 * 2 * 2 * 8 * 5]


def _warp_sums(x) -> list[float]:
    return [sum(x[i - i % 32 : i - i % 32 + 32]) for i in range(len(x))]


def _ring(lo: int, hi: int) -> list[int]:
    """early_exit_kernel: threads in [lo, hi) read their neighbour's neighbour times 10; the rest write nothing."""
    return [10 * ((t - lo + 2) % (hi - lo)) if lo <= t < hi else -1 for t in range(64)]


LANES = [1.5 * i + 0.25 for i in range(32)]
SCAN_IN = [((i + 1) << 32) + i for i in range(64)]  # 64-bit values: a shuffle must move all 8 bytes

SEMANTICS = {
    # 3-D grid of 2-D blocks of 40 threads: every global id written once, with the right indices
    "indices": _indices(),
    # templated kernel, 4-argument launch with a stream, tree reduction through shared memory + barriers
    "block_sum": [sum(range(256 * b, 256 * b + 256)) for b in range(3)],
    # __shfl_xor_sync butterfly: every lane holds its warp's sum (two warps per block, two blocks)
    "warp_sum": _warp_sums(range(128)),
    # __shfl_up_sync inclusive scan of int64 per warp
    "shfl_up_scan": [sum(SCAN_IN[i - i % 32 : i + 1]) for i in range(64)],
    # __shfl_sync of doubles: broadcast from lane 5, from lane 31 - lane, from lane + 33 (wraps modulo 32)
    "shfl": [LANES[5]] * 32 + LANES[::-1] + LANES[1:] + LANES[:1],
    # __shfl_up_sync / __shfl_down_sync by 3: lanes without a source keep their own value
    "shfl_up_down": LANES[:3] + LANES[:-3] + LANES[3:] + LANES[-3:],
    # threads 40..63 return before the three barriers that threads 0..39 reach (legal, completes)
    "early_exit_high": _ring(0, 40),
    # threads 0..23 return first, the rest then reach the barriers
    "early_exit_low": _ring(24, 64),
    # each of 3 blocks reads shared memory before writing zeros to it: all 0xff bytes, never the zeros
    "smem_repoison": [-1] * 96,
    # no barrier between a write and a neighbour's read: block 0 runs its threads in order (every read
    # but the last comes first: poison), block 1 in reverse (the read of slot 0 comes first): the race shows
    "missing_barrier": [-1] * 31 + [0] + list(range(1, 32)) + [-1],
}


@pytest.mark.parametrize("case", sorted(SEMANTICS))
def test_semantics(selftest, case):
    """Indices, barriers, shuffles, early exits and shared-memory poisoning behave as CUDA specifies."""
    error, message, result = run_case(selftest, case)
    assert (error, message) == ("cudaSuccess", "no error")
    assert numbers(result) == SEMANTICS[case]


def test_atomic_add_from_many_threads(selftest):
    """1024 threads atomicAdd 1.0 to one float: the sum is exact and each thread saw a distinct old value."""
    error, _, result = run_case(selftest, "atomic_add")
    total, *old = numbers(result)
    assert error == "cudaSuccess"
    assert total == 1024
    assert sorted(old) == list(range(1024))


def test_failed_launch_leaves_no_state(selftest):
    """After a failed launch whose error was read, the next launch runs normally and reports success."""
    error, _, result = run_case(selftest, "recover")
    first, *sums = result.split()
    assert first == "cudaErrorLaunchFailure"
    assert error == "cudaSuccess"
    assert [float(s) for s in sums] == _warp_sums(range(128))


def test_error_persists_until_read(selftest):
    """A launch error survives a later successful launch until cudaGetLastError() reads it."""
    error, message, result = run_case(selftest, "error_persists")
    assert error == "cudaErrorInvalidConfiguration"
    assert "block 2048x1x1" in message
    assert result == "1"  # the second launch ran


LAUNCH_FAILURES = {
    # two different call sites (the (?!\1 ) asserts different lines)
    "divergent_sync": r"divergent __syncthreads\(\): \S*selftest\.cu:(\d+) and \S*selftest\.cu:(?!\1 )\d+ in the same",
    "partial_warp": r"warp shuffle at \S*selftest\.cu:\d+ needs a full warp .*\(warp of 16 lanes",  # blockDim 48
    "partial_mask": r"needs a full warp .* mask 0xffffffff .*mask 0xffff,",  # a legal CUDA mask, not emulated
    "shfl_width": r"needs a full warp .* width 32 .*width 16\)",
    "lane_exit": r"a lane exited while the rest of its warp waited in a shuffle",
    "hang": r"hang in block \(0, 0, 0\): 16 of 32 threads wait at __syncthreads\(\) \S*selftest\.cu:\d+; "
    r"warp 0: 16 of 32 lanes wait at \S*selftest\.cu:\d+",
    "smem_overrun": r"block \(0, 0, 0\) wrote past its 124 bytes of dynamic shared memory",
    "exception": r"exception in a kernel: thrown by thread 5",
    "exception_not_std": r"exception in a kernel \(not a std::exception\)",
}


@pytest.mark.parametrize("case", sorted(LAUNCH_FAILURES))
def test_launch_failure_detected(selftest, case):
    """Each misuse fails the launch with a message naming it, at once (no hang, no crash)."""
    error, message, _ = run_case(selftest, case)
    assert error == "cudaErrorLaunchFailure"
    assert message.startswith("emulated kernel failed: ")
    assert re.search(LAUNCH_FAILURES[case], message), message


INVALID_CONFIGURATIONS = {
    "config_threads": "block 2048x1x1",
    "config_grid_y": "grid 1x65536x1",
    "config_smem": f"{227 * 1024 + 1} bytes of dynamic shared memory",
}


@pytest.mark.parametrize("case", sorted(INVALID_CONFIGURATIONS))
def test_invalid_configuration(selftest, case):
    """A launch beyond the device limits is refused before any thread runs."""
    error, message, result = run_case(selftest, case)
    assert error == "cudaErrorInvalidConfiguration"
    assert message.startswith(f"invalid launch configuration: {INVALID_CONFIGURATIONS[case]}"), message
    assert result == "0"  # the kernel did not run


@pytest.mark.parametrize(
    "source, expected",
    [
        (
            "k<T, 4, true><<<dim3(a, b), 128, smem, stream>>>(p, f);",
            "::relaxkv_emu::Launch(dim3(a, b), 128, smem, stream).run(k<T, 4, true>, p, f);",
        ),
        ("k<<<1, 32>>>(x);", "::relaxkv_emu::Launch(1, 32).run(k, x);"),
        ("ns::k<<<1, 32>>>();", "::relaxkv_emu::Launch(1, 32).run(ns::k);"),
        ("k\n    <<<grid, dim3(x, y), 0, s>>>(p, g(q));",
         "::relaxkv_emu::Launch(grid, dim3(x, y), 0, s).run(k, p, g(q));"),
        ("extern __shared__ float buf[];", "float* buf = ::relaxkv_emu::dynamic_shared<float>();"),
        ("extern __shared__ alignas(16) int64_t s[];", "int64_t* s = ::relaxkv_emu::dynamic_shared<int64_t>();"),
    ],
)
def test_translate(source, expected):
    assert emulator.translate(source) == expected


@pytest.mark.parametrize(
    "source", ["__shared__ float x[4];", "extern __shared__ unsigned char raw[];", "k<A<B>><<<1, 32>>>(x);"]
)
def test_translate_rejects_what_it_cannot_rewrite(source):
    with pytest.raises(ValueError, match="that the rewrites do not cover is left"):
        emulator.translate(source)
