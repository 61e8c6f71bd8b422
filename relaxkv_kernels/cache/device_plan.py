"""The plan of a chunk on the device: its index tensors, uploaded by the host at ``begin_chunk``."""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from ..memory import ChunkPlan


def _refresh(old: torch.Tensor | None, values: list[int], device: torch.device) -> torch.Tensor:
    """``values`` as an int64 device tensor: copied into ``old`` in place when the shape holds (CUDA graphs)."""
    host = torch.tensor(values, dtype=torch.int64)
    if old is None or old.shape != host.shape:
        return host.to(device)
    return old.copy_(host, non_blocking=True)


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


@dataclass
class DevicePlan:
    """The uploaded tensors of the current chunk's plan; tensors are reused in place while their shapes hold.

    Attributes:
        frame_slot, frame_pos: int64 [U] pool slot and temporal position of each chunk frame.
        window_slot: int64 [U] = 0 .. U-1, the chunk's slots in an attention window (the same every chunk).
        seg: int32 [n_tables, B, n_seg, 3] segment tables (one per layer for per-layer selection, else one).
        index: the plan's ``index`` dataclass with int64 device tensors in place of its lists, or None.
    """

    frame_slot: torch.Tensor | None
    frame_pos: torch.Tensor | None
    window_slot: torch.Tensor
    seg: torch.Tensor
    index: object | None = None

    @classmethod
    def allocate(cls, n_tables: int, batch: int, n_seg: int, chunk_frames: int, device: torch.device) -> DevicePlan:
        seg = torch.zeros(n_tables, batch, n_seg, 3, dtype=torch.int32, device=device)
        return cls(None, None, torch.arange(chunk_frames, device=device), seg)

    def upload(self, plan: ChunkPlan) -> tuple:
        """Copy ``plan`` to the device; returns the shapes of its index tensors, the ones that may change from chunk
        to chunk (a CUDA-graph replay needs them fixed; frame_slot, frame_pos and seg keep theirs)."""
        device = self.seg.device
        self.frame_slot = _refresh(self.frame_slot, plan.frame_slot, device)
        self.frame_pos = _refresh(self.frame_pos, plan.frame_pos, device)
        if plan.index is None:
            self.index = None
        elif type(self.index) is type(plan.index):  # refreshed in place: the planner's steps keep their tensors
            for name in _field_names(type(plan.index)):
                setattr(self.index, name, _refresh(getattr(self.index, name), getattr(plan.index, name), device))
        else:
            self.index = type(plan.index)(**{name: _refresh(None, getattr(plan.index, name), device)
                                             for name in _field_names(type(plan.index))})
        seg = torch.tensor(plan.segments, dtype=torch.int32)
        self.seg.copy_(seg.expand_as(self.seg), non_blocking=True)
        index = () if self.index is None else tuple(
            (name, tuple(getattr(self.index, name).shape)) for name in _field_names(type(self.index)))
        return type(plan.index).__name__, index
