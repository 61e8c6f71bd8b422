"""Memory policies: which frames each chunk attends to, where they live, and the device steps that choose.

A policy is a small frozen config (``MemoryPolicy``); its planner (``Planner``) plans every chunk on the
host and owns the policy's device steps, which see a typed ``DeviceStep``, never the cache. ``KVCache`` runs any policy; a new policy is a new file.
"""
from .base import CacheGeometry, ChunkPlan, DeviceStep, MemoryPolicy, Planner, SlotMap, pad
from .dense import DenseWindow
from .pack import PackIndex, PackJob, PackMemory
from .relax import RelaxIndex, RelaxJob, RelaxMemory, relax_candidates, relax_roles, relax_target_positions

__all__ = ["CacheGeometry", "ChunkPlan", "DenseWindow", "DeviceStep", "MemoryPolicy", "PackIndex", "PackJob",
           "PackMemory", "Planner", "RelaxIndex", "RelaxJob", "RelaxMemory", "SlotMap", "pad", "relax_candidates",
           "relax_roles", "relax_target_positions"]
