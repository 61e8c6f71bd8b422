"""ChunkwiseWanPipeline and StreamingVAEDecoder (relaxkv_gen.diffusers.pipeline) on tiny random diffusers models.

The transformer is diffusers' ``WanTransformer3DModel`` with the tiny reference generator's weights, so the pipeline's
latents are checked against :func:`relaxkv_gen.rollout` (same noise, same schedule, same memory); the VAE is a tiny
random ``AutoencoderKLWan`` (8 x 8 latents -> 64 x 64 frames), checked against its own ``decode``.
"""
import dataclasses
import itertools
import json
import logging

import imageio
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers import UniPCMultistepScheduler
from diffusers import WanTransformer3DModel
from diffusers.utils import export_to_video
from diffusers.utils import logging as diffusers_logging

import relaxkv_kernels as rk
from relaxkv_gen import build_model
from relaxkv_gen import get_preset
from relaxkv_gen import random_text
from relaxkv_gen import rollout
from relaxkv_gen.cli import main
from relaxkv_gen.diffusers import ChunkwiseWanPipeline
from relaxkv_gen.diffusers import StreamingVAEDecoder
from relaxkv_gen.diffusers import diffusers_config
from relaxkv_gen.diffusers import wan_to_diffusers
from relaxkv_gen.diffusers.generate import load_pipeline
from relaxkv_kernels.integrations.diffusers import attached_cache
from relaxkv_kernels.integrations.diffusers import detach

CFG = get_preset("tiny")
PIXELS = 8 * CFG.latent_height  # 64: the tiny VAE's frames
# diffusers computes the timestep sinusoid in fp32 where Wan uses fp64: ~1e-5 per call on the tiny model
ROLLOUT_ATOL = 1e-4


def video_frames(latent_frames: int) -> int:
    """Wan VAE: the first latent frame decodes to 1 frame, every later one to 4."""
    return 1 + 4 * (latent_frames - 1)


def tiny_vae(patched: bool = False) -> AutoencoderKLWan:
    """A random 3-channel Wan2.1 VAE, or (``patched``) a Wan2.2-like one: residual, patch 2, factor 16, 48 latent
    channels."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if patched:
            stats = torch.Generator().manual_seed(2)
            vae = AutoencoderKLWan(base_dim=8, z_dim=48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                   temperal_downsample=[False, True, True], is_residual=True, patch_size=2,
                                   in_channels=12, out_channels=12, scale_factor_spatial=16,
                                   latents_mean=(torch.randn(48, generator=stats) * 0.3).tolist(),
                                   latents_std=(torch.rand(48, generator=stats) + 0.5).tolist())
        else:
            vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                   temperal_downsample=[False, True, True])
    return vae.eval()


@pytest.fixture(scope="module")
def model():
    return build_model(CFG, seed=0)


@pytest.fixture(scope="module")
def transformer(model):
    with torch.random.fork_rng():
        transformer = WanTransformer3DModel(**diffusers_config(CFG))
    transformer.load_state_dict(wan_to_diffusers(model.state_dict()))
    return transformer.eval()


@pytest.fixture(scope="module")
def pipe(transformer):
    return ChunkwiseWanPipeline(transformer, tiny_vae(), FlowMatchEulerDiscreteScheduler(shift=5.0))


def run(pipe, batch=1, **kwargs):
    """The pipeline on the tiny geometry with random_text(CFG, batch, 0) and no progress bar."""
    kwargs.setdefault("prompt_embeds", random_text(CFG, batch, 0))
    kwargs.setdefault("max_sequence_length", CFG.text_len)
    return pipe(height=PIXELS, width=PIXELS, progress=False, **kwargs).frames


def full_decode(vae, latents):
    """WanPipeline's decode of normalised latents [B, z, T, h, w] in one vae.decode call."""
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        return vae.decode(latents / inv_std + mean).sample


