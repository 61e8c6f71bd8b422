"""What a cache holds between chunks: the K/V pools, the per-frame prototypes and the policy's state.

The pools live on the cache's device, or in host memory (``KVCache(pool_device="cpu")``). Host pools on a CUDA device
are page-locked and mapped (``cudaHostRegister``) and handed to the ops as CUDA tensors over the same memory
(:class:`_MappedHost`): a mapped allocation lies in the GPU's unified address space, so every kernel (Triton, the CUDA
extension, torch's own) reads and writes the rows in place over PCIe, with no copy and no host synchronisation, and
a captured chunk step replays as it would with device pools. On a CPU-only machine host pools are plain CPU tensors:
only the code path changes.
"""
from __future__ import annotations

import math
import os

import torch

from ..memory import CacheGeometry
from ..memory import Planner
from ..ops.fp8 import FP8_DTYPES


class HostMemoryError(MemoryError):
    """Host pools asked for more than the machine has available, or their allocation (or page-locking) failed."""


def nbytes(*tensors: torch.Tensor | None) -> int:
    """Bytes of the given tensors (None entries skipped)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def available_host_bytes() -> int:
    """Host memory available to new allocations: ``MemAvailable`` of /proc/meminfo (Linux), else the free
    physical pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


_REGISTER_PORTABLE_MAPPED = 1 | 2  # cudaHostRegisterPortable | cudaHostRegisterMapped


class _MappedHost:
    """A host tensor's memory, page-locked and mapped for the GPU with ``cudaHostRegister``, seen as CUDA memory
    through ``__cuda_array_interface__``; unregistered when the last tensor over it goes.

    Registered rather than allocated with ``pin_memory=True``: torch's pinned allocator rounds every block up to a
    power of two (a 6.7 GiB pool would pin 8 GiB). With unified addressing a registered pointer is valid in device
    code as it is (the GPU's ``cudaDevAttrCanUseHostPointerForRegisteredMem``, set on 64-bit Linux platforms).
    """

    def __init__(self, host: torch.Tensor):
        self.host = host  # owns the memory for as long as a device tensor over it lives
        self.__cuda_array_interface__ = {"shape": (host.numel() * host.element_size(),), "typestr": "|u1",
                                         "data": (host.data_ptr(), False), "version": 2, "strides": None}

    @classmethod
    def register(cls, host: torch.Tensor) -> _MappedHost:
        """``host``'s memory page-locked and mapped (RuntimeError naming the CUDA error when that fails)."""
        cudart = torch.cuda.cudart()
        err = cudart.cudaHostRegister(host.data_ptr(), host.numel() * host.element_size(), _REGISTER_PORTABLE_MAPPED)
        if err != cudart.cudaError.success:
            raise RuntimeError(f"cudaHostRegister failed: {err}")
        return cls(host)

    def __del__(self):
        torch.cuda.cudart().cudaHostUnregister(self.host.data_ptr())

    def device_tensor(self, device: torch.device) -> torch.Tensor:
        """A tensor on CUDA ``device`` over the host tensor's memory (same shape and dtype, no copy)."""
        flat = torch.as_tensor(self, device=device)  # uint8 bytes: the interface has no bf16 / FP8 type
        return flat.view(self.host.dtype).view(self.host.shape)


