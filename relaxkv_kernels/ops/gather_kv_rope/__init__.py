from .op import gather_kv_rope
from .op import gather_kv_rope_into

__all__ = ["gather_kv_rope", "gather_kv_rope_into"]