@pytest.mark.parametrize("policy", ["relax", "pack"], ids=["relax-by-name", "pack-as-object"])
def test_latents_match_rollout(pipe, model, policy):
    text = random_text(CFG, 1, 0)
    ref = rollout(model, policy, text, num_chunks=5, seed=7, backend="reference", timing=False)
    latents = run(pipe, policy=policy if policy == "relax" else rk.PackMemory(), num_chunks=5,
                  generator=torch.Generator().manual_seed(7), output_type="latent")
    assert latents.shape == ref.latents.shape == (1, 16, 5 * ref.chunk_frames, 8, 8)
    torch.testing.assert_close(latents.cpu(), ref.latents, rtol=0, atol=ROLLOUT_ATOL)
    assert pipe.kv_cache.selected_frames() == ref.chunks[-1]["selected_frames"]
    assert attached_cache(pipe.transformer) is None


def test_fp8_host_pools_match_rollout_with_fp8_pools(pipe, model):
    """kv_dtype and pool_device reach the attached cache: the pipeline's latents with FP8 pools in host memory are
    relaxkv_gen's with the same FP8 pools on the device."""
    text = random_text(CFG, 1, 0)
    ref = rollout(model, "relax", text, num_chunks=4, seed=7, backend="reference", timing=False,
                  kv_dtype=torch.float8_e4m3fn)
    latents = run(pipe, policy="relax", num_chunks=4, generator=torch.Generator().manual_seed(7),
                  output_type="latent", kv_dtype=torch.float8_e4m3fn, pool_device="cpu")
    assert pipe.kv_cache.kv_dtype == torch.float8_e4m3fn
    assert pipe.kv_cache.host_bytes() == pipe.kv_cache.pool_bytes() > 0 and ref.memory["host_bytes"] == 0
    torch.testing.assert_close(latents.cpu(), ref.latents, rtol=0, atol=ROLLOUT_ATOL)


@pytest.mark.parametrize("policy, recache", [("relax", "attended"), ("pack", "recent")])
def test_prompt_switch_with_recache_matches_rollout(pipe, model, policy, recache):
    """stream(prompt_schedule=..., recache=...): relaxkv_gen's rollout with the same schedule, the stored K/V of the
    chosen frames re-computed by the transformer under the new text (Pack's recent block recompressed)."""
    text, new = random_text(CFG, 1, 0), random_text(CFG, 1, 4)
    ref = rollout(model, policy, text, num_chunks=4, seed=7, backend="reference", timing=False, prompts={3: new},
                  recache=recache)
    assert ref.chunks[3]["recached_frames"]
    latents = run(pipe, policy=policy, num_chunks=4, generator=torch.Generator().manual_seed(7),
                  output_type="latent", prompt_schedule={3: new}, recache=recache)
    torch.testing.assert_close(latents.cpu(), ref.latents, rtol=0, atol=ROLLOUT_ATOL)
    for schedule, recache, error, match in (
            ({3: ""}, "none", ValueError, "prompt_schedule: chunk 3: expected a non-empty prompt"),
            ({4: new}, "none", ValueError, r"prompts: chunk 4: expected a chunk index >= 0 < 4"),
            ([new], "none", TypeError, "prompt_schedule: expected a dict"),
            ({3: new}, "all", ValueError, "recache: expected one of")):
        with pytest.raises(error, match=match):
            pipe.stream(prompt_embeds=text, height=PIXELS, width=PIXELS, num_chunks=4,
                        max_sequence_length=CFG.text_len, prompt_schedule=schedule, recache=recache)
    assert attached_cache(pipe.transformer) is None


