"""Chunk-wise (Self-Forcing) text-to-video generation as a diffusers pipeline, with relaxkv memory and a streaming VAE.

:class:`ChunkwiseWanPipeline` drives a diffusers ``WanTransformer3DModel`` chunk by chunk through
``relaxkv_kernels.integrations.diffusers.attach`` (any memory policy), with the 4-step Self-Forcing schedule of
:func:`relaxkv_gen.rollout.denoise_chunk`, and decodes each chunk as soon as it is generated with
:class:`StreamingVAEDecoder` (``AutoencoderKLWan``'s causal decode, one chunk at a time).
:meth:`ChunkwiseWanPipeline.stream` yields every chunk's frames while later chunks are not generated yet; calling the
pipeline returns them all.

Real weights (Wan2.1-T2V-1.3B in diffusers' layout, a Self-Forcing generator checkpoint; needs transformers, and
accelerate for ``WanTransformer3DModel.from_pretrained`` in diffusers 0.42.1)::

    import torch
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from diffusers.utils import export_to_video
    from transformers import AutoTokenizer, UMT5EncoderModel

    from relaxkv_gen.checkpoint import read_state_dict
    from relaxkv_gen.diffusers import ChunkwiseWanPipeline, wan_to_diffusers

    repo = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    transformer = WanTransformer3DModel.from_pretrained(repo, subfolder="transformer", torch_dtype=torch.bfloat16)
    transformer.load_state_dict(wan_to_diffusers(read_state_dict("checkpoints/self_forcing_dmd.pt")))
    pipe = ChunkwiseWanPipeline(
        transformer,
        AutoencoderKLWan.from_pretrained(repo, subfolder="vae", torch_dtype=torch.float32),
        FlowMatchEulerDiscreteScheduler(shift=5.0),  # the repo's own scheduler is UniPC: not this sampler
        text_encoder=UMT5EncoderModel.from_pretrained(repo, subfolder="text_encoder", torch_dtype=torch.bfloat16),
        tokenizer=AutoTokenizer.from_pretrained(repo, subfolder="tokenizer"),
    ).to("cuda")
    frames = pipe("A corgi running on a beach at sunset", policy="relax", num_chunks=7).frames  # [1, 81, 480, 832, 3]
    export_to_video(frames[0], "out.mp4", fps=16)

    for chunk in pipe.stream("A corgi running on a beach at sunset", num_chunks=20):
        ...  # [1, 9, 480, 832, 3] first, then [1, 12, 480, 832, 3] per chunk, as each is generated
"""
from __future__ import annotations

import inspect
import itertools
from collections.abc import Iterator
from collections.abc import Sequence

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from diffusers import DiffusionPipeline
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers import WanTransformer3DModel
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d
from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput
from diffusers.utils.accelerate_utils import apply_forward_hook
from diffusers.utils.torch_utils import get_module_execution_device
from diffusers.video_processor import VideoProcessor

from relaxkv_kernels import RECACHE
from relaxkv_kernels import MemoryPolicy
from relaxkv_kernels.integrations.diffusers import attach
from relaxkv_kernels.integrations.diffusers import attached_cache
from relaxkv_kernels.integrations.diffusers import cache_for
from relaxkv_kernels.integrations.diffusers import detach

from ..rollout import HeldLatents
from ..rollout import check_count
from ..rollout import context_chunks
from ..rollout import denoise_chunk
from ..rollout import make_policy
from ..rollout import run_recache
from ..rollout import text_schedule
from ..sampler import DEFAULT_STEPS
from ..sampler import FlowMatchSampler

OUTPUT_TYPES = ("np", "pil", "pt", "latent")
# FlowMatchEulerDiscreteScheduler options that change its sigmas away from the training schedule (shifted by
# config.shift), which is the only one the Self-Forcing sampler follows
UNSUPPORTED_SCHEDULER_OPTIONS = ("use_dynamic_shifting", "use_karras_sigmas", "use_exponential_sigmas",
                                 "use_beta_sigmas", "invert_sigmas", "shift_terminal", "stochastic_sampling")


