"""Adapters that put relaxkv's KV memory inside other codebases' models (each needs its own optional extra).

    relaxkv_kernels.integrations.diffusers   attach / detach on diffusers' WanTransformer3DModel
                                             (pip install "relaxkv-kernels[diffusers]")

Nothing here is imported by ``import relaxkv_kernels``.
"""
