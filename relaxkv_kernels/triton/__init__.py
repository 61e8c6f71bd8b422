"""Triton kernels of the relaxkv ops (imported lazily: only this subpackage imports triton)."""
from .attention import sparse_kv_attention_triton
from .compress import compress_kv_triton
from .mid_select import mid_select_triton
from .relax_select import relax_select_triton
from .rope_append import rope_append_triton

__all__ = [
    "compress_kv_triton",
    "mid_select_triton",
    "relax_select_triton",
    "rope_append_triton",
    "sparse_kv_attention_triton",
]