def test_image_to_video_matches_rollout_with_the_images_latent(pipe, model):
    """stream(image=...): the image is encoded by the VAE (alone, as the causal VAE encodes a first frame) and opens
    the first chunk; the latents equal relaxkv_gen's rollout given that latent frame as context, the first frame
    bitwise; the video's first frame is the decoded image latent; a later chunk changes with the image alone."""
    g = torch.Generator().manual_seed(5)
    image = torch.rand(1, 3, PIXELS, PIXELS, generator=g)
    latent = pipe.encode_image(image, PIXELS, PIXELS)
    assert latent.shape == (1, 16, 1, CFG.latent_height, CFG.latent_width)
    ref = rollout(model, "relax", random_text(CFG, 1, 0), num_chunks=3, seed=7, backend="reference", timing=False,
                  context=latent)
    latents = run(pipe, policy="relax", num_chunks=3, generator=torch.Generator().manual_seed(7),
                  output_type="latent", image=image)
    assert latents.shape == ref.latents.shape == (1, 16, 9, 8, 8) and torch.equal(latents[:, :, :1], latent)
    torch.testing.assert_close(latents.cpu(), ref.latents, rtol=0, atol=ROLLOUT_ATOL)
    new = random_text(CFG, 1, 4)  # a switch right after the image's chunk, the image's frame re-cached too
    switched = rollout(model, "relax", random_text(CFG, 1, 0), num_chunks=3, seed=7, backend="reference",
                       timing=False, context=latent, prompts={1: new}, recache="attended")
    assert switched.chunks[1]["recached_frames"] == [0, 1, 2]
    torch.testing.assert_close(run(pipe, policy="relax", num_chunks=3, generator=torch.Generator().manual_seed(7),
                                   output_type="latent", image=image, prompt_schedule={1: new}, recache="attended"
                                   ).cpu(), switched.latents, rtol=0, atol=ROLLOUT_ATOL)
    other = run(pipe, policy="relax", num_chunks=3, generator=torch.Generator().manual_seed(7),
                output_type="latent", image=1 - image)
    assert not torch.allclose(other[:, :, 6:], latents[:, :, 6:])  # chunk 2 attends to the image's frame
    video = run(pipe, policy="relax", num_chunks=1, generator=torch.Generator().manual_seed(7), output_type="pt",
                image=image)
    first = full_decode(pipe.vae, latent.float())[:, :, 0]  # [1, 3, H, W] in [-1, 1]
    torch.testing.assert_close(video[:, 0], (first / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"image: expected 64 x 64 pixels \(the video's height x width\), got 32 x 64"):
        pipe.stream(image=image[:, :, :32], prompt_embeds=random_text(CFG, 1, 0), height=PIXELS, width=PIXELS,
                    max_sequence_length=CFG.text_len)
    with pytest.raises(TypeError, match="image: expected a PIL image, a list of them, or a tensor"):
        pipe.stream(image="cat.png", prompt_embeds=random_text(CFG, 1, 0), height=PIXELS, width=PIXELS,
                    max_sequence_length=CFG.text_len)


def test_wan22_ti2v_text_to_video_matches_rollout():
    """Wan2.2 TI2V-5B's text-to-video geometry on a tiny model: 48 latent channels, patch (1, 2, 2), and the residual
    VAE (patch 2, spatial factor 16). The pipeline's latents are relaxkv_gen's rollout of the same weights (the
    transformer is Wan2.1's block with other channel counts; a chunk's frames share one timestep, so [B] timesteps
    are its per-token ones), and its frames the streaming decode of those latents."""
    cfg = dataclasses.replace(CFG, name="tiny-wan2.2", in_dim=48, out_dim=48)
    model = build_model(cfg, seed=0)
    transformer = WanTransformer3DModel(**diffusers_config(cfg)).eval()
    transformer.load_state_dict(wan_to_diffusers(model.state_dict()))
    vae = tiny_vae(patched=True)
    pipe = ChunkwiseWanPipeline(transformer, vae, FlowMatchEulerDiscreteScheduler(shift=5.0))
    text = random_text(cfg, 1, 0)
    ref = rollout(model, "relax", text, num_chunks=3, seed=7, backend="reference", timing=False)
    pixels = vae.config.scale_factor_spatial * cfg.latent_height  # 128
    kwargs = dict(prompt_embeds=text, max_sequence_length=cfg.text_len, height=pixels, width=pixels, policy="relax",
                  num_chunks=3, progress=False)
    latents = pipe(generator=torch.Generator().manual_seed(7), output_type="latent", **kwargs).frames
    assert latents.shape == ref.latents.shape == (1, 48, 9, 8, 8)
    torch.testing.assert_close(latents, ref.latents, rtol=0, atol=ROLLOUT_ATOL)
    frames = pipe(generator=torch.Generator().manual_seed(7), output_type="pt", **kwargs).frames
    assert frames.shape == (1, video_frames(9), 3, pixels, pixels)
    want = (full_decode(vae, latents).clamp(-1, 1) + 1) / 2  # [B, 3, T, H, W] in [0, 1]
    torch.testing.assert_close(frames, want.transpose(1, 2), rtol=0, atol=1e-5)


@pytest.mark.parametrize("steps", [(1000, 750, 500, 250), (1000, 900, 601, 333, 7)], ids=["self-forcing", "odd"])
def test_sampler_sigmas_are_the_schedulers_training_sigmas(pipe, steps):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)  # fresh: set_timesteps would replace its sigmas
    index = [scheduler.config.num_train_timesteps - s for s in steps]
    sampler = pipe.sampler(steps)
    # numpy's linspace (scheduler) and torch's (sampler) may round a step apart: 1 ulp of 1.0 at most
    torch.testing.assert_close(sampler.sigmas, scheduler.sigmas[index], rtol=0, atol=2**-23)
    torch.testing.assert_close(sampler.timesteps, scheduler.timesteps[index], rtol=0, atol=1000 * 2**-23)
    if steps == (1000, 750, 500, 250):
        assert torch.equal(sampler.sigmas, scheduler.sigmas[index])


