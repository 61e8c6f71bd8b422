"""relaxkv memory inside diffusers' ``WanTransformer3DModel``: chunk-wise causal generation with any policy.

    from relaxkv_kernels.integrations.diffusers import attach, detach
    cache = attach(transformer, rk.RelaxMemory(), batch=1, height=30, width=52)  # latent tokens after patching
    for chunk in range(n):
        cache.begin_chunk()
        for each pass of the chunk (denoising steps, then the clean refresh pass that commits its K/V):
            flow = transformer(hidden_states=x_chunk, timestep=t, encoder_hidden_states=text).sample
        cache.end_chunk()
    detach(transformer)   # the original processors are back: outputs bit-identical to before attach

``attach`` puts a :class:`KVCacheAttnProcessor` on every block's self-attention (``attn1``): diffusers' own
projections and q/k RMSNorms, then ``cache.attend(layer, q, k, v)`` (Wan RoPE at the frames' absolute positions,
the memory, attention), then diffusers' output projection. Cross-attention (``attn2``) is untouched. The
``rotary_emb`` diffusers computes for each call (positions from 0 within the call) is not used.

``hidden_states`` of a pass are the chunk's latents only, ``[batch, C, chunk_frames, 2 * height, 2 * width]``; a
latent grid, batch or frame count other than the cache's is refused (ValueError) before the model runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import version

import torch

from ..cache import KVCache
from ..memory import MemoryPolicy

MIN_DIFFUSERS = "0.42.1"  # the oldest release the tests have run on
PATCH_SIZE = (1, 2, 2)
_ATTACHMENT = "_relaxkv_attachment"


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:3] if part.isdigit())


def require_diffusers():
    """The diffusers module; ImportError naming the extra (or the version) when it is missing or too old."""
    try:
        import diffusers
    except ImportError:
        raise ImportError('relaxkv_kernels.integrations.diffusers needs diffusers: pip install '
                          '"relaxkv-kernels[diffusers]"') from None
    found = version("diffusers")
    if _version_tuple(found) < _version_tuple(MIN_DIFFUSERS):
        raise ImportError(f"relaxkv_kernels.integrations.diffusers needs diffusers >= {MIN_DIFFUSERS}, found {found}")
    return diffusers


class KVCacheAttnProcessor:
    """The self-attention of block ``layer`` through ``cache.attend`` (a diffusers attention processor).

    Called by ``WanAttention.forward`` as ``processor(attn, hidden_states [B, U*F, dim], None, None, rotary_emb)``;
    returns ``[B, U*F, dim]``. ``rotary_emb`` is ignored: the cache rotates q and k at absolute positions.
    """

    def __init__(self, cache: KVCache, layer: int):
        self.cache, self.layer = cache, layer

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, rotary_emb=None) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(f"KVCacheAttnProcessor (block {self.layer}): serves self-attention only, without a mask")
        if attn.fused_projections:
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q = attn.norm_q(q).unflatten(2, (attn.heads, -1))  # [B, U*F, H, D], before RoPE
        k = attn.norm_k(k).unflatten(2, (attn.heads, -1))
        v = v.unflatten(2, (attn.heads, -1))
        out = self.cache.attend(self.layer, q, k, v).flatten(2).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


@dataclass
class _Attachment:
    cache: KVCache
    processors: list  # each block's attn1 processor before attach
    hook: torch.utils.hooks.RemovableHandle


def _check_transformer(transformer) -> None:
    diffusers = require_diffusers()
    if not isinstance(transformer, diffusers.WanTransformer3DModel):
        raise TypeError(f"attach: expected a diffusers WanTransformer3DModel, got {type(transformer).__name__}")
    cfg = transformer.config
    if tuple(cfg.patch_size) != PATCH_SIZE:
        raise ValueError(f"attach: patch_size {tuple(cfg.patch_size)} is not supported (Wan2.1's {PATCH_SIZE} only)")
    if cfg.added_kv_proj_dim is not None or cfg.image_dim is not None:
        raise ValueError("attach: image-conditioned blocks (Wan I2V: added_kv_proj_dim / image_dim) are not "
                         "supported; text-to-video transformers only")
    if getattr(transformer, _ATTACHMENT, None) is not None:
        raise ValueError("attach: this transformer already has a KV cache attached; detach(transformer) first")


def _input_check(cache: KVCache):
    """A forward pre-hook run before any work: it refuses latents whose batch, frame count or grid is not the cache's,
    text embeddings of another batch, and a block whose self-attention processor was swapped after ``attach``
    (its calls would bypass the cache, noticed only at ``end_chunk``, after the chunk's outputs)."""
    name = "WanTransformer3DModel with a KV cache attached"

    def argument(args, kwargs, key: str, index: int):
        return kwargs[key] if key in kwargs else (args[index] if len(args) > index else None)

    def check(module, args, kwargs):
        x = argument(args, kwargs, "hidden_states", 0)
        if not isinstance(x, torch.Tensor):  # a call diffusers itself refuses: let its own error speak
            return
        ph, pw = PATCH_SIZE[1:]
        want = (cache.batch, cache.pass_frames, cache.height * ph, cache.width * pw)
        if x.dim() != 5 or (x.shape[0], *x.shape[2:]) != want:
            raise ValueError(f"{name}: hidden_states: expected [{want[0]}, C, {want[1]}, {want[2]}, {want[3]}] (the "
                             f"cache's batch, the {want[1]} latent frames of a chunk or of a rewrite, the latent "
                             f"grid), got {list(x.shape)}")
        text = argument(args, kwargs, "encoder_hidden_states", 2)
        if isinstance(text, torch.Tensor) and (text.dim() != 3 or text.shape[0] != cache.batch):
            raise ValueError(f"{name}: encoder_hidden_states (the text embeddings): expected [{cache.batch}, "
                             f"text_len, text_dim] (the cache's batch), got {list(text.shape)}")
        for layer, block in enumerate(module.blocks):
            processor = block.attn1.processor
            if not (isinstance(processor, KVCacheAttnProcessor) and processor.cache is cache
                    and processor.layer == layer):
                raise RuntimeError(f"{name}: block {layer}'s self-attention processor was replaced after attach "
                                   f"(now {type(processor).__name__}), so its calls would bypass the KV cache: "
                                   "detach(transformer) before setting processors, then attach again")
    return check


def cache_for(transformer, policy: MemoryPolicy, *, batch: int, height: int, width: int, **kvcache_kwargs) -> KVCache:
    """The :class:`KVCache` :func:`attach` makes for ``transformer`` (arguments as there), not attached: e.g. with
    ``device="meta"``, a dry run of its checks that allocates nothing."""
    if kvcache_kwargs.get("process_group") is not None:
        raise ValueError("attach: process_group is not supported: the processor hands the cache every head, with no "
                         "all-to-all around it (several GPUs: relaxkv_gen's model under torchrun, "
                         "docs/pages/guides/many-gpus.md)")
    cfg = transformer.config
    weight = transformer.blocks[0].attn1.to_q.weight
    kvcache_kwargs.setdefault("dtype", weight.dtype)
    kvcache_kwargs.setdefault("device", weight.device)
    return KVCache(policy, num_layers=cfg.num_layers, batch=batch, num_heads=cfg.num_attention_heads,
                   head_dim=cfg.attention_head_dim, height=height, width=width, **kvcache_kwargs)


def attach(transformer, policy: MemoryPolicy, *, batch: int, height: int, width: int, **kvcache_kwargs) -> KVCache:
    """Route every block's self-attention of ``transformer`` through a new :class:`KVCache`; returns the cache.

    Args:
        transformer: a diffusers ``WanTransformer3DModel`` (text-to-video, patch size (1, 2, 2)); layers, heads and
            head_dim are read from its config.
        policy: the memory (``rk.DenseWindow``, ``rk.RelaxMemory``, ``rk.PackMemory`` or your own policy).
        batch: samples per call. height, width: latent tokens per frame after patching (latent size / 2).
        kvcache_kwargs: passed to :class:`KVCache` (``backend``, ``attention``, ``engine``, ``dtype``,
            ``device``, ``kv_dtype``, ``pool_device``: "cpu" keeps the K/V pools in host memory, ``staging``);
            ``dtype`` and ``device`` default to those of the transformer's attention weights (pass ``device`` where
            the weights are not where the model runs, e.g. under diffusers' CPU offloading).

    Drive it as ``KVCache`` itself: ``cache.begin_chunk()`` before a chunk's first pass, ``cache.end_chunk()``
    after its refresh pass. TypeError / ValueError (nothing changed) for a transformer it cannot serve.
    """
    _check_transformer(transformer)
    cache = cache_for(transformer, policy, batch=batch, height=height, width=width, **kvcache_kwargs)
    processors = [block.attn1.processor for block in transformer.blocks]
    for layer, block in enumerate(transformer.blocks):
        block.attn1.set_processor(KVCacheAttnProcessor(cache, layer))
    hook = transformer.register_forward_pre_hook(_input_check(cache), with_kwargs=True)
    setattr(transformer, _ATTACHMENT, _Attachment(cache, processors, hook))
    return cache


def attached_cache(transformer) -> KVCache | None:
    """The cache :func:`attach` put on ``transformer``, or None."""
    attachment = getattr(transformer, _ATTACHMENT, None)
    return None if attachment is None else attachment.cache


def detach(transformer) -> KVCache:
    """Undo :func:`attach`: the original self-attention processors are back, the input check removed; returns the
    cache that was attached. ValueError if none is."""
    attachment = getattr(transformer, _ATTACHMENT, None)
    if attachment is None:
        raise ValueError("detach: no KV cache is attached to this transformer")
    for block, processor in zip(transformer.blocks, attachment.processors):
        block.attn1.set_processor(processor)
    attachment.hook.remove()
    delattr(transformer, _ATTACHMENT)
    return attachment.cache
