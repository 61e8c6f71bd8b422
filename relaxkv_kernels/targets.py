"""The NVIDIA GPUs the package is built and checked for: one table, and the rule for whether code runs on a GPU.

``TARGETS`` names each target once with the limits its kernels must fit (per block: shared memory a block may
opt in to, registers; per thread: registers) and whether it has FP8 tensor cores (e4m3 conversion in
hardware: Triton accepts ``fp8e4nv`` from sm_89; on sm_80 / sm_86 FP8 pools are decoded in software).
``setup.py`` builds the CUDA extension for every entry, ``benchmarks/reports/target_report.py`` compiles every Triton
launch for every entry, and the attention autotuner prunes its configs by the running GPU's entry.

Pure functions of a capability tuple (no GPU query), so the rules are tested on the CPU:

    >>> target_of((8, 9)).arch, target_of((8, 9)).fp8_tensor_cores
    ('sm_89', True)
    >>> runs_on((8, 9), ["sm_80", "sm_86"]), runs_on((9, 0), ["sm_80"]), runs_on((10, 3), ["sm_90a", "compute_90"])
    (True, False, True)
    >>> check_gpu((7, 5), "Tesla T4", None)
    Traceback (most recent call last):
    ...
    relaxkv_kernels.targets.UnsupportedGPUError: relaxkv: Tesla T4 (sm_75) is not supported: ...
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

KIB = 1024


class UnsupportedGPUError(RuntimeError):
    """The running GPU has no code here: older than sm_80, or missing from the CUDA extension's build."""


@dataclass(frozen=True)
class Target:
    """One GPU architecture the kernels are compiled and checked for.

    ``arch``: the cubin's name (``sm_90a``; Triton compiles capability >= 9.0 with the ``a`` suffix itself);
    ``gencode``: its entry of RELAXKV_CUDA_ARCHS; ``smem_per_block``: bytes of shared memory a block may opt in
    to (cudaDevAttrMaxSharedMemoryPerBlockOptin, what Triton's launcher checks); ``measured``: the GPUs of this
    target our benchmarks have run on ("" : compiled and checked only).
    """

    arch: str
    capability: tuple[int, int]
    gpus: str
    smem_per_block: int
    fp8_tensor_cores: bool
    measured: str = ""
    regs_per_thread: int = 255
    regs_per_block: int = 64 * KIB

    @property
    def gencode(self) -> str:
        return self.arch.removeprefix("sm_")


TARGETS = (  # CUDA C++ Programming Guide, "Technical Specifications per Compute Capability"
    Target("sm_80", (8, 0), "A100", 163 * KIB, fp8_tensor_cores=False),
    Target("sm_86", (8, 6), "A10, A40, RTX 3090, RTX A6000", 99 * KIB, fp8_tensor_cores=False),
    Target("sm_89", (8, 9), "L4, L40S, RTX 4090, RTX 6000 Ada", 99 * KIB, fp8_tensor_cores=True),
    Target("sm_90a", (9, 0), "H100, H200, GH200", 227 * KIB, fp8_tensor_cores=True, measured="H100 80GB HBM3"),
    Target("sm_100a", (10, 0), "B200, GB200", 227 * KIB, fp8_tensor_cores=True),
    Target("sm_120", (12, 0), "RTX 5090, RTX PRO 6000 Blackwell", 99 * KIB, fp8_tensor_cores=True),
)
OLDEST = TARGETS[0].capability


def _name(capability: tuple[int, int]) -> str:
    return f"sm_{capability[0]}{capability[1]}"


def target_of(capability: tuple[int, int]) -> Target:
    """The table entry whose limits govern a GPU of ``capability``: its own, else the newest older one (sm_87 ->
    sm_86, sm_103 -> sm_100a, sm_121 -> sm_120: the same or tighter limits). UnsupportedGPUError before sm_80."""
    if tuple(capability) < OLDEST:
        raise UnsupportedGPUError(f"relaxkv: {_name(capability)} is older than {_name(OLDEST)}, the oldest target")
    return [t for t in TARGETS if t.capability <= tuple(capability)][-1]


def runs_on(capability: tuple[int, int], archs: list[str]) -> bool:
    """Whether a binary holding ``archs`` (``sm_XY[a]`` cubins, ``compute_XY`` PTX) has code for ``capability``.

    A cubin runs on its own major version at the same or a higher minor (an ``a`` cubin only on its own
    capability); PTX is compiled by the driver for its own capability or any later one.
    """
    major, minor = capability
    for arch in archs:
        kind, _, number = arch.partition("_")
        specific = number.endswith("a")
        m, n = divmod(int(number.rstrip("a")), 10)
        if kind == "sm" and m == major and (n == minor if specific else n <= minor):
            return True
        if kind == "compute" and not specific and (m, n) <= (major, minor):
            return True
    return False


def check_gpu(capability: tuple[int, int], name: str, extension_archs: list[str] | None) -> Target:
    """The target of a GPU (``capability``, ``name``) that can run the package, else one UnsupportedGPUError.

    ``extension_archs``: what the CUDA extension holds (``_C.cuda_archs``), or None when it will not be used.
    """
    gpu = f"{name} ({_name(capability)})"
    if tuple(capability) < OLDEST:
        raise UnsupportedGPUError(
            f"relaxkv: {gpu} is not supported: the kernels target {', '.join(t.arch for t in TARGETS)} (compute "
            f"capability {OLDEST[0]}.{OLDEST[1]} or newer); use backend='reference' on this GPU")
    if extension_archs is not None and not runs_on(capability, extension_archs):
        raise UnsupportedGPUError(
            f"relaxkv: the CUDA extension relaxkv_kernels._C has no code for {gpu}: built for "
            f"{';'.join(extension_archs) or 'no GPU'}. Rebuild it with this GPU in RELAXKV_CUDA_ARCHS (e.g. "
            f"RELAXKV_CUDA_ARCHS=\"{capability[0]}{capability[1]}\" pip install --no-build-isolation -e .), "
            "or use backend='triton'")
    return target_of(capability)


@functools.cache
def device_target(index: int, with_extension: bool) -> Target:
    """:func:`check_gpu` for CUDA device ``index`` (a cached host query), the extension's build included when
    ``with_extension`` (and it is built)."""
    from .availability import cuda_extension

    ext = cuda_extension() if with_extension else None
    archs = None if ext is None else [a for a in ext.cuda_archs.split(";") if a]
    return check_gpu(torch.cuda.get_device_capability(index), torch.cuda.get_device_name(index), archs)


def require_gpu(device: torch.device, with_extension: bool) -> Target:
    """The target of CUDA ``device`` (:func:`device_target`); UnsupportedGPUError when the package cannot run there."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return device_target(index, with_extension)