@pytest.mark.parametrize("patched", [False, True], ids=["wan2.1", "wan2.2-patch2"])
def test_streaming_decode_equals_full_decode(patched):
    vae = tiny_vae(patched)
    z = vae.config.z_dim
    latents = torch.randn(2, z, 7, 4, 6, generator=torch.Generator().manual_seed(1))
    decoder = StreamingVAEDecoder(vae)
    chunks = [decoder.decode(part) for part in latents.split([1, 3, 2, 1], dim=2)]  # ragged, a single frame
    assert [c.shape[2] for c in chunks] == [1, 12, 8, 4]
    streamed = torch.cat(chunks, dim=2)
    factor = vae.config.scale_factor_spatial
    assert streamed.shape == (2, 3, video_frames(7), 4 * factor, 6 * factor)
    assert torch.equal(streamed, full_decode(vae, latents))  # the same operations on the same frames
    decoder.reset()
    assert torch.equal(decoder.decode(latents[:, :, :3]), streamed[:, :, :video_frames(3)])


def test_decoder_refuses_bad_latents():
    with pytest.raises(ValueError, match=r"expected \[B, 16, frames >= 1, h, w\], got \[1, 4, 2, 8, 8\]"):
        StreamingVAEDecoder(tiny_vae()).decode(torch.randn(1, 4, 2, 8, 8))
    with pytest.raises(TypeError, match="expected a diffusers AutoencoderKLWan"):
        StreamingVAEDecoder(torch.nn.Identity())


def test_video_outputs(pipe):
    latents = run(pipe, batch=2, num_chunks=3, output_type="latent")
    frames = video_frames(latents.shape[2])
    video = run(pipe, batch=2, num_chunks=3, output_type="np")
    assert video.shape == (2, frames, PIXELS, PIXELS, 3) and video.dtype == np.float32
    assert 0 <= video.min() and video.max() <= 1
    whole = pipe.video_processor.postprocess_video(full_decode(pipe.vae, latents), output_type="np")
    np.testing.assert_array_equal(video, whole)  # chunk by chunk = the whole video at once
    pt = run(pipe, batch=2, num_chunks=3, output_type="pt")
    assert pt.shape == (2, frames, 3, PIXELS, PIXELS)
    np.testing.assert_array_equal(pt.permute(0, 1, 3, 4, 2).numpy(), video)
    pil = run(pipe, batch=2, num_chunks=3, output_type="pil")
    assert len(pil) == 2 and all(len(sample) == frames for sample in pil)
    assert {image.size for sample in pil for image in sample} == {(PIXELS, PIXELS)}


