"""What the model's blocks call around their work, shared by :mod:`.model` and :mod:`.parallel`: the KV memory's
``attend`` and an optional section timer."""
from __future__ import annotations

import contextlib
from typing import Protocol

import torch

_NO_TIMER = contextlib.nullcontext()


class AttendFn(Protocol):
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


class Timer(Protocol):
    """Times named sections of a forward pass (e.g. ``relaxkv_gen.rollout.SectionTimer``)."""

    def section(self, name: str) -> contextlib.AbstractContextManager: ...


def timed(timer: Timer | None, name: str) -> contextlib.AbstractContextManager:
    """``timer.section(name)``, or a shared no-op context when there is no timer (no allocation, no event)."""
    return _NO_TIMER if timer is None else timer.section(name)
