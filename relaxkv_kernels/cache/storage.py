"""What a cache holds between chunks: the K/V pools, the per-frame prototypes and the policy's state."""
from __future__ import annotations

import torch

from ..memory import CacheGeometry
from ..memory import Planner
from ..ops.fp8 import is_fp8


def nbytes(*tensors: torch.Tensor | None) -> int:
    """Bytes of the given tensors (None entries skipped)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class KVStorage:
    """Pools, prototypes and policy state of every layer, sized once for the policy's steady state.

    Attributes:
        k, v: [num_layers, B, n_rows, H, D] in the pool dtype (``geometry.pool_dtype``): K rotated at its write-time
            position, V as is.
        k_scale, v_scale: float32 [num_layers, B, n_rows, H], one scale per row and head of FP8 pools
            (``relaxkv_kernels.ops.fp8``), else None.
        proto: float32 [B, n_slots, D], layer 0's mean pre-RoPE key per frame slot (policies that score
            frames), else None.
        state: the planner's device state (``Planner.allocate``), each tensor [num_layers, ...].
        layers: the (k, v) pools of each layer, [B, n_rows, H, D] views; scales: their (k_scale, v_scale) views,
            (None, None) for pools in the compute dtype.
    """

    def __init__(self, geometry: CacheGeometry, planner: Planner):
        g = geometry
        self.k = torch.empty(g.num_layers, g.batch, planner.n_rows, g.num_heads, g.head_dim, dtype=g.pool_dtype,
                             device=g.device)
        self.v = torch.empty_like(self.k)
        self.k_scale = self.v_scale = None
        if is_fp8(self.k):
            self.k_scale = torch.empty(self.k.shape[:-1], dtype=torch.float32, device=g.device)
            self.v_scale = torch.empty_like(self.k_scale)
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

    def nbytes(self) -> int:
        return self.pool_bytes() + nbytes(self.proto, *self.state.values())
