"""The KV cache of a model: storage, the plan on the device, and the attention modes, coordinated by ``KVCache``."""
from .cache import RECACHE
from .cache import FrameNotHeldError
from .cache import KVCache
from .device_plan import DevicePlan
from .modes import AttentionMode
from .storage import KVStorage

__all__ = ["RECACHE", "AttentionMode", "DevicePlan", "FrameNotHeldError", "KVCache", "KVStorage"]