@apply_forward_hook  # wakes the VAE under enable_model_cpu_offload, as AutoencoderKLWan.decode does
def _decode_frames(vae: AutoencoderKLWan, z: torch.Tensor, feat_cache: list, first: bool) -> torch.Tensor:
    """``vae.decoder`` over latent frames ``z`` [B, z_dim, U, h, w] one at a time, carrying ``feat_cache``.

    ``first``: ``z[:, :, 0]`` is the video's first latent frame (decoded to 1 frame, every other one to 4).
    Returns the decoder's output [B, C, frames, H', W'] before unpatchify and clamping.
    """
    x = vae.post_quant_conv(z)  # a 1x1x1 convolution: frame by frame, no temporal context
    out = []
    for i in range(x.shape[2]):
        out.append(vae.decoder(x[:, :, i:i + 1], feat_cache=feat_cache, feat_idx=[0], first_chunk=first and i == 0))
    return torch.cat(out, dim=2)


class StreamingVAEDecoder:
    """``AutoencoderKLWan``'s causal decode, one chunk of latent frames per call.

    ``vae.decode`` runs its decoder over the latent frames one at a time with a feature cache (the last frames
    every causal convolution saw); this class keeps that cache between calls, so decoding a video chunk by chunk
    gives the frames of decoding it at once. Spatial tiling (``vae.enable_tiling()``) and batch slicing are not
    used. A VAE with ``config.patch_size`` (Wan2.2) gets its unpatchify, as in ``vae.decode``.

    Example::

        decoder = StreamingVAEDecoder(vae)
        for latents in chunks:            # [B, z_dim, U, h, w] each, normalised (the transformer's output)
            video = decoder.decode(latents)   # [B, 3, 1 + 4 * (U - 1) first, then 4 * U, 8 h, 8 w] in [-1, 1]
        decoder.reset()                   # the next call starts a new video
    """

    def __init__(self, vae: AutoencoderKLWan):
        if not isinstance(vae, AutoencoderKLWan):
            raise TypeError(f"StreamingVAEDecoder: expected a diffusers AutoencoderKLWan, got {type(vae).__name__}")
        self.vae = vae
        self._num_convs = sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())
        self.reset()

    def reset(self) -> None:
        """Forget the previous frames: the next :meth:`decode` starts a new video."""
        self._feat_cache: list[torch.Tensor | None] = [None] * self._num_convs
        self._first = True

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The video frames of the next latent frames of the video.

        Args:
            latents: normalised latents [B, z_dim, U, h, w] (what the transformer produces), any device and dtype:
                de-normalised with ``vae.config.latents_mean`` / ``latents_std`` as ``WanPipeline`` does.

        Returns:
            video [B, 3, frames, s * h, s * w] in [-1, 1] (s = ``vae.config.scale_factor_spatial``, 8 for Wan2.1),
            on the VAE's device in its dtype; ``frames`` is 1 + 4 (U - 1) for the video's first call, 4 U after.
        """
        vae = self.vae
        z_dim = vae.config.z_dim
        if latents.dim() != 5 or latents.shape[1] != z_dim or latents.shape[2] < 1:
            raise ValueError(f"StreamingVAEDecoder.decode: latents: expected [B, {z_dim}, frames >= 1, h, w], "
                             f"got {list(latents.shape)}")
        device, dtype = get_module_execution_device(vae), vae.dtype
        mean = torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(device, dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(device, dtype)
        z = latents.to(device, dtype) / inv_std + mean  # WanPipeline's de-normalisation, operation for operation
        out = _decode_frames(vae, z, self._feat_cache, self._first)
        self._first = False
        if vae.config.patch_size is not None:
            out = unpatchify(out, patch_size=vae.config.patch_size)
        return out.clamp(-1.0, 1.0)


def check_scheduler(scheduler) -> None:
    """TypeError / ValueError unless ``scheduler`` is a ``FlowMatchEulerDiscreteScheduler`` whose training sigmas
    are the shifted schedule the Self-Forcing sampler uses (no dynamic shifting, no other sigma option)."""
    if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        raise TypeError(f"ChunkwiseWanPipeline: scheduler: expected a FlowMatchEulerDiscreteScheduler (Wan's, "
                        f"shift=5.0), got {type(scheduler).__name__}")
    config = scheduler.config
    used = [f"{name}={config[name]!r}" for name in UNSUPPORTED_SCHEDULER_OPTIONS if config.get(name)]
    if used:
        raise ValueError(f"ChunkwiseWanPipeline: scheduler: {', '.join(used)} is not supported: the Self-Forcing "
                         f"sampler follows the training sigmas shifted by config.shift only")


class ChunkwiseWanPipeline(DiffusionPipeline):
    """Chunk-wise autoregressive text-to-video with a Wan2.1 transformer (Self-Forcing, Relax Forcing, ...).

    Every chunk of ``policy.chunk_frames`` latent frames: ``cache.begin_chunk()``, the few-step Self-Forcing
    schedule (:func:`relaxkv_gen.rollout.denoise_chunk`: denoising steps with fresh noise re-injected, then a clean
    refresh pass at t = 0 that writes the chunk's K/V into the memory), ``cache.end_chunk()``, then the chunk's
    frames through :class:`StreamingVAEDecoder`. No classifier-free guidance (Self-Forcing generators are
    distilled without it).

    Args:
        transformer: a diffusers ``WanTransformer3DModel`` (text-to-video, patch (1, 2, 2)), e.g. a Self-Forcing
            generator loaded with :func:`relaxkv_gen.diffusers.wan_to_diffusers`.
        vae: ``AutoencoderKLWan``.
        scheduler: ``FlowMatchEulerDiscreteScheduler`` (Wan's: ``shift=5.0``); only its ``shift`` and
            ``num_train_timesteps`` are used (:meth:`sampler`).
        text_encoder, tokenizer: optional (transformers' ``UMT5EncoderModel`` and its tokenizer); without them,
            pass ``prompt_embeds``.

    Load a saved pipeline with ``ChunkwiseWanPipeline.from_pretrained(path)`` (the class is not in diffusers).
    After a run, ``pipe.kv_cache`` is the run's ``relaxkv_kernels.KVCache`` (e.g. ``kv_cache.selected_frames()``).
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["text_encoder", "tokenizer"]

    def __init__(self, transformer: WanTransformer3DModel, vae: AutoencoderKLWan,
                 scheduler: FlowMatchEulerDiscreteScheduler, text_encoder=None, tokenizer=None):
        super().__init__()
        check_scheduler(scheduler)
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=text_encoder,
                              tokenizer=tokenizer)
        self.vae_scale_factor_spatial = vae.config.scale_factor_spatial
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)
        self.kv_cache = None

    def sampler(self, denoising_steps: Sequence[int] = DEFAULT_STEPS) -> FlowMatchSampler:
        """The Self-Forcing sampler at ``denoising_steps`` on the scheduler's training schedule: its sigmas are
        ``scheduler.sigmas[num_train_timesteps - step]`` before any ``set_timesteps``."""
        check_scheduler(self.scheduler)
        config = self.scheduler.config
        return FlowMatchSampler.create(steps=denoising_steps, shift=config.shift,
                                       num_train_timesteps=config.num_train_timesteps)

    @torch.no_grad()
    def encode_prompt(self, prompt: str | list[str] | None = None, prompt_embeds: torch.Tensor | None = None,
                      max_sequence_length: int = 512) -> torch.Tensor:
        """The text states the transformer attends to: [B, max_sequence_length, text_dim] (transformer dtype, on
        the execution device), rows past each prompt's tokens zero, as Wan pads them.

        Exactly one of ``prompt`` (a string or B strings, encoded as ``WanPipeline._get_t5_prompt_embeds`` does:
        cleaned, tokenized to ``max_sequence_length`` with truncation, encoded with the attention mask) and
        ``prompt_embeds`` ([B, L <= max_sequence_length, text_dim], zero-padded to ``max_sequence_length``).
        """
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("ChunkwiseWanPipeline: pass exactly one of prompt and prompt_embeds, got "
                             + ("both" if prompt is not None else "neither"))
        check_count("max_sequence_length", max_sequence_length)
        text_dim = self.transformer.config.text_dim
        if prompt is not None:
            prompt_embeds = self._t5_prompt_embeds(prompt, max_sequence_length)
        elif not isinstance(prompt_embeds, torch.Tensor):
            raise TypeError(f"prompt_embeds: expected a tensor, got {type(prompt_embeds).__name__}")
        if prompt_embeds.dim() != 3 or prompt_embeds.shape[1] > max_sequence_length \
                or prompt_embeds.shape[2] != text_dim or prompt_embeds.shape[0] < 1:
            raise ValueError(f"prompt_embeds: expected [B >= 1, L <= {max_sequence_length} (max_sequence_length), "
                             f"{text_dim}], got {list(prompt_embeds.shape)}")
        pad = max_sequence_length - prompt_embeds.shape[1]
        prompt_embeds = torch.nn.functional.pad(prompt_embeds, (0, 0, 0, pad))
        return prompt_embeds.to(self._execution_device, self.transformer.dtype)

    def _t5_prompt_embeds(self, prompt: str | list[str], max_sequence_length: int) -> torch.Tensor:
        """``WanPipeline._get_t5_prompt_embeds`` for one video per prompt: [B, max_sequence_length, text_dim]."""
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError("ChunkwiseWanPipeline: prompt needs text_encoder and tokenizer (this pipeline has "
                             "none): pass them, or pass prompt_embeds")
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean  # imports transformers, as the encoder needs

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt: expected a string or a non-empty list of strings, got {prompt!r}")
        inputs = self.tokenizer([prompt_clean(p) for p in prompts], padding="max_length",
                                max_length=max_sequence_length, truncation=True, add_special_tokens=True,
                                return_attention_mask=True, return_tensors="pt")
        mask = inputs.attention_mask
        device = get_module_execution_device(self.text_encoder)
        states = self.text_encoder(inputs.input_ids.to(device), mask.to(device)).last_hidden_state
        lengths = mask.gt(0).sum(dim=1).to(states.device)  # [B] real tokens, kept; the rows after them are zeroed
        real = torch.arange(states.shape[1], device=states.device)[None, :] < lengths[:, None]
        return states.masked_fill(~real[..., None], 0.0)

    @torch.no_grad()
    def encode_image(self, image, height: int, width: int) -> torch.Tensor:
        """Image-to-video's first latent frame, as ``WanImageToVideoPipeline`` makes its condition: the image (a PIL
        image, a list of B of them, or a tensor [B, 3, height, width] / [3, height, width] in [0, 1]) encoded alone by
        the causal VAE (the mode of its latent distribution) and normalised with ``latents_mean`` / ``latents_std``.

        Returns:
            [B, z, 1, height // s, width // s] in the transformer's dtype on the execution device. ValueError for an
            image of another size than ``height`` x ``width`` (it is not resized: the video would not start with it).
        """
        images = image if isinstance(image, list) else [image]
        for i, img in enumerate(images):
            if isinstance(img, torch.Tensor) and img.dim() in (3, 4) and img.shape[-3] == 3:
                size = tuple(img.shape[-2:])
            elif isinstance(getattr(img, "size", None), tuple):  # a PIL image: (width, height)
                size = img.size[::-1]
            else:
                raise TypeError(f"image: expected a PIL image, a list of them, or a tensor [B, 3, {height}, {width}] "
                                f"in [0, 1], got {type(img).__name__}"
                                + (f" of shape {list(img.shape)}" if isinstance(img, torch.Tensor) else ""))
            if size != (height, width):
                raise ValueError(f"image: expected {height} x {width} pixels (the video's height x width), got "
                                 f"{size[0]} x {size[1]}" + (f" (image {i})" if len(images) > 1 else ""))
        pixels = self.video_processor.preprocess(image, height=height, width=width)  # [B, 3, H, W] in [-1, 1]
        vae = self.vae
        pixels = pixels.to(device=get_module_execution_device(vae), dtype=vae.dtype).unsqueeze(2)
        z = vae.encode(pixels).latent_dist.mode()  # [B, z, 1, h, w]
        z_dim = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(z.device, z.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(z.device, z.dtype)
        return ((z - mean) * inv_std).to(self._execution_device, self.transformer.dtype)

    @torch.no_grad()
    def stream(
        self,
        prompt: str | list[str] | None = None,
        *,
        prompt_embeds: torch.Tensor | None = None,
        policy: str | MemoryPolicy = "relax",
        num_chunks: int | None = 7,
        height: int = 480,
        width: int = 832,
        generator: torch.Generator | None = None,
        denoising_steps: Sequence[int] = DEFAULT_STEPS,
        output_type: str = "np",
        max_sequence_length: int = 512,
        backend: str | None = None,
        progress: bool = True,
        kv_dtype: torch.dtype | None = None,
        pool_device=None,
        image=None,
        prompt_schedule: dict | None = None,
        recache: str = "none",
    ) -> Iterator:
        """Generate ``num_chunks`` chunks, yielding each one's output as soon as it is generated and decoded.

        Args:
            prompt, prompt_embeds, max_sequence_length: the text, see :meth:`encode_prompt` (B videos).
            policy: the memory: a name for :func:`relaxkv_gen.rollout.make_policy` (``"dense"``, ``"sink"``,
                ``"relax"``, ``"pack"``) or a ``relaxkv_kernels.MemoryPolicy``; its ``chunk_frames`` is U.
            num_chunks: chunks of U latent frames each; None: a stream without end, until the caller stops
                iterating (``close()`` or a ``break``), at constant cache memory (the policy's pools are sized once).
            height, width: pixels, multiples of s x patch (s = the VAE's spatial factor: 8 for Wan2.1, 16 for
                Wan2.2's VAE; patch 2): 16 for Wan2.1, 32 for Wan2.2; latents are ``height // s`` x ``width // s``.
            generator: a CPU ``torch.Generator`` for all the noise (None: a new one seeded 0), drawn as
                :func:`relaxkv_gen.rollout.rollout` draws it, so the same seed gives the same latents.
            denoising_steps: the Self-Forcing steps (:meth:`sampler`).
            output_type: per chunk, ``"np"``: float array [B, frames, height, width, 3] in [0, 1]; ``"pt"``: tensor
                [B, frames, 3, height, width] in [0, 1]; ``"pil"``: B lists of ``frames`` PIL images; ``"latent"``:
                the chunk's latents [B, C, U, height // s, width // s] (C: the transformer's in_channels, 16 for
                Wan2.1, 48 for Wan2.2 TI2V-5B; normalised, not decoded). ``frames`` is
                1 + 4 (U - 1) for the first chunk, 4 U after.
            backend: the ``KVCache`` backend; None: ``"fused"`` on a CUDA device, ``"reference"`` elsewhere.
            progress: a progress bar over the chunks (``self.progress_bar``; see ``set_progress_bar_config``).
            kv_dtype: the cache's pool dtype (None: the transformer's; ``torch.float8_e4m3fn``: FP8 pools).
            pool_device: where the cache's K/V pools live: None (the execution device) or "cpu" (host memory,
                pinned on CUDA, see ``relaxkv_kernels.KVCache``).
            image: image-to-video: the video's first frame (a PIL image, B of them, or a tensor [B, 3, height,
                width] in [0, 1], see :meth:`encode_image`), or None (text-to-video). Its latent frame opens the
                first chunk (``relaxkv_gen.rollout``'s ``context``: at every pass that frame is the image's latent at
                timestep 0, the other U - 1 frames are denoised), and every policy keeps it as any frame.
            prompt_schedule: prompt switches, ``{chunk: prompt}`` (a string, B strings, or text states [B, L,
                text_dim] as ``prompt_embeds``), chunks counted from 0 with the image's chunk; from each listed chunk
                on the transformer reads that text (``prompt`` / ``prompt_embeds`` until the first).
            recache: at each switch, the stored K/V re-computed under the new text before the chunk: "none",
                "recent" or "attended" (``relaxkv_gen.rollout.rollout``'s ``recache``; README "Prompt switches and
                re-cache"). The pipeline keeps the latents of the frames the memory holds for it.

        Returns:
            An iterator of ``num_chunks`` outputs. Arguments are checked (ValueError / TypeError) when ``stream`` is
            called; the KV cache is attached to the transformer at the first ``next`` and detached when the
            iteration ends, fails or is closed (``close()``, or the iterator going out of scope after a ``break``).
        """
        if num_chunks is not None:
            check_count("num_chunks", num_chunks)
        patch = self.transformer.config.patch_size[1]
        multiple = self.vae_scale_factor_spatial * patch
        for name, value in (("height", height), ("width", width)):
            check_count(name, value, low=0)
        if not (height > 0 and width > 0 and height % multiple == 0 and width % multiple == 0):
            raise ValueError(f"height, width: expected positive multiples of {multiple} (VAE factor "
                             f"{self.vae_scale_factor_spatial} x patch {patch}), got {height!r} x {width!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type: expected one of {list(OUTPUT_TYPES)}, got {output_type!r}")
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        elif not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
            raise ValueError(f"generator: expected a CPU torch.Generator (the noise is drawn on the CPU), got "
                             f"{getattr(generator, 'device', type(generator).__name__)}")
        if isinstance(policy, str):
            policy = make_policy(policy)
        elif not isinstance(policy, MemoryPolicy):
            raise TypeError(f"policy: expected a policy name or a relaxkv_kernels.MemoryPolicy, got "
                            f"{type(policy).__name__}")
        text = self.encode_prompt(prompt, prompt_embeds, max_sequence_length)
        sampler = self.sampler(denoising_steps)
        device = self._execution_device
        if backend is None:
            backend = "fused" if device.type == "cuda" else "reference"
        latent_h, latent_w = height // self.vae_scale_factor_spatial, width // self.vae_scale_factor_spatial
        shape = (text.shape[0], self.transformer.config.in_channels, int(policy.chunk_frames), latent_h, latent_w)
        given = [] if image is None else context_chunks(self.encode_image(image, height, width), shape[2],
                                                        shape[0], shape, device, self.transformer.dtype)
        whole = sum(g.shape[2] == shape[2] for g in given)  # context chunks, then the generated ones
        texts = self._schedule(prompt_schedule, text, max_sequence_length,
                               None if num_chunks is None else whole + num_chunks, recache)
        cache_for(self.transformer, policy, batch=text.shape[0], height=latent_h // patch, width=latent_w // patch,
                  dtype=self.transformer.dtype, device="meta", backend=backend, kv_dtype=kv_dtype,
                  pool_device=pool_device)  # the cache _chunks attaches, on meta tensors: its checks, now
        return self._chunks(texts, policy, sampler, num_chunks, latent_h, latent_w, generator, output_type, backend,
                            device, progress, kv_dtype, pool_device, given, recache)

    def _schedule(self, prompt_schedule, text: torch.Tensor, max_sequence_length: int, chunks: int | None,
                  recache: str) -> dict[int, torch.Tensor]:
        """``{0: text}`` and every switch of ``prompt_schedule`` encoded (:meth:`encode_prompt`), checked as
        ``relaxkv_gen.rollout.text_schedule`` checks them for a stream of ``chunks`` chunks (None: no end):
        ValueError / TypeError before any work."""
        if recache not in RECACHE:
            raise ValueError(f"recache: expected one of {list(RECACHE)}, got {recache!r}")
        if prompt_schedule is None:
            return {0: text}
        if not isinstance(prompt_schedule, dict):
            raise TypeError(f"prompt_schedule: expected a dict {{chunk: prompt}}, got {type(prompt_schedule).__name__}")
        encoded = {}
        for chunk, value in prompt_schedule.items():
            if isinstance(value, str) and not value.strip() or isinstance(value, list) and not all(
                    isinstance(p, str) and p.strip() for p in value):
                raise ValueError(f"prompt_schedule: chunk {chunk!r}: expected a non-empty prompt, got {value!r}")
            states = value if isinstance(value, torch.Tensor) else None
            encoded[chunk] = self.encode_prompt(None if states is not None else value, states, max_sequence_length)
        return text_schedule(encoded, text, chunks)

    @torch.no_grad()
    def _chunks(self, texts: dict[int, torch.Tensor], policy: MemoryPolicy, sampler: FlowMatchSampler,
                num_chunks: int, latent_h: int, latent_w: int, generator: torch.Generator, output_type: str,
                backend: str, device: torch.device, progress: bool, kv_dtype: torch.dtype | None, pool_device,
                given: list[torch.Tensor], recache: str) -> Iterator:
        """The generation loop behind :meth:`stream` (arguments checked): ``texts`` {chunk: text [B, L, text_dim]}
        on ``device`` from each switch on; ``given``: the context frames of the first chunks
        (``relaxkv_gen.rollout.context_chunks``)."""
        transformer = self.transformer
        text = texts[0]
        batch, frames = text.shape[0], int(policy.chunk_frames)
        shape = (batch, transformer.config.in_channels, frames, latent_h, latent_w)
        dtype = transformer.dtype

        def noise():  # as relaxkv_gen.rollout.rollout draws it
            return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)

        tokens = (latent_h // 2) * (latent_w // 2)
        per_token = [False]  # the chunk has given frames: timesteps per token (0 on theirs), as Wan2.2 takes them

        def forward(x, t, _pass):  # t [B, U]: one timestep per sample, or per token in a chunk with given frames
            step = t.repeat_interleave(tokens, dim=1) if per_token[0] else t[:, 0]
            return transformer(hidden_states=x, timestep=step, encoder_hidden_states=text).sample


        if attached_cache(transformer) is not None:
            raise RuntimeError("ChunkwiseWanPipeline: the transformer already has a KV cache attached (another "
                               "stream() still open?): finish or close() that iterator first")
        decoder = None if output_type == "latent" else StreamingVAEDecoder(self.vae)
        self.kv_cache = attach(transformer, policy, batch=batch, height=latent_h // 2, width=latent_w // 2,
                               backend=backend, device=device, dtype=dtype, kv_dtype=kv_dtype,
                               pool_device=pool_device)
        held = HeldLatents(self.kv_cache, recache != "none" and len(texts) > 1)
        whole = sum(g.shape[2] == frames for g in given)  # context chunks, then the generated ones
        total = None if num_chunks is None else whole + num_chunks
        bar = self.progress_bar(total=total) if progress else None
        try:
            for i in itertools.count() if total is None else range(total):
                chunk_given = given[i] if i < len(given) else None
                if i in texts and i:
                    text = texts[i]
                    per_token[0] = False  # a rewrite's frames share timestep 0
                    run_recache(self.kv_cache, recache, held, forward, batch, device)
                per_token[0] = chunk_given is not None and chunk_given.shape[2] < frames
                self.kv_cache.begin_chunk()
                x0 = denoise_chunk(forward, sampler, noise, batch, frames, device, chunk_given)  # [B, 16, U, h, w]
                self.kv_cache.end_chunk()
                held.add(i, x0)
                if decoder is None:
                    yield x0
                else:
                    yield self.video_processor.postprocess_video(decoder.decode(x0), output_type=output_type)
                if bar is not None:
                    bar.update()
        finally:
            if attached_cache(transformer) is self.kv_cache:  # unless the caller detached it (their error speaks)
                detach(transformer)
            if bar is not None:
                bar.close()
            self.maybe_free_model_hooks()

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, *, return_dict: bool = True,
                 **kwargs) -> WanPipelineOutput | tuple:
        """:meth:`stream` to the end (keyword arguments as there), the chunks joined along frames.

        Returns:
            ``WanPipelineOutput(frames=...)`` (or ``(frames,)`` with ``return_dict=False``): ``"np"``
            [B, 1 + 4 (T - 1), height, width, 3], ``"pt"`` [B, 1 + 4 (T - 1), 3, height, width], ``"pil"`` B lists
            of PIL images, ``"latent"`` [B, C, T, height // s, width // s] (see :meth:`stream`), for
            T = ``num_chunks * U`` latent frames.
        """
        if "num_chunks" in kwargs and kwargs["num_chunks"] is None:
            raise ValueError("num_chunks=None streams without end: iterate stream(...) instead of calling the pipeline")
        chunks = list(self.stream(prompt, **kwargs))
        output_type = kwargs.get("output_type", inspect.signature(self.stream).parameters["output_type"].default)
        if output_type == "latent":
            frames = torch.cat(chunks, dim=2)
        elif output_type == "pt":
            frames = torch.cat(chunks, dim=1)
        elif output_type == "np":
            frames = np.concatenate(chunks, axis=1)
        else:  # "pil": per sample, the chunks' image lists one after the other
            frames = [[image for chunk in chunks for image in chunk[b]] for b in range(len(chunks[0]))]
        if not return_dict:
            return (frames,)
        return WanPipelineOutput(frames=frames)
