"""The relaxkv ops, one folder each (``ops/<op>/``): registration and checks (``op.py``), the pure-PyTorch
reference (``reference.py``), the Triton kernel (``triton.py``) and the CUDA wrapper (``cuda.py``).

Shared helpers name no op: ``checks`` (argument checks), ``dispatch`` (backend tables),
``triton_common`` (Triton building blocks), ``cuda_common`` (the CUDA runtime seam).
"""
from .compress_kv import compress_kv
from .dense_attention import dense_attention
from .gather_kv_rope import gather_kv_rope
from .gather_kv_rope import gather_kv_rope_into
from .mid_select import mid_select
from .quantize_frames import quantize_frames
from .relax_select import relax_select
from .rope_append import rope_append
from .sparse_kv_attention import sparse_kv_attention

__all__ = ["compress_kv", "dense_attention", "gather_kv_rope", "gather_kv_rope_into", "mid_select", "quantize_frames",
           "relax_select", "rope_append", "sparse_kv_attention"]
