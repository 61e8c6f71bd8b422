"""Pure-PyTorch references of every relaxkv op (float32/float64 math, CPU and CUDA)."""
from .append import rope_append_ref
from .attention import gather_kv_rope_ref, gather_segments_ref, sparse_kv_attention_ref
from .pack import compress_kv_into_ref, compress_kv_ref, mid_affinity_literal, mid_affinity_ref, mid_select_ref
from .relax import relax_candidates, relax_roles, relax_scores_ref, relax_select_ref, relax_target_positions
from .rope import delta_rope_ref, rope_ref, token_positions

__all__ = [
    "compress_kv_into_ref",
    "compress_kv_ref",
    "delta_rope_ref",
    "gather_kv_rope_ref",
    "gather_segments_ref",
    "mid_affinity_literal",
    "mid_affinity_ref",
    "mid_select_ref",
    "relax_candidates",
    "relax_roles",
    "relax_scores_ref",
    "relax_select_ref",
    "relax_target_positions",
    "rope_append_ref",
    "rope_ref",
    "sparse_kv_attention_ref",
    "token_positions",
]