def test_stream_yields_each_chunk_when_generated(pipe):
    passes = []
    hook = pipe.transformer.register_forward_hook(lambda *_: passes.append(1))
    try:
        stream = pipe.stream(prompt_embeds=random_text(CFG, 1, 0), num_chunks=3, height=PIXELS, width=PIXELS,
                             max_sequence_length=CFG.text_len, progress=False)
        assert attached_cache(pipe.transformer) is None  # nothing happens before the first next()
        shapes = []
        for chunk in stream:
            assert attached_cache(pipe.transformer) is pipe.kv_cache
            shapes.append(chunk.shape)
            assert len(passes) == 5 * len(shapes)  # 4 denoising passes + the refresh pass per chunk, no more
    finally:
        hook.remove()
    assert shapes == [(1, 9, PIXELS, PIXELS, 3), (1, 12, PIXELS, PIXELS, 3), (1, 12, PIXELS, PIXELS, 3)]
    assert attached_cache(pipe.transformer) is None


def test_stream_detaches_when_stopped_early(pipe):
    kwargs = dict(prompt_embeds=random_text(CFG, 1, 0), num_chunks=4, height=PIXELS, width=PIXELS,
                  max_sequence_length=CFG.text_len, output_type="latent", progress=False)
    for _ in pipe.stream(**kwargs):
        break
    assert attached_cache(pipe.transformer) is None
    with pytest.raises(KeyError):
        for _ in pipe.stream(**kwargs):
            raise KeyError("consumer failed")
    assert attached_cache(pipe.transformer) is None
    open_stream = pipe.stream(**kwargs)
    next(open_stream)
    with pytest.raises(RuntimeError, match="another stream\\(\\) still open"):
        next(pipe.stream(**kwargs))
    open_stream.close()
    assert attached_cache(pipe.transformer) is None
    # the caller detaches mid-stream: the next chunk's own error, not the cleanup's "no KV cache is attached"
    open_stream = pipe.stream(**kwargs)
    next(open_stream)
    detach(pipe.transformer)
    with pytest.raises(RuntimeError, match="no layer attended in chunk 1"):
        next(open_stream)
    assert attached_cache(pipe.transformer) is None


def test_stream_without_end(pipe):
    """num_chunks=None: the stream goes on until the caller stops (here after 12 chunks, past Relax's warm-up), at
    constant cache memory; the first chunks are those of a bounded stream; calling the pipeline refuses it."""
    kwargs = dict(prompt_embeds=random_text(CFG, 1, 0), height=PIXELS, width=PIXELS, max_sequence_length=CFG.text_len,
                  output_type="latent", progress=False)
    endless = pipe.stream(num_chunks=None, generator=torch.Generator().manual_seed(3), **kwargs)
    sizes, chunks = [], []
    for chunk in itertools.islice(endless, 12):
        chunks.append(chunk)
        sizes.append(pipe.kv_cache.memory_bytes())
    endless.close()
    assert attached_cache(pipe.transformer) is None and len(set(sizes)) == 1
    bounded = list(pipe.stream(num_chunks=3, generator=torch.Generator().manual_seed(3), **kwargs))
    assert all(torch.equal(a, b) for a, b in zip(chunks, bounded))
    with pytest.raises(ValueError, match="num_chunks=None streams without end: iterate stream"):
        pipe(num_chunks=None, **kwargs)


def test_mp4_export(pipe, tmp_path):
    video = run(pipe, num_chunks=2)
    path = export_to_video(video[0], str(tmp_path / "out.mp4"), fps=16)
    with imageio.get_reader(path, "ffmpeg") as reader:
        read = [frame for frame in reader]
        assert reader.get_meta_data()["fps"] == 16
    assert len(read) == video.shape[1] == video_frames(6)
    assert read[0].shape == (PIXELS, PIXELS, 3)


