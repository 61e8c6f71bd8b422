from .op import sparse_kv_attention

__all__ = ["sparse_kv_attention"]
