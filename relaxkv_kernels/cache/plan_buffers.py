"""The buffers a chunk's plan is uploaded into: its index tensors on the device, written by the host at
``begin_chunk``."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..memory import ChunkPlan
from ..memory.base import host_fields
from ..memory.base import uploaded_fields


def _refresh(old: torch.Tensor | None, values: list[int], device: torch.device) -> torch.Tensor:
    """``values`` as an int64 device tensor: copied into ``old`` in place when the shape holds (CUDA graphs)."""
    host = torch.tensor(values, dtype=torch.int64)
    if old is None or old.shape != host.shape:
        return host.to(device)
    return old.copy_(host, non_blocking=True)


@dataclass
class PlanBuffers:
    """The uploaded tensors of the current chunk's plan; tensors are reused in place while their shapes hold.

    Attributes:
        frame_slot, frame_pos: int64 [U] pool slot and temporal position of each chunk frame.
        window_slot: int64 [U] = 0 .. U-1, the chunk's slots in an attention window (the same every chunk).
        seg: int32 [n_tables, B, n_seg, 3] segment tables (one per layer for per-layer selection, else one).
        index: the plan's ``index`` record with int64 device tensors in place of its uploaded lists (its host
            fields as they are), or None.
    """

    frame_slot: torch.Tensor | None
    frame_pos: torch.Tensor | None
    window_slot: torch.Tensor
    seg: torch.Tensor
    index: object | None = None

    @classmethod
    def allocate(cls, n_tables: int, batch: int, n_seg: int, chunk_frames: int, device: torch.device) -> PlanBuffers:
        seg = torch.zeros(n_tables, batch, n_seg, 3, dtype=torch.int32, device=device)
        return cls(None, None, torch.arange(chunk_frames, device=device), seg)

    def upload(self, plan: ChunkPlan) -> tuple:
        """Copy ``plan`` to the device; returns the shapes of its index tensors, the ones that may change from chunk
        to chunk (a CUDA-graph replay needs them fixed; frame_slot, frame_pos and seg keep theirs)."""
        device = self.seg.device
        self.frame_slot = _refresh(self.frame_slot, plan.frame_slot, device)
        self.frame_pos = _refresh(self.frame_pos, plan.frame_pos, device)
        index, names = plan.index, () if plan.index is None else uploaded_fields(type(plan.index))
        if index is None:
            self.index = None
        elif type(self.index) is type(index):  # refreshed in place: the planner's steps keep their tensors
            for name in names:
                setattr(self.index, name, _refresh(getattr(self.index, name), getattr(index, name), device))
            for name in host_fields(type(index)):
                setattr(self.index, name, getattr(index, name))
        else:
            self.index = dataclasses.replace(index, **{name: _refresh(None, getattr(index, name), device)
                                                       for name in names})
        seg = torch.tensor(plan.segments, dtype=torch.int32)
        self.seg.copy_(seg.expand_as(self.seg), non_blocking=True)
        shapes = tuple((name, tuple(getattr(self.index, name).shape)) for name in names)
        return type(index).__name__, shapes