def test_argument_errors(pipe):
    text = random_text(CFG, 1, 0)
    base = dict(height=PIXELS, width=PIXELS, max_sequence_length=CFG.text_len)
    with pytest.raises(ValueError, match="exactly one of prompt and prompt_embeds, got both"):
        pipe.stream("a cat", prompt_embeds=text, **base)
    with pytest.raises(ValueError, match="exactly one of prompt and prompt_embeds, got neither"):
        pipe.stream(**base)
    with pytest.raises(ValueError, match="prompt needs text_encoder and tokenizer"):
        pipe.stream("a cat", **base)
    with pytest.raises(ValueError, match=r"prompt_embeds: expected \[B >= 1, L <= 8"):
        pipe.stream(prompt_embeds=random_text(CFG, 1, 0).repeat(1, 2, 1), **base)
    for height, width in [(72, PIXELS), (PIXELS, 40), (0, PIXELS)]:
        with pytest.raises(ValueError, match="height, width: expected positive multiples of 16"):
            pipe.stream(prompt_embeds=text, max_sequence_length=CFG.text_len, height=height, width=width)
    with pytest.raises(ValueError, match="output_type: expected one of"):
        pipe.stream(prompt_embeds=text, output_type="gif", **base)
    with pytest.raises(ValueError, match="num_chunks"):
        pipe.stream(prompt_embeds=text, num_chunks=0, **base)
    for name in ("num_chunks", "height", "max_sequence_length"):  # a bool is not a count (True used to pass as 1)
        with pytest.raises(TypeError, match=f"{name}: expected an int, got True"):
            pipe.stream(prompt_embeds=text, **{**base, "num_chunks": 1, name: True})
    with pytest.raises(ValueError, match="unknown policy 'window'"):
        pipe.stream(prompt_embeds=text, policy="window", **base)
    # what the cache would refuse at the first next(), refused by stream() itself
    with pytest.raises(ValueError, match="KVCache: backend: expected one of"):
        pipe.stream(prompt_embeds=text, backend="cuda_fast", **base)
    for kv_dtype in (torch.float8_e5m2, torch.int8, "fp8"):
        with pytest.raises(TypeError, match="KVCache: kv_dtype: expected None"):
            pipe.stream(prompt_embeds=text, kv_dtype=kv_dtype, **base)
    with pytest.raises(ValueError, match="PackMemory: a 2x2 token grid is smaller than"):
        pipe.stream(prompt_embeds=text, policy="pack", **{**base, "height": 32, "width": 32})
    with pytest.raises(ValueError, match="KVCache: pool_device: expected None or 'cpu', got 'gpu'"):
        pipe.stream(prompt_embeds=text, pool_device="gpu", **base)
    with pytest.raises(ValueError, match=r"steps: expected whole numbers .* got \[1000\.5\]"):
        pipe.stream(prompt_embeds=text, denoising_steps=(1000.5,), **base)
    assert attached_cache(pipe.transformer) is None


def test_scheduler_errors(transformer):
    vae = tiny_vae()
    with pytest.raises(TypeError, match="expected a FlowMatchEulerDiscreteScheduler .* got UniPCMultistepScheduler"):
        ChunkwiseWanPipeline(transformer, vae, UniPCMultistepScheduler())
    with pytest.raises(ValueError, match="use_dynamic_shifting=True is not supported"):
        ChunkwiseWanPipeline(transformer, vae, FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))


def test_save_and_load(pipe, tmp_path):
    # diffusers 0.42.1 loads a WanTransformer3DModel (it has _keep_in_fp32_modules) only with low_cpu_mem_usage,
    # which needs accelerate (in the diffusers extra): without it from_pretrained raises ValueError
    pipe.save_pretrained(tmp_path)
    loaded = ChunkwiseWanPipeline.from_pretrained(tmp_path)
    assert loaded.text_encoder is None and loaded.tokenizer is None
    assert loaded.scheduler.config.shift == 5.0
    for component in ("transformer", "vae"):
        saved, read = getattr(pipe, component).state_dict(), getattr(loaded, component).state_dict()
        assert saved.keys() == read.keys() and all(torch.equal(saved[k], read[k]) for k in saved)
    # the loaded weights are views into the safetensors file (8-byte aligned, not 64): the CPU matmuls round ~1 ulp
    # differently on them (bit-identical once the weights are copied), so the latents agree to ~1e-6, not bitwise
    kwargs = dict(num_chunks=2, output_type="latent", generator=None)
    torch.testing.assert_close(run(loaded, **kwargs), run(pipe, **kwargs), rtol=0, atol=1e-5)


