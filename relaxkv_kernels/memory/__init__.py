"""Memory policies: which frames each chunk attends to, where they live, and the device steps that choose.

A policy is a small frozen config (``MemoryPolicy``); its planner (``Planner``) plans every chunk on the
host and owns the policy's device steps, which see a typed ``StepContext``, never the cache. ``KVCache`` runs any
policy; a new policy is a new file.
"""
from .base import CacheGeometry
from .base import ChunkPlan
from .base import MemoryPolicy
from .base import Planner
from .base import SlotMap
from .base import StepContext
from .base import host_field
from .base import pad
from .dense import DenseWindow
from .pack import PackIndex
from .pack import PackMemory
from .relax import RelaxIndex
from .relax import RelaxMemory
from .relax import relax_candidates
from .relax import relax_roles
from .relax import relax_target_positions

__all__ = ["CacheGeometry", "ChunkPlan", "DenseWindow", "MemoryPolicy", "PackIndex", "PackMemory", "Planner",
           "RelaxIndex", "RelaxMemory", "SlotMap", "StepContext", "host_field", "pad", "relax_candidates",
           "relax_roles", "relax_target_positions"]
