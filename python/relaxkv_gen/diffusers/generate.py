"""``relaxkv-generate --diffusers PATH``: the chunk-wise pipeline on a diffusers-format Wan2.1 folder, mp4s out.

The transformer and the VAE are read from ``PATH/transformer`` and ``PATH/vae`` (as in
``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``), the text encoder and tokenizer only for ``--prompt``. The scheduler is
Self-Forcing's (flow matching, shift 5), not the folder's (Wan's repository ships UniPC for its 50-step sampler).
Each sample's video is written to ``video_<policy>.mp4`` (``video_<policy>_<i>.mp4`` for a batch) frame by frame
as the chunks are decoded, so a long video never sits in memory; ``report.json`` records every chunk.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import check_state_dict
from ..checkpoint import read_state_dict
from ..config import VIDEO_FPS
from ..config import ModelConfig
from ..report import format_memory
from ..report import write_json
from .pipeline import ChunkwiseWanPipeline
from .weights import check_diffusers_config
from .weights import wan_to_diffusers

PIXELS_PER_LATENT = 8  # Wan VAE's spatial compression


def check_folder(path: Path, prompt: bool) -> None:
    """ValueError unless ``path`` is a diffusers-format folder with a transformer and a VAE (and, for a ``prompt``,
    a text encoder and a tokenizer)."""
    label = f"--diffusers {str(path)!r}"
    if not path.is_dir():
        raise ValueError(f"{label}: not a folder")
    missing = [f"{sub}/config.json" for sub in ("transformer", "vae") if not (path / sub / "config.json").is_file()]
    if missing:
        raise ValueError(f"{label}: not a diffusers-format Wan folder (no {', '.join(missing)})")
    if prompt and not ((path / "text_encoder" / "config.json").is_file() and (path / "tokenizer").is_dir()):
        raise ValueError(f"{label}: --prompt needs the folder's text_encoder/ and tokenizer/ (not found); pass "
                         "--text-embeds instead")


def load_pipeline(path: Path, cfg: ModelConfig, *, device, dtype, prompt: bool) -> ChunkwiseWanPipeline:
    """The pipeline of ``path`` with the transformer in ``dtype`` (the VAE in fp32), checked to be preset ``cfg``."""
    from diffusers import AutoencoderKLWan
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers import WanTransformer3DModel
    from diffusers.utils import logging as diffusers_logging

    transformer = WanTransformer3DModel.from_pretrained(path, subfolder="transformer")
    check_diffusers_config(transformer.config, cfg)
    vae = AutoencoderKLWan.from_pretrained(path, subfolder="vae")
    text_encoder = tokenizer = None
    if prompt:
        try:
            from transformers import AutoTokenizer
            from transformers import UMT5EncoderModel
        except ImportError:
            raise ImportError("--prompt needs transformers (pip install transformers) for the text encoder") from None
        text_encoder = UMT5EncoderModel.from_pretrained(path, subfolder="text_encoder")
        tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    # The whole transformer runs in ``dtype``, as relaxkv_gen's model and Self-Forcing's generator do: diffusers'
    # warning that its time embedder and norms "should be kept in float32" describes a deliberate choice here, so it
    # is off for this cast alone.
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        transformer = transformer.to(dtype)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    pipe = ChunkwiseWanPipeline(transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=text_encoder,
                                tokenizer=tokenizer)
    return pipe.to(device)


def load_weights(pipe: ChunkwiseWanPipeline, checkpoint: Path) -> str:
    """Self-Forcing / LongLive / Wan generator weights into the pipeline's transformer; returns a description."""
    transformer = pipe.transformer
    sd = wan_to_diffusers(read_state_dict(checkpoint))
    check_state_dict(transformer, sd)  # the names already match: mis-shaped or non-float tensors
    expected = transformer.state_dict()
    transformer.load_state_dict({k: v.to(expected[k].dtype) for k, v in sd.items()}, strict=True)
    return f"checkpoint {checkpoint} ({len(sd)} tensors, converted with wan_to_diffusers)"