def test_prompt_is_encoded_as_wan_pipeline_does(transformer):
    import tokenizers  # with transformers, in the diffusers extra
    import transformers
    from diffusers import WanPipeline

    words = ["<pad>", "</s>", "<unk>", "a", "cat", "dog", "on", "the", "beach", "at", "sunset", "runs"]
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.post_processor = tokenizers.processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                                     unk_token="<unk>")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        encoder = transformers.UMT5EncoderModel(transformers.UMT5Config(
            vocab_size=len(words), d_model=CFG.text_dim, d_kv=8, d_ff=16, num_layers=1, num_heads=2)).eval()
    vae, scheduler = tiny_vae(), FlowMatchEulerDiscreteScheduler(shift=5.0)
    pipe = ChunkwiseWanPipeline(transformer, vae, scheduler, text_encoder=encoder, tokenizer=tokenizer)
    prompts = ["a  cat", "a dog runs on the beach at sunset runs"]  # 3 tokens; 10, truncated to 8
    embeds = pipe.encode_prompt(prompts, max_sequence_length=CFG.text_len)
    wan = WanPipeline(tokenizer, encoder, vae, scheduler, transformer)
    with torch.no_grad():  # as WanPipeline.__call__ runs it
        assert torch.equal(embeds, wan._get_t5_prompt_embeds(prompts, max_sequence_length=CFG.text_len))
    assert embeds[0, 3:].abs().sum() == 0 and embeds[0, :3].abs().sum() > 0
    kwargs = dict(num_chunks=2, height=PIXELS, width=PIXELS, output_type="latent", max_sequence_length=CFG.text_len,
                  progress=False)
    assert torch.equal(pipe(prompts, **kwargs).frames, pipe(prompt_embeds=embeds, **kwargs).frames)


# ----------------------------------------------------------------------------- relaxkv-generate --diffusers


@pytest.fixture(scope="module")
def folder(transformer, tmp_path_factory):
    """A diffusers-format folder as Wan-AI/Wan2.1-T2V-1.3B-Diffusers lays it out (transformer/, vae/), tiny."""
    path = tmp_path_factory.mktemp("wan_diffusers")
    transformer.save_pretrained(path / "transformer")
    tiny_vae().save_pretrained(path / "vae")
    return path


