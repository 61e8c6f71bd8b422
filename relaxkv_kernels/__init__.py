"""relaxkv_kernels: fused kernels for structured KV memory in autoregressive video diffusion.

Public API:
    ops              rope_append, sparse_kv_attention, relax_select, mid_select, compress_kv,
                     gather_kv_rope, gather_kv_rope_into, dense_attention, quantize_frames (also as
                     torch.ops.relaxkv.*)
    policies         DenseWindow, RelaxMemory, PackMemory (and MemoryPolicy / Planner for your own)
    cache            KVCache (begin_chunk / attend / end_chunk; begin_rewrite / end_rewrite to re-cache frames)
    distributed      RankGroup, run_collective, CollectiveError (collectives whose failures name the rank)
    backends()       which backends this machine can run
"""
from .availability import backends
from .cache import RECACHE
from .cache import FrameNotHeldError
from .cache import KVCache
from .distributed import CollectiveError
from .distributed import RankGroup
from .distributed import run_collective
from .memory import DenseWindow
from .memory import MemoryPolicy
from .memory import PackMemory
from .memory import Planner
from .memory import RelaxMemory
from .ops import compress_kv
from .ops import dense_attention
from .ops import gather_kv_rope
from .ops import gather_kv_rope_into
from .ops import mid_select
from .ops import quantize_frames
from .ops import relax_select
from .ops import rope_append
from .ops import sparse_kv_attention

__all__ = [
    "RECACHE",
    "CollectiveError",
    "DenseWindow",
    "FrameNotHeldError",
    "KVCache",
    "MemoryPolicy",
    "PackMemory",
    "Planner",
    "RankGroup",
    "RelaxMemory",
    "backends",
    "compress_kv",
    "dense_attention",
    "gather_kv_rope",
    "gather_kv_rope_into",
    "mid_select",
    "quantize_frames",
    "relax_select",
    "rope_append",
    "run_collective",
    "sparse_kv_attention",
]
__version__ = "0.1.0"
