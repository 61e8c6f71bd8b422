"""relaxkv_gen with diffusers (``pip install "relaxkv-kernels[diffusers]"``): Wan / Self-Forcing weights in
diffusers' ``WanTransformer3DModel`` names and back, and the chunk-wise pipeline with a streaming VAE decode."""
from relaxkv_kernels.integrations.diffusers import require_diffusers

require_diffusers()  # ImportError naming the extra, before anything below imports diffusers

from .pipeline import ChunkwiseWanPipeline  # noqa: E402
from .pipeline import StreamingVAEDecoder  # noqa: E402
from .weights import check_diffusers_config  # noqa: E402
from .weights import diffusers_config  # noqa: E402
from .weights import diffusers_to_wan  # noqa: E402
from .weights import wan_to_diffusers  # noqa: E402

__all__ = ["ChunkwiseWanPipeline", "StreamingVAEDecoder", "check_diffusers_config", "diffusers_config",
           "diffusers_to_wan", "wan_to_diffusers"]