def test_cli_writes_each_samples_video_with_a_self_forcing_checkpoint(folder, model, tmp_path, capsys):
    """Every policy's mp4s, FP8 pools in host memory: report.json records the pools' dtype and place and the bytes
    on each side, and the memory lines are printed as on relaxkv_gen's path."""
    ckpt = tmp_path / "self_forcing.pt"
    torch.save({"generator_ema": {f"model.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    out = tmp_path / "out"
    assert main(["--preset", "tiny", "--diffusers", str(folder), "--checkpoint", str(ckpt), "--policy", "all",
                 "--chunks", "2", "--batch", "2", "--out", str(out), "--no-progress", "--kv-dtype", "fp8",
                 "--pools", "host"]) == 0
    stdout = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "diffusers" and "self_forcing.pt" in report["weights"]
    assert report["kv_dtype"] == "float8_e4m3fn" and report["pools"] == "host"
    for policy, frames in (("dense", 6), ("sink", 6), ("relax", 6), ("pack", 8)):
        entry = report["policies"][policy]
        mem = entry["memory"]
        assert mem["kv_dtype"] == "float8_e4m3fn" and mem["pools"] == "host"
        assert mem["host_bytes"] == mem["pool_bytes"] > 0 and mem["device_bytes"] + mem["host_bytes"] == mem["kv_bytes"]
        assert f"KV memory, {policy}: {mem['kv_bytes'] / 2**20:.2f} MiB with float8_e4m3fn pools (device " in stdout
        assert entry["videos"] == [f"video_{policy}_0.mp4", f"video_{policy}_1.mp4"]
        assert entry["video_frames"] == video_frames(frames) and len(entry["chunks"]) == 2
        assert all(c["kv_bytes"] > 0 for c in entry["chunks"])
        for name in entry["videos"]:
            video = imageio.v3.imread(out / name)
            assert video.shape == (video_frames(frames), PIXELS, PIXELS, 3)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["report.json"] + [f"video_{p}_{i}.mp4" for p in ("dense", "sink", "relax", "pack") for i in (0, 1)])


def test_cli_image_to_video(folder, tmp_path, capsys):
    """relaxkv-generate --diffusers FOLDER --image PATH: the video starts from the image (report.json names it); an
    image of another size than the video is one error line."""
    from PIL import Image

    pixels = (torch.rand(PIXELS, PIXELS, 3, generator=torch.Generator().manual_seed(1)) * 255).byte().numpy()
    Image.fromarray(pixels).save(tmp_path / "first.png")
    Image.fromarray(pixels[:32]).save(tmp_path / "small.png")
    out = tmp_path / "out"
    args = ["--preset", "tiny", "--diffusers", str(folder), "--policy", "relax", "--chunks", "2", "--no-progress"]
    assert main([*args, "--image", str(tmp_path / "first.png"), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["image"] == str(tmp_path / "first.png")
    assert imageio.v3.imread(out / "video_relax.mp4").shape[0] == video_frames(6)
    capsys.readouterr()
    assert main([*args, "--image", str(tmp_path / "small.png"), "--out", str(tmp_path / "bad")]) == 2
    assert "image: expected 64 x 64 pixels (the video's height x width), got 32 x 64" in capsys.readouterr().err


def test_cli_prompt_schedule_with_recache(folder, tmp_path, capsys):
    """relaxkv-generate --diffusers FOLDER --prompt-schedule CHUNK:FILE --recache: the stream switches text and
    re-caches (report.json records both); the video is as long as without a switch."""
    torch.save(random_text(CFG, 1, 3)[0], tmp_path / "b.pt")
    out = tmp_path / "out"
    assert main(["--preset", "tiny", "--diffusers", str(folder), "--policy", "relax", "--chunks", "3", "--no-progress",
                 "--prompt-schedule", f"2:{tmp_path / 'b.pt'}", "--recache", "recent", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["prompt_schedule"] == {"2": str(tmp_path / "b.pt")} and report["recache"] == "recent"
    assert imageio.v3.imread(out / "video_relax.mp4").shape[0] == video_frames(9)


def test_cli_pipeline_casts_the_transformer_without_diffusers_fp32_warning(folder):
    """relaxkv-generate --diffusers runs the whole transformer in --dtype on purpose (as relaxkv_gen's model):
    diffusers' "should be kept in float32" warning is silenced for that cast, and diffusers' verbosity is as it was."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    library = diffusers_logging.get_logger("diffusers")  # the library's logger: every diffusers module logs through it
    library.addHandler(handler)
    verbosity = diffusers_logging.get_verbosity()
    try:
        pipe = load_pipeline(folder, CFG, device="cpu", dtype=torch.float16, prompt=False)
    finally:
        library.removeHandler(handler)
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.float16}
    assert diffusers_logging.get_verbosity() == verbosity
    assert not [r for r in records if "should be kept in float32" in r.getMessage()]


@pytest.mark.parametrize("args, message", [
    (["--prompt", "a cat"], "--prompt needs --diffusers"),
    (["--diffusers", "{tmp}/missing"], "not a folder"),
    (["--diffusers", "{tmp}"], "not a diffusers-format Wan folder (no transformer/config.json, vae/config.json)"),
    (["--diffusers", "{folder}", "--preset", "wan-1.3b"], "not preset 'wan-1.3b': num_attention_heads 2 (preset: 12)"),
    (["--diffusers", "{folder}", "--prompt", "a cat"], "--prompt needs the folder's text_encoder/ and tokenizer/"),
])
def test_cli_errors(folder, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    args = [a.format(tmp=tmp_path, folder=folder) for a in args]
    assert main([*args, "--chunks", "1", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("relaxkv-generate: error: ") and message in err and err.count("\n") == 1, err
    assert not out.exists()