def _allocate_host(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor | _MappedHost:
    """One host pool for a cache on ``device``: page-locked and mapped on CUDA, a plain CPU tensor elsewhere."""
    host = torch.empty(shape, dtype=dtype)
    if device.type != "cuda":
        return host
    with torch.cuda.device(device):  # the mapping's device: where the device tensors will be
        return _MappedHost.register(host)


def _host_pools(shapes: list[tuple[tuple[int, ...], torch.dtype]], device: torch.device
                ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Empty host tensors of ``shapes`` for the pools of a cache on ``device``, as the ops see them (page-locked and
    mapped on CUDA, :class:`_MappedHost`; plain CPU tensors on a CPU; meta tensors on meta, for bytes only), and the
    page-locked host tensors behind them (CUDA only, else empty).

    The bytes are checked against the available host memory first; a failed allocation or page-locking frees
    what was allocated before it. Both raise :class:`HostMemoryError` with the bytes asked and available.
    """
    if device.type == "meta":
        return [torch.empty(shape, dtype=dtype, device="meta") for shape, dtype in shapes], []
    asked = sum(math.prod(shape) * dtype.itemsize for shape, dtype in shapes)
    available = available_host_bytes()
    gib = 2 ** 30
    if asked > available:
        raise HostMemoryError(f"KVCache: pool_device='cpu': the K/V pools need {asked / gib:.2f} GiB ({asked} bytes) "
                              f"of host memory, {available / gib:.2f} GiB ({available} bytes) are available: use "
                              "FP8 pools (kv_dtype=torch.float8_e4m3fn), a smaller batch, or a machine with more RAM")
    pinned = device.type == "cuda"
    out = []
    try:
        for shape, dtype in shapes:
            out.append(_allocate_host(shape, dtype, device))
    except RuntimeError as exc:  # out of memory, or page-locking refused (limited by the OS, e.g. in containers)
        out.clear()  # freed (and unregistered) now, not when the traceback goes
        raise HostMemoryError(f"KVCache: pool_device='cpu': allocating {asked / gib:.2f} GiB ({asked} bytes) of "
                              f"{'page-locked ' if pinned else ''}host memory failed with {available / gib:.2f} GiB "
                              f"({available} bytes) available: "
                              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
                              ) from None
    if not pinned:
        return out, []
    with torch.cuda.device(device):
        return [m.device_tensor(device) for m in out], [m.host for m in out]


class KVStorage:
    """Pools, prototypes and policy state of every layer, sized once for the policy's steady state.

    Args:
        geometry, planner: the cache's. host: the pools and their scales in host memory (see the module docstring).

    Attributes:
        k, v: [num_layers, B, n_rows, H, D] in the pool dtype (``geometry.pool_dtype``): K rotated at its write-time
            position, V as is. On the device, or with ``host`` in host memory (on CUDA: the device view of pinned
            memory).
        k_scale, v_scale: float32 [num_layers, B, n_rows, H], one scale per row and head of FP8 pools
            (``relaxkv_kernels.ops.fp8``), else None; where the pools are.
        host: the pools are in host memory. pinned: the page-locked host tensors behind the pools and scales (CUDA
            with ``host``), else empty.
        proto: float32 [B, n_slots, D], layer 0's mean pre-RoPE key per frame slot (policies that score
            frames), else None.
        state: the planner's device state (``Planner.allocate``), each tensor [num_layers, ...].
        layers: the (k, v) pools of each layer, [B, n_rows, H, D] views; scales: their (k_scale, v_scale) views,
            (None, None) for pools in the compute dtype.
    """

    def __init__(self, geometry: CacheGeometry, planner: Planner, host: bool = False):
        g = geometry
        shape = (g.num_layers, g.batch, planner.n_rows, g.num_heads, g.head_dim)
        shapes = [(shape, g.pool_dtype)] * 2
        if g.pool_dtype in FP8_DTYPES:
            shapes += [(shape[:-1], torch.float32)] * 2
        self.host, self.pinned = host, []
        if host:  # first: a request that does not fit fails before anything else is allocated
            pools, self.pinned = _host_pools(shapes, g.device)
        else:
            pools = [torch.empty(shape, dtype=dtype, device=g.device) for shape, dtype in shapes]
        self.k, self.v, self.k_scale, self.v_scale = (*pools, None, None)[:4]
        self.proto = None
        if planner.needs_prototypes:
            self.proto = torch.empty(g.batch, planner.n_slots, g.head_dim, dtype=torch.float32, device=g.device)
        self.state = planner.allocate(g)
        self.layers = list(zip(self.k.unbind(0), self.v.unbind(0)))  # (k, v) views per layer, made once
        self.scales = ([(None, None)] * g.num_layers if self.k_scale is None
                       else list(zip(self.k_scale.unbind(0), self.v_scale.unbind(0))))

    @property
    def fp8(self) -> bool:
        """The pools hold FP8 codes with scales."""
        return self.k_scale is not None

    @property
    def direct(self) -> bool:
        """The attention engines can read the pools as they are: in the compute dtype, on the device."""
        return not (self.fp8 or self.host)

    def layer_state(self, layer: int) -> dict[str, torch.Tensor]:
        """The layer's slice of every state tensor."""
        return {name: t[layer] for name, t in self.state.items()}

    def row_bytes(self) -> int:
        """Bytes of one pool row of K and V over every layer (their scales included)."""
        layers, batch, _, heads, dim = self.k.shape
        per_head = dim * self.k.element_size() + (self.k_scale.element_size() if self.fp8 else 0)
        return 2 * layers * batch * heads * per_head

    def pool_bytes(self) -> int:
        """Bytes of the K/V pools and their scales."""
        return nbytes(self.k, self.v, self.k_scale, self.v_scale)

    def host_bytes(self) -> int:
        """Bytes in host memory: the pools and their scales when they are there, else 0."""
        return self.pool_bytes() if self.host else 0

    def nbytes(self) -> int:
        return self.pool_bytes() + nbytes(self.proto, *self.state.values())
