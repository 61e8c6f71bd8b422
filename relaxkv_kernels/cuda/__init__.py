"""Python side of the CUDA ops in ``relaxkv_kernels._C`` (csrc/): tensor checks and launches."""
from relaxkv_kernels.cuda.rope_append import rope_append_cuda

__all__ = ["rope_append_cuda"]
