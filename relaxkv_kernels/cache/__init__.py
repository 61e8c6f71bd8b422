"""The KV cache of a model: storage, the plan's buffers on the device and the attention modes, coordinated by
``KVCache``."""
from .cache import RECACHE
from .cache import FrameNotHeldError
from .cache import KVCache
from .modes import AttentionMode
from .plan_buffers import PlanBuffers
from .storage import KVStorage

__all__ = ["RECACHE", "AttentionMode", "FrameNotHeldError", "KVCache", "KVStorage", "PlanBuffers"]