def text_batch(text: dict) -> int:
    return len(text["prompt"]) if "prompt" in text else int(text["prompt_embeds"].shape[0])


def video_names(policy: str, batch: int) -> list[str]:
    return [f"video_{policy}.mp4"] if batch == 1 else [f"video_{policy}_{i}.mp4" for i in range(batch)]


def write_videos(pipe: ChunkwiseWanPipeline, cfg: ModelConfig, staging: Path, *, policies: list[str],
                 chunks: dict[str, int], text: dict, seed: int, backend: str, progress: bool, info: dict,
                 kv_dtype: torch.dtype | None = None, pool_device=None, image=None, prompt_schedule: dict | None = None,
                 recache: str = "none", until_stopped=None) -> list[str]:
    """Generate each policy's videos into ``staging`` (mp4s written as the chunks come) and ``report.json``;
    returns the names written. ``text``: ``{"prompt": [...]}`` or ``{"prompt_embeds": [B, L, text_dim]}``;
    ``image``: the first frame of every video, ``prompt_schedule`` and ``recache``: prompt switches
    (``ChunkwiseWanPipeline.stream``'s). ``until_stopped(count)``: a context manager around each policy's loop given
    a function that counts its chunks done (the CLI's ``--endless`` stop), or None."""
    import imageio

    report = {**info, "fps": VIDEO_FPS, "policies": {}}
    names = []
    for policy in policies:
        files = video_names(policy, text_batch(text))
        writers = [imageio.get_writer(staging / name, fps=VIDEO_FPS, codec="libx264", quality=5,
                                      macro_block_size=16) for name in files]
        records = []
        stop = contextlib.nullcontext() if until_stopped is None else until_stopped(lambda: len(records))
        with stop:  # the CLI's --endless: a stop ends the loop (the writers closed first)
            try:
                start = time.perf_counter()
                for i, frames in enumerate(pipe.stream(**text, policy=policy, num_chunks=chunks[policy],
                                                       height=cfg.latent_height * PIXELS_PER_LATENT,
                                                       width=cfg.latent_width * PIXELS_PER_LATENT,
                                                       generator=torch.Generator().manual_seed(seed), output_type="np",
                                                       max_sequence_length=cfg.text_len, backend=backend,
                                                       progress=progress, kv_dtype=kv_dtype,
                                                       pool_device=pool_device, image=image,
                                                       prompt_schedule=prompt_schedule, recache=recache)):
                    for writer, video in zip(writers, frames):  # [frames, H, W, 3] in [0, 1]
                        for frame in video:
                            writer.append_data(np.round(frame * 255).astype(np.uint8))
                    now = time.perf_counter()
                    records.append({"chunk": i, "video_frames": int(frames.shape[1]), "time_ms": 1e3 * (now - start),
                                    "kv_bytes": int(pipe.kv_cache.memory_bytes()),
                                    "device_bytes": int(pipe.kv_cache.device_bytes()),
                                    "host_bytes": int(pipe.kv_cache.host_bytes()),
                                    "selected_frames": pipe.kv_cache.selected_frames()})
                    start = now
            finally:
                for writer in writers:
                    writer.close()
        cache = pipe.kv_cache
        report["policies"][policy] = {"videos": files, "video_frames": sum(r["video_frames"] for r in records),
                                      "chunks": records, "memory": {
                                          "kv_dtype": str(cache.kv_dtype).replace("torch.", ""),
                                          "pools": "host" if cache.host_bytes() else "device",
                                          "kv_bytes": cache.memory_bytes(), "device_bytes": cache.device_bytes(),
                                          "host_bytes": cache.host_bytes(), "pool_bytes": cache.pool_bytes()}}
        names += files
    print(format_memory({"meta": info, "policies": report["policies"]}))
    write_json(report, staging / "report.json")
    return [*names, "report.json"]
