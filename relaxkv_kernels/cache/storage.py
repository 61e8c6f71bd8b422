"""What a cache holds between chunks: the K/V pools, the per-frame prototypes and the policy's state."""
from __future__ import annotations

import torch

from ..memory import CacheGeometry
from ..memory import Planner


def nbytes(*tensors: torch.Tensor | None) -> int:
    """Bytes of the given tensors (None entries skipped)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class KVStorage:
    """Pools, prototypes and policy state of every layer, sized once for the policy's steady state.

    Attributes:
        k, v: [num_layers, B, n_rows, H, D] in the storage dtype: K rotated at its write-time position, V as is.
        proto: float32 [B, n_slots, D], layer 0's mean pre-RoPE key per frame slot (policies that score
            frames), else None.
        state: the planner's device state (``Planner.allocate``), each tensor [num_layers, ...].
        layers: the (k, v) pools of each layer, [B, n_rows, H, D] views.
    """

    def __init__(self, geometry: CacheGeometry, planner: Planner):
        g = geometry
        self.k = torch.empty(g.num_layers, g.batch, planner.n_rows, g.num_heads, g.head_dim, dtype=g.dtype,
                             device=g.device)
        self.v = torch.empty_like(self.k)
        self.proto = None
        if planner.needs_prototypes:
            self.proto = torch.empty(g.batch, planner.n_slots, g.head_dim, dtype=torch.float32, device=g.device)
        self.state = planner.allocate(g)
        self.layers = list(zip(self.k.unbind(0), self.v.unbind(0)))  # (k, v) views per layer, made once

    def layer_state(self, layer: int) -> dict[str, torch.Tensor]:
        """The layer's slice of every state tensor."""
        return {name: t[layer] for name, t in self.state.items()}

    def row_bytes(self) -> int:
        """Bytes of one pool row of K and V over every layer."""
        return 2 * self.k.shape[0] * self.k.shape[1] * self.k.shape[3] * self.k.shape[4] * self.k.element_size()

    def nbytes(self) -> int:
        return nbytes(self.k, self.v, self.proto, *self.state.values())
