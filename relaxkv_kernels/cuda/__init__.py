"""Python side of the CUDA ops in ``relaxkv_kernels._C`` (csrc/): tensor checks and launches."""
from relaxkv_kernels.cuda.compress_kv import compress_kv_cuda
from relaxkv_kernels.cuda.gather_kv_rope import gather_kv_rope_cuda
from relaxkv_kernels.cuda.mid_select import mid_select_cuda
from relaxkv_kernels.cuda.relax_select import relax_select_cuda
from relaxkv_kernels.cuda.rope_append import rope_append_cuda

__all__ = ["compress_kv_cuda", "gather_kv_rope_cuda", "mid_select_cuda", "relax_select_cuda", "rope_append_cuda"]
