"""Memory policies: which frames each chunk attends to, where they live, and the device steps that choose.

A policy is a small frozen config (``MemoryPolicy``); its planner (``Planner``) plans every chunk on the
host and owns the policy's device steps. ``KVCache`` runs any policy; a new policy is a new file.
"""
from .base import ChunkPlan, MemoryPolicy, Planner, SlotMap, pad
from .dense import DenseWindow
from .pack import PackJob, PackMemory
from .relax import RelaxJob, RelaxMemory, relax_candidates, relax_roles, relax_target_positions

__all__ = ["ChunkPlan", "DenseWindow", "MemoryPolicy", "PackJob", "PackMemory", "Planner", "RelaxJob", "RelaxMemory",
           "SlotMap", "pad", "relax_candidates", "relax_roles", "relax_target_positions"]
